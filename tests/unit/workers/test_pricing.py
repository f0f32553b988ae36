"""Pricing: exact integer costs, half-up rounding once, decimal price conversion."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.pricing import Prices, cost_micro, micro_to_price, price_to_micro

# 2 CNY in, 8 CNY out, 0.5 CNY cached, per million tokens.
P = Prices(input_price=2_000_000, output_price=8_000_000, cached_price=500_000)


def test_exact_costs() -> None:
    assert cost_micro(P, 0, 0, 0) == 0
    assert cost_micro(P, 1_000_000, 0, 0) == 2_000_000
    assert cost_micro(P, 0, 0, 1_000_000) == 8_000_000
    assert cost_micro(P, 1_000_000, 1_000_000, 0) == 500_000
    # 1000 prompt (400 cached) + 250 completion:
    # (600 * 2e6 + 400 * 5e5 + 250 * 8e6) / 1e6 = 1200 + 200 + 2000
    assert cost_micro(P, 1000, 400, 250) == 3400


def test_rounding_is_half_up_once_over_the_total() -> None:
    prices = Prices(input_price=1, output_price=1, cached_price=1)
    assert cost_micro(prices, 499_999, 0, 0) == 0
    assert cost_micro(prices, 500_000, 0, 0) == 1  # exactly half rounds up
    # Each part alone would round to 0; the sum is exactly half and rounds up.
    assert cost_micro(prices, 250_000, 0, 250_000) == 1
    assert cost_micro(prices, 1_499_999, 0, 0) == 1
    assert cost_micro(prices, 1_500_000, 0, 0) == 2


def test_huge_counts_are_exact() -> None:
    prices = Prices(input_price=123_456_789, output_price=987_654_321, cached_price=1)
    n = 10**15
    expected = (n * 123_456_789 + n * 987_654_321 + 500_000) // 1_000_000
    assert cost_micro(prices, n, 0, n) == expected


@pytest.mark.parametrize(("prompt", "cached", "completion"), [(-1, 0, 0), (0, 0, -1), (5, 6, 0)])
def test_invalid_counts(prompt: int, cached: int, completion: int) -> None:
    with pytest.raises(ValueError, match="token"):
        cost_micro(P, prompt, cached, completion)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_prices_must_be_non_negative_ints(bad: object) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        Prices(input_price=bad, output_price=0, cached_price=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("0.5", 500_000),
        ("0.25", 250_000),
        (" 2 ", 2_000_000),
        ("0", 0),
        ("0.000001", 1),
        ("1e-6", 1),
        ("1.500000", 1_500_000),
        (3, 3_000_000),
        (0.1, 100_000),  # the float's shortest repr, not its binary value
        (0.3, 300_000),
        (Decimal("12.345678"), 12_345_678),
    ],
)
def test_price_to_micro(value: str | int | float | Decimal, micro: int) -> None:
    assert price_to_micro(value) == micro


@pytest.mark.parametrize(
    "value",
    ["-0.5", "-1", "NaN", "sNaN", "inf", "-Infinity", "abc", "", "0.0000001", "1" * 40, True, 1e-7],
)
def test_price_to_micro_rejects(value: str | bool | float) -> None:
    with pytest.raises(ValueError, match="price"):
        price_to_micro(value)


def test_micro_to_price() -> None:
    assert micro_to_price(500_000) == 0.5
    assert micro_to_price(250_000) == 0.25
    assert micro_to_price(100_000) == 0.1
    assert micro_to_price(0) == 0.0


@given(st.integers(0, 10**12))
def test_price_round_trip(micro: int) -> None:
    assert price_to_micro(micro_to_price(micro)) == micro
    assert price_to_micro(str(Decimal(micro).scaleb(-6))) == micro


prices = st.builds(
    Prices,
    input_price=st.integers(0, 10**9),
    output_price=st.integers(0, 10**9),
    cached_price=st.integers(0, 10**9),
)
counts = st.integers(0, 10**9)


@given(prices, counts, counts, counts, st.integers(0, 10**6))
def test_cost_is_an_int_and_monotone_in_every_count(
    p: Prices, prompt: int, cached_share: int, completion: int, extra: int
) -> None:
    cached = min(cached_share, prompt)
    base = cost_micro(p, prompt, cached, completion)
    assert isinstance(base, int)
    assert base >= 0
    assert cost_micro(p, prompt, cached, completion + extra) >= base
    assert cost_micro(p, prompt + extra, cached, completion) >= base
    if p.cached_price <= p.input_price:
        # Moving part of the prompt into the cache never costs more when caching is cheaper.
        moved = min(extra, prompt - cached)
        assert cost_micro(p, prompt, cached + moved, completion) <= base
    # Adding cached prompt tokens (prompt grows with them) never lowers the cost.
    assert cost_micro(p, prompt + extra, cached + extra, completion) >= base


@given(prices, counts, counts, counts)
def test_cost_matches_exact_decimal_rounding(
    p: Prices, prompt: int, cached_share: int, completion: int
) -> None:
    cached = min(cached_share, prompt)
    exact = (
        Decimal(prompt - cached) * p.input_price
        + Decimal(cached) * p.cached_price
        + Decimal(completion) * p.output_price
    ) / Decimal(1_000_000)
    expected = int(exact.to_integral_value(rounding="ROUND_HALF_UP"))
    assert cost_micro(p, prompt, cached, completion) == expected

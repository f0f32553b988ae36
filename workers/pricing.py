"""Model prices and the cost of one request, in exact integer micro-units.

Owns :class:`Prices`, :func:`cost_micro` and the conversions between the API's decimal
prices and integer micro-units. Money never touches a float here except in
:func:`micro_to_price`, which exists only to render a price in JSON.

Units: a price is integer micro-CNY (1e-6 CNY) per 1,000,000 tokens, so the API price
``0.5`` (CNY per million tokens) is stored as ``500_000``. A cost is integer micro-CNY.

Rounding: the exact cost is ``sum(tokens * price) / 1_000_000`` micro-CNY. The numerator is
summed exactly over the three token classes and divided once, rounding half up, so a
request is never charged two roundings and the result is monotone in every token count.

Pure Python; imports nothing from the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, Inexact, InvalidOperation, localcontext

MICRO = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Prices:
    """Per-model prices in micro-CNY per 1M tokens.

    ``cached_price`` applies to the cached part of the prompt (``cached_tokens``), which is
    included in ``prompt_tokens``; ``input_price`` to the rest of the prompt.
    """

    input_price: int
    output_price: int
    cached_price: int

    def __post_init__(self) -> None:
        for name in ("input_price", "output_price", "cached_price"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def cost_micro(
    prices: Prices, prompt_tokens: int, cached_tokens: int, completion_tokens: int
) -> int:
    """Cost of one request in micro-CNY, rounded half up once at the end.

    ``cached_tokens`` is the part of ``prompt_tokens`` served from the upstream's cache.
    Raises ValueError for negative counts or ``cached_tokens > prompt_tokens``.
    """
    if prompt_tokens < 0 or cached_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be non-negative")
    if cached_tokens > prompt_tokens:
        raise ValueError("cached_tokens is part of prompt_tokens and cannot exceed it")
    numerator = (
        (prompt_tokens - cached_tokens) * prices.input_price
        + cached_tokens * prices.cached_price
        + completion_tokens * prices.output_price
    )
    return (numerator + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT


def price_to_micro(value: str | int | Decimal | float) -> int:
    """Convert an API decimal price (``"0.5"``, ``2``, ``0.25``) to integer micro-units.

    Floats are read through their shortest ``repr`` (``0.1`` means ``"0.1"``, not the
    binary value). Raises ValueError for booleans, non-numbers, NaN, infinities, negative
    values and values with more precision than one micro-unit: prices must be exact.
    """
    if isinstance(value, bool):
        raise ValueError("a price cannot be a boolean")
    if isinstance(value, float):
        value = repr(value)
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise ValueError(f"not a decimal price: {value!r}") from exc
    if not number.is_finite():
        raise ValueError(f"price must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"price must be non-negative, got {value!r}")
    with localcontext() as ctx:
        ctx.traps[Inexact] = True  # never round a price silently, however large
        try:
            micro = number.scaleb(6)
        except Inexact as exc:
            raise ValueError(f"price {value!r} has too many digits") from exc
    if micro != micro.to_integral_value():
        raise ValueError(f"price {value!r} is finer than one micro-unit")
    return int(micro)


def micro_to_price(micro: int) -> float:
    """Render integer micro-units as a decimal price for JSON (``500_000`` -> ``0.5``).

    Correctly rounded: the float is the one nearest to the exact decimal value.
    """
    return micro / MICRO

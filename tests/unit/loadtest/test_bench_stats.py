"""The benchmark's pure helpers: percentiles, /proc parsing, response framing, the table."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.bench.loadgen import build_request, chunked_end, parse_head, retry_after_of
from loadtest.bench.stats import (
    CLOCK_TICKS,
    Cell,
    busiest_share,
    format_table,
    format_versus,
    percentile,
    pool_rounds,
    proc_stat_ppid,
    proc_stat_ticks,
    proc_status_kib,
    read_cpu_ticks,
    read_peak_rss_kib,
)

# A real /proc/<pid>/stat line whose command name holds a space and a parenthesis.
STAT = (
    "4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 1500 0 0 0 "
    "250 50 7 3 20 0 1 0 12345 123456789 4000 18446744073709551615"
)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 1) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 0)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1),
       st.floats(min_value=0.1, max_value=100))
def test_percentile_is_a_member_within_bounds(values: list[float], q: float) -> None:
    result = percentile(values, q)
    assert result in values
    assert min(values) <= result <= max(values)


def test_proc_stat_parsing_survives_odd_command_names() -> None:
    assert proc_stat_ticks(STAT) == 300
    assert proc_stat_ticks(STAT, children=True) == 310
    assert proc_stat_ppid(STAT) == 17


def test_proc_status_fields() -> None:
    status = "Name:\tpython\nVmPeak:\t  500 kB\nVmHWM:\t   81234 kB\nVmRSS:\t   80000 kB\n"
    assert proc_status_kib(status, "VmHWM") == 81234
    assert proc_status_kib(status, "VmRSS") == 80000
    assert proc_status_kib(status, "VmSwap") is None


def test_reading_our_own_process() -> None:
    ticks = read_cpu_ticks(os.getpid())
    rss = read_peak_rss_kib(os.getpid())
    assert ticks is not None
    assert ticks >= 0
    assert rss is not None
    assert rss > 1000


def test_parse_head() -> None:
    head = (b"HTTP/1.1 200 \r\ncontent-type: application/json\r\nContent-Length: 42\r\n"
            b"Connection: close")
    assert parse_head(head) == (200, 42, False, True)
    chunked = b"HTTP/1.1 429 \r\ntransfer-encoding: chunked\r\ndate: x"
    assert parse_head(chunked) == (429, None, True, False)


def test_build_request_is_complete() -> None:
    raw = build_request("127.0.0.1", 80, "/v1/chat/completions", "sk-x", b'{"a":1}')
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 7" in head
    assert b"\r\nAuthorization: Bearer sk-x" in head
    assert body == b'{"a":1}'


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.data())
def test_chunked_end_is_invariant_to_how_bytes_are_split(
    parts: list[bytes], data: st.DataObject
) -> None:
    wire = _chunked(parts)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=5))))
    buf, pos, skip, done = b"", 0, 0, False
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        buf = buf[pos:] + wire[start:end]
        pos, skip, done = chunked_end(buf, 0, skip)
        # The end is found exactly when its last byte has arrived, never before.
        assert done == (end == len(wire))
    assert pos == len(buf)


def _cell(target: str, rps: float, p50: float, cpu: float | None = None) -> Cell:
    return Cell(scenario="stream", concurrency=10, target=target, rps=rps, completed=100,
                errors=0, window_s=1.0, p50_ms=p50, p99_ms=2 * p50, ttfb_p50_ms=p50 / 2,
                ttfb_p99_ms=p50, gen_cpu_s=0.9, cpu_ms_per_req=cpu)


def test_table_shows_ratios_and_added_latency_against_direct_and_relay() -> None:
    cells = [_cell("direct", 2000, 4.0, 0.4), _cell("relay", 800, 10.0, 1.0),
             _cell("gateway", 400, 16.5, 2.0)]
    lines = format_table(cells).splitlines()
    assert lines[0].split()[:5] == ["scenario", "conc", "target", "req/s", "/direct"]
    gateway = lines[4].split()
    assert gateway[:8] == ["stream", "10", "gateway", "400.0", "0.20", "0.50", "16.5", "33.0"]
    assert gateway[8] == "+12.5"  # p50 added over direct
    assert gateway[14] == "2.00"  # cpu-ms/req
    assert gateway[16] == "90!"  # the generator was busy: flagged
    versus = format_versus(cells, "gateway", "relay").splitlines()
    assert "rps x 0.50" in versus[1]
    assert "p50    +6.5" in versus[1]
    assert "cpu x2.00" in versus[1]


def test_table_without_a_direct_cell_prints_dashes() -> None:
    line = format_table([_cell("gateway", 400, 16.5)]).splitlines()[2].split()
    assert line[4:6] == ["-", "-"]
    assert line[14] == "-"


def test_retry_after_of() -> None:
    head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\nRetry-After: 2"
    assert retry_after_of(head) == 2.0
    assert retry_after_of(b"HTTP/1.1 429 X\r\nretry-after: soon\r\nx: y") is None
    assert retry_after_of(b"HTTP/1.1 503 X\r\ncontent-length: 0") is None
    both = b"HTTP/1.1 429 X\r\nretry-after: 1\r\nretry-after-ms: 340\r\nx: y"
    assert retry_after_of(both) == 0.34  # milliseconds first, as the openai SDKs read them
    assert retry_after_of(b"HTTP/1.1 429 X\r\nretry-after-ms: x\r\nretry-after: 3") == 3.0


def _round(latencies: list[float], ttfbs: list[float], *, window: float = 2.0,
           gateway_cpu: float = 0.5, rss: float = 100.0, errors: int = 0) -> Cell:
    return Cell(scenario="realistic", concurrency=100, target="gateway",
                rps=len(latencies) / window, completed=len(latencies), errors=errors,
                window_s=window, p50_ms=percentile(latencies, 50),
                p99_ms=percentile(latencies, 99), ttfb_p50_ms=percentile(ttfbs, 50),
                ttfb_p99_ms=percentile(ttfbs, 99), gen_cpu_s=0.1,
                cpu_ms_per_req=1000 * gateway_cpu / len(latencies), peak_rss_mib=rss,
                process_cpu_s={"gateway": gateway_cpu, "mock": 0.2},
                error_samples=["1x timeout"] if errors else [], shed=1,
                latencies_ms=latencies, ttfbs_ms=ttfbs)


def test_pooled_rounds_take_percentiles_over_every_sample() -> None:
    # Each round alone has a p99 of 99; pooled, the p99 rank lands among the big values of
    # the second round only because the samples are pooled, not averaged.
    first = _round([float(v) for v in range(1, 101)], [1.0] * 100)
    second = _round([float(v) for v in range(101, 201)], [float(v) for v in range(1, 101)],
                    window=3.0, gateway_cpu=1.5, rss=120.0, errors=2)
    pooled = pool_rounds([first, second])
    assert pooled.completed == 200
    assert pooled.rounds == 2
    assert pooled.window_s == 5.0
    assert pooled.rps == 200 / 5.0
    assert pooled.p50_ms == 100.0
    assert pooled.p99_ms == 198.0
    assert pooled.ttfb_p50_ms == 1.0
    assert pooled.ttfb_p99_ms == 98.0
    assert pooled.process_cpu_s == {"gateway": 2.0, "mock": 0.4}
    assert pooled.cpu_ms_per_req == 1000 * 2.0 / 200
    assert pooled.peak_rss_mib == 120.0
    assert pooled.errors == 2
    assert pooled.shed == 2
    assert pooled.error_samples == ["1x timeout"]
    assert "latencies_ms" not in pooled.as_json()


def test_one_round_is_the_cell_itself_and_mixed_cells_are_refused() -> None:
    only = _round([1.0, 2.0], [0.5, 0.5])
    assert pool_rounds([only]) is only
    other = _cell("direct", 10.0, 1.0)
    with pytest.raises(ValueError, match="different cells"):
        pool_rounds([only, other])
    with pytest.raises(ValueError, match="no rounds"):
        pool_rounds([])


def test_busiest_share_is_the_busiest_process_and_skips_the_unreadable() -> None:
    before = {1: 0, 2: 100, 3: None, 4: 50}
    after = {1: CLOCK_TICKS // 10, 2: 100 + CLOCK_TICKS // 2, 3: 10**6, 5: 10**6}
    # pid 2 used half a tick-second over 1 s: 50 % of a core; 3 and 4 are not comparable.
    assert busiest_share(before, after, 1.0) == pytest.approx(0.5)
    assert busiest_share(before, after, 0.5) == pytest.approx(1.0)
    assert busiest_share({}, {}, 1.0) == 0.0

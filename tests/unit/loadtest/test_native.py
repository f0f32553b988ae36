"""``loadtest.bench.native``: the nginx config, the wrk script and what wrk prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench.native import _lua_string, nginx_conf, parse_wrk, wrk_script
from loadtest.bench.processes import BenchSetupError

WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    44.42ms   59.52ms 321.74ms   87.61%
  15131 requests in 8.01s, 9.86MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 355
Requests/sec:   1889.72
Transfer/sec:      1.23MB
status 429 355
status 200 14776
latency_us 25710 301250
"""


def test_what_wrk_printed_is_read_back() -> None:
    result = parse_wrk(WRK_OUTPUT, 8.0)
    assert result.statuses == {200: 14776, 429: 355}
    assert result.rate(200) == 14776 / 8.0
    assert result.socket_errors == 6
    assert result.other == 6
    assert (result.p50_ms, result.p99_ms) == (25.71, 301.25)


def test_other_statuses_count_as_errors() -> None:
    result = parse_wrk("status 200 10\nstatus 502 2\nstatus 429 1\nlatency_us 1 2\n", 1.0)
    assert result.other == 2


def test_a_run_without_the_scripts_summary_is_an_error() -> None:
    with pytest.raises(BenchSetupError, match="no summary"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n", 8.0)


def test_nginx_answers_posts_with_the_file(tmp_path: Path) -> None:
    conf = nginx_conf(tmp_path, 8080, "text/event-stream")
    assert "listen 127.0.0.1:8080;" in conf
    assert f"root {tmp_path};" in conf
    assert "error_page 405 =200 /answer;" in conf
    assert "location = /answer { internal; default_type text/event-stream; }" in conf


def test_lua_long_strings_cannot_be_ended_by_their_text() -> None:
    assert _lua_string('{"a": 1}') == '[[{"a": 1}]]'
    assert _lua_string("x]]y") == "[=[x]]y]=]"
    assert _lua_string("x]]y]=]") == "[==[x]]y]=]]==]"


def test_the_wrk_script_posts_the_body_with_the_key() -> None:
    script = wrk_script(b'{"model": "m"}', "sk-abc")
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = [[{"model": "m"}]]' in script
    assert 'wrk.headers["Authorization"] = [[Bearer sk-abc]]' in script
    assert "Authorization" not in wrk_script(b"{}", None)

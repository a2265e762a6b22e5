"""bench/proxy.py reads wrk's summary: requests, rate, transfer, p99 and every kind of failed
request (no engine, no wrk: its output as Debian's wrk 4.1 prints it)."""

from __future__ import annotations

from bench.proxy import parse_wrk

OUTPUT = """\
Running 5s test @ http://127.0.0.1:8080/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   701.32us    1.01ms  27.34ms   93.18%
    Req/Sec    11.61k     1.48k   14.86k    70.00%
  Latency Distribution
     50%  424.00us
     75%  687.00us
     90%    1.26ms
     99%    4.50ms
  115563 requests in 5.00s, 17.63MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  23109.83
Transfer/sec:      3.53MB
"""


def test_wrk_summary_is_read() -> None:
    result = parse_wrk(OUTPUT)
    assert result.requests == 115563
    assert result.rps == 23109.83
    assert result.bytes_per_s == 3.53 * 1024**2
    assert result.p99_ms == 4.5
    assert result.failed == 1 + 2 + 3 + 4 + 5


def test_a_clean_run_has_no_failure_and_microsecond_p99() -> None:
    clean = OUTPUT.replace("  Socket errors: connect 1, read 2, write 3, timeout 4\n", "")
    clean = clean.replace("  Non-2xx or 3xx responses: 5\n", "").replace("4.50ms", "900.00us")
    result = parse_wrk(clean)
    assert result.failed == 0
    assert result.p99_ms == 0.9

"""The benchmarks never rot: `python -m bench all --quick` runs end to end against the real engine
and Consul, and every benchmark prints its JSON line and writes its section of a results file.

The figures of a smoke run are meaningless (tiny N, a shared machine), so nothing here asserts a
bar; it asserts that each benchmark measured what it claims to (its figures are present and
plausible) and left nothing behind (no container of the run survives it).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from bench import BENCHMARKS

pytestmark = [pytest.mark.docker, pytest.mark.consul, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CAP = 300  # seconds; the quick suite takes about a minute on an idle 2-core machine
CLEANUP_GRACE = 90  # after SIGTERM, the bench still removes its containers


async def _terminate(process: trio.Process) -> None:
    # SIGTERM lets the bench clean up (containers, condo processes, Consul keys); then kill.
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(CLEANUP_GRACE):
        await process.wait()
        return
    process.kill()


async def test_quick_suite_prints_every_benchmark(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    argv = [sys.executable, "-m", "bench", "all", "--quick", "--results", str(results)]
    with trio.move_on_after(CAP) as cap:
        done = await trio.run_process(
            argv,
            cwd=REPO,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=_terminate,
        )
    assert not cap.cancelled_caught, f"python -m bench all --quick took more than {CAP} s"
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"exit {done.returncode}\n{stderr[-4000:]}"

    lines: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            lines[record["bench"]] = record
    assert list(lines) == list(BENCHMARKS), stdout[-2000:]
    for name, record in lines.items():
        assert record["quick"] is True
        assert record["machine"]["cores"] >= 1
        assert record["machine"]["engine"], name
        assert record["bars"], f"{name} reports no bar"
        for bar in record["bars"]:
            assert isinstance(bar["value"], int | float), (name, bar)
            assert bar["met"] in (True, False), (name, bar)

    figures = {name: record["figures"] for name, record in lines.items()}
    assert 0 < figures["reaction"]["first_call_p50_ms"] <= figures["reaction"]["start_p50_ms"]
    assert figures["converge"]["n3_floor_s"] > 0
    assert figures["converge"]["n3_condo_s"] > 0
    assert figures["converge"]["n3_compose_s"] > 0
    assert figures["rolling"]["floor_s"] >= 0.9  # the first probe runs ~1 s after start
    assert figures["rolling"]["condo_s"] >= 0.9
    assert figures["idle"]["n6_rss_mb"] > 10
    assert figures["idle"]["changes"] == 3
    assert figures["idle"]["n6_first_call_p50_ms"] > 0
    assert figures["api"]["polls_ok"] == figures["api"]["polls"] == 100
    assert figures["api"]["state_req_per_s"] > 0
    assert figures["multihost"]["hosts"] == 3
    assert figures["multihost"]["answer_after_last_stable_ms"] >= 0
    assert figures["multihost"]["sim_hosts"] == 5
    assert figures["multihost"]["sim_read_bytes_per_wakeup"] > 0
    proxy = figures["proxy"]
    assert proxy["rps_proxy"] > 0 and proxy["rps_direct"] > 0
    assert proxy["bulk_proxy_mb_s"] > 0 and proxy["bulk_direct_mb_s"] > 0
    assert proxy["deploy_requests"] > 0 and proxy["kill9_requests"] > 0
    assert proxy["open"] == 20
    # CI runs as root with nft: the listener is on condo's NAT, HAProxy measured beside it.
    assert proxy["plane"] == "nat"
    assert proxy["rps_haproxy"] > 0 and proxy["bulk_haproxy_mb_s"] > 0

    text = results.read_text()
    for name in BENCHMARKS:
        assert f"<!-- bench:{name} -->" in text
        assert f"<!-- /bench:{name} -->" in text
    assert "quick (smoke) run" in text

    # Nothing of the run survives it: every container it made carried the run's label.
    (run_id,) = {record["run"] for record in lines.values()}
    leftovers = await trio.run_process(
        ["docker", "ps", "-aq", "--filter", f"label=condo-bench.run={run_id}"],
        capture_stdout=True,
        check=True,
    )
    assert leftovers.stdout.decode().split() == []

"""A second SIGTERM while condo shuts down does not kill it before its final state write.

Shutdown lets the Docker calls in flight finish (shielded) before the last write; a stop of a
container that ignores SIGTERM lasts its whole stop-timeout. The signal handlers must stay
installed until the state is written, or a second SIGTERM (an impatient operator, a process
manager repeating itself) finds the default action and kills condo: exit 143, no final write.
A real `condo run` process on the real engine.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from condo.docker import DockerClient
from tests.integration.harness import condo_files

pytestmark = pytest.mark.docker

STUBBORN = '{{:spec {{:Image "condo-test/stubborn:1" :Env ["N={n}"]}} :stop-timeout 3}}'


async def test_a_second_sigterm_during_shutdown_still_exits_0_after_the_final_write(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        async with condo_files(tmp_path, docker) as condo:
            process = await condo.spawn(nursery)
            log_path = condo.state_path.parent / f"condo-{condo.host}.log"
            condo.write("stub", STUBBORN.format(n=1))
            while '"to": "Stable"' not in log_path.read_text():
                assert process.returncode is None, "condo died"
                await trio.sleep(0.1)
            # A new spec: the old container is stopped first (:Before), which takes the whole
            # stop-timeout since it ignores SIGTERM; shutdown waits for that call to finish.
            condo.write("stub", STUBBORN.format(n=2))
            while '"why": "SpecChanged"' not in log_path.read_text():
                await trio.sleep(0.05)
            await trio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            await trio.sleep(0.5)
            assert process.returncode is None, "condo exited before its stop call finished"
            written_before = condo.state_path.stat().st_mtime_ns
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
            log = log_path.read_text()
            assert code == 0, log[-2000:]
            assert log.count('"event": "condo.signal"') == 2
            assert '"event": "condo.stopped"' in log
            assert condo.state_path.stat().st_mtime_ns > written_before  # the final write
            # The file describes what runs now, after the work shutdown let finish.
            current = condo.state_file()["services"]["stub"]["current"]
            recorded = {current["id"]} if current else set()
            assert recorded == await condo.running_ids("stub")

"""kill -9 of a real `condo run` process at bad moments, then a restart: nothing duplicated,
nothing orphaned, the interrupted deploy carried on."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from condo.docker import DockerClient
from tests.integration.harness import CondoUnderTest, condo_files

pytestmark = pytest.mark.docker

# Healthy ~`delay` seconds after start: long enough to kill condo while it waits.
SLOW_SPEC = """{{:spec {{:Image "condo-test/busybox:{tag}"
         :Cmd ["sh" "-c" "trap 'exit 0' TERM; sleep {delay}; echo ok > /ok; sleep 3600 & wait"]
         :Healthcheck {{:Test ["CMD-SHELL" "cat /ok"] :Interval 300000000 :Retries 1000}}}}
  :deploy {deploy} :health-timeout 60}}"""


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


def recorded(condo: CondoUnderTest, service: str) -> dict[str, Any] | None:
    try:
        data = json.loads(condo.state_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    record: dict[str, Any] | None = data["services"].get(service)
    return record


async def wait_recorded(
    condo: CondoUnderTest, service: str, phase: str, *, limit: float = 30, candidate: bool = False
) -> dict[str, Any]:
    """Poll the state file (the only view of a separate process) until `phase` is on disk."""
    with trio.fail_after(limit):
        while True:
            record = recorded(condo, service)
            if record is not None and record["phase"] == phase:
                has_candidate = (record["next"] or record["current"]) is not None
                if not candidate or (has_candidate and record["starting"] is None):
                    return record
            await trio.sleep(0.05)


async def assert_converges(
    condo: CondoUnderTest, service: str, *, image: str, running: int = 1, limit: float = 40
) -> dict[str, Any]:
    """The service ends Stable on `image` with exactly `running` running containers."""
    with trio.fail_after(limit):
        while True:
            record = recorded(condo, service)
            rows = await condo.containers(service)
            live = [r for r in rows if r.state == "running"]
            if (
                record is not None
                and record["phase"] == "Stable"
                and record["current"]["spec"]["spec"]["Image"] == image
                and len(live) == running
                and len(rows) == running
            ):
                assert live[0].id == record["current"]["id"]
                return record
            await trio.sleep(0.1)


async def restart(condo: CondoUnderTest, nursery: trio.Nursery) -> None:
    condo.kill9()
    assert condo.process is not None
    await condo.process.wait()
    await condo.spawn(nursery)


async def test_kill9_during_wait_adopts_the_candidate(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await condo.spawn(nursery)
    condo.write("web", SLOW_SPEC.format(tag=1, delay=4, deploy="[:Before]"))
    waiting = await wait_recorded(condo, "web", "Wait", candidate=True)
    await restart(condo, nursery)
    final = await assert_converges(condo, "web", image="condo-test/busybox:1")
    assert final["current"]["id"] == waiting["current"]["id"]  # adopted, not replaced


async def test_kill9_during_waitnext_finishes_the_deploy(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await condo.spawn(nursery)
    condo.write("web", SLOW_SPEC.format(tag=1, delay=0, deploy="[:After 0]"))
    first = await wait_recorded(condo, "web", "Stable")
    condo.write("web", SLOW_SPEC.format(tag=2, delay=4, deploy="[:After 0]"))
    waiting = await wait_recorded(condo, "web", "WaitNext", candidate=True)
    assert waiting["current"]["id"] == first["current"]["id"]
    await restart(condo, nursery)
    final = await assert_converges(condo, "web", image="condo-test/busybox:2")
    assert final["current"]["id"] == waiting["next"]["id"]


async def test_kill9_during_tryagainnext_keeps_the_old_one_serving(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await condo.spawn(nursery)
    condo.write("web", '{:spec {:Image "condo-test/healthy:1"} :deploy [:After 0]}')
    first = await wait_recorded(condo, "web", "Stable")
    condo.write("web", '{:spec {:Image "condo-test/unhealthy:1"} :deploy [:After 0]}')
    await wait_recorded(condo, "web", "TryAgainNext")
    await restart(condo, nursery)
    await trio.sleep(2)  # let the new process reconcile
    record = await wait_recorded(condo, "web", "TryAgainNext")
    assert record["current"]["id"] == first["current"]["id"]
    rows = await condo.containers("web")
    assert [r.id for r in rows if r.state == "running"] == [first["current"]["id"]]
    assert len(rows) <= 2  # the stable one and at most the latest failed candidate
    condo.write("web", '{:spec {:Image "condo-test/healthy:2"} :deploy [:After 0]}')
    await assert_converges(condo, "web", image="condo-test/healthy:2")


async def test_kill9_at_random_moments_never_duplicates(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    rng = random.Random(7)
    await condo.spawn(nursery)
    tag = 1
    for _ in range(6):
        tag = 3 - tag
        condo.write("web", SLOW_SPEC.format(tag=tag, delay=1, deploy="[:After 0]"))
        await trio.sleep(rng.uniform(0.0, 1.5))
        await restart(condo, nursery)
    await assert_converges(condo, "web", image=f"condo-test/busybox:{tag}", limit=60)


async def test_sigterm_leaves_workloads_running_and_exits_0(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    process = await condo.spawn(nursery)
    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
    stable = await wait_recorded(condo, "web", "Stable")
    process.terminate()
    with trio.fail_after(15):
        assert await process.wait() == 0
    assert [r.id for r in await condo.containers("web") if r.state == "running"] == [
        stable["current"]["id"]
    ]


async def test_stop_on_exit_stops_and_removes_workloads(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    process = await condo.spawn(nursery, "--stop-on-exit")
    condo.write("web", '{:spec {:Image "condo-test/busybox:1"} :stop-timeout 2}')
    await wait_recorded(condo, "web", "Stable")
    process.terminate()
    with trio.fail_after(20):
        assert await process.wait() == 0
    assert await condo.containers("web") == []


async def test_a_corrupt_state_file_is_moved_aside_and_containers_adopted(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    process = await condo.spawn(nursery)
    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
    stable = await wait_recorded(condo, "web", "Stable")
    condo.kill9()
    await process.wait()
    condo.state_path.write_text('{"services": {"web": [tr')  # torn, not JSON
    await condo.spawn(nursery)
    final = await assert_converges(condo, "web", image="condo-test/busybox:1")
    assert final["current"]["id"] == stable["current"]["id"]
    aside = list(condo.state_path.parent.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text() == '{"services": {"web": [tr'

"""Several condos (different --host names, one engine, one Consul, one prefix) and the global
picture they share: rollouts across hosts, a host killed with SIGKILL and restarted, and a Consul
outage (the real agent SIGSTOPped, then SIGCONTed) while supervision goes on.

Every condo's containers carry its unique host label and are removed at teardown (harness); the
prefix and its sessions are removed by `consul_area`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from condo.config import Config
from condo.consul import SESSION_TTL
from condo.docker import DockerClient
from condo.run import Running, run_condo
from condo.waiting import Picture, StateSource, evaluate
from tests.consul_support import until_pictured
from tests.integration.harness import CondoUnderTest
from tests.integration.several import condos
from tests.integration.test_consul_session import Area, consul_area, image_of

pytestmark = [pytest.mark.docker, pytest.mark.consul]

HEALTHY = "condo-test/healthy:{}"
BUSYBOX = "condo-test/busybox:{}"
# Consul invalidates a session between TTL and 2 x TTL after its last renewal.
GONE_LIMIT = SESSION_TTL * 2 + 5
CATCH_UP = 2.0  # how soon after Consul's return (or a restart) the picture must be whole again
RESTART_LIMIT = 20.0  # a spawned condo's interpreter start-up on a busy machine, and then some


def spec(image: str) -> str:
    return f'{{:spec {{:Image "{image}"}}}}'


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


def exposing(under_test: CondoUnderTest, area: Area) -> Config:
    return attrs.evolve(under_test.config(), expose="consul", consul_prefix=area.prefix)


async def start(nursery: trio.Nursery, under_test: CondoUnderTest, area: Area) -> StateSource:
    running: Running = await nursery.start(functools.partial(run_condo, exposing(under_test, area)))
    under_test.running = running
    assert running.global_source is not None
    return running.global_source


def spawn_args(area: Area) -> tuple[str, ...]:
    return ("--expose", "consul", "--consul-prefix", area.prefix)


def all_on(picture: Picture, service: str, image: str, hosts: list[CondoUnderTest]) -> bool:
    return all(image_of(picture, service, h.host) == image for h in hosts)


async def test_without_expose_there_is_no_global_source(
    tmp_path: Path, docker: DockerClient
) -> None:
    with trio.fail_after(30):
        async with condos(tmp_path, docker, 1) as (only,), trio.open_nursery() as nursery:
            running: Running = await nursery.start(functools.partial(run_condo, only.config()))
            assert running.config.expose == "none"
            assert running.global_source is None
            nursery.cancel_scope.cancel()


async def test_three_hosts_one_picture_done_only_when_the_last_is_stable(
    tmp_path: Path, docker: DockerClient, area: Area
) -> None:
    old, new = HEALTHY.format(1), HEALTHY.format(2)
    with trio.fail_after(120):
        async with condos(tmp_path, docker, 3) as hosts, trio.open_nursery() as nursery:
            sources = []
            for under_test in hosts:
                under_test.write("web", spec(old))
                sources.append(await start(nursery, under_test, area))
            source = sources[0]
            picture = await until_pictured(source, lambda p: all_on(p, "web", old, hosts))
            assert set(picture.hosts) == {h.host for h in hosts}
            for other in sources[1:]:  # every host sees every host
                await until_pictured(other, lambda p: all_on(p, "web", old, hosts))
            verdict = evaluate("web", new, picture.hosts)
            assert not verdict.done and set(verdict.pending) == {h.host for h in hosts}

            # Every picture from here on is judged; none may say "done" before the last host
            # is Stable on the new image (measured by a synchronous store listener: exact).
            last = hosts[2]
            assert last.running is not None
            store = last.running.store
            last_stable_at: list[float] = []

            def on_change() -> None:
                service = store.view()["services"].get("web") or {}
                image = (service.get("current") or {}).get("image")
                if not last_stable_at and service.get("state") == "Stable" and image == new:
                    last_stable_at.append(trio.current_time())

            store.subscribe(on_change)
            verdicts: list[tuple[float, bool]] = []
            done_seen = trio.Event()

            async def judge() -> None:
                token = -1
                while True:
                    picture = source.picture()
                    if picture.token != token:
                        token = picture.token
                        done = evaluate("web", new, picture.hosts).done
                        verdicts.append((trio.current_time(), done))
                        if done:
                            done_seen.set()
                            return
                    await source.wait_beyond(token)

            nursery.start_soon(judge)
            for under_test in hosts[:2]:
                under_test.write("web", spec(new))
                await under_test.wait_state("web", "Stable", image=new)
            picture = await until_pictured(source, lambda p: all_on(p, "web", new, hosts[:2]))
            verdict = evaluate("web", new, picture.hosts)
            assert not verdict.done
            assert set(verdict.pending) == {last.host}
            assert verdict.pending[last.host]["image"] == old

            last.write("web", spec(new))
            await done_seen.wait()
            (stable_at,) = last_stable_at
            done_at = max(at for at, done in verdicts if done)
            assert all(not done for at, done in verdicts if at < stable_at)
            assert done_at >= stable_at
            # A store change, one PUT, one blocking read: ~10 ms here when the machine is idle;
            # the bound leaves room for a busy CI machine.
            assert done_at - stable_at < 1.0
            nursery.cancel_scope.cancel()


async def test_a_killed_host_leaves_the_picture_and_a_restarted_one_comes_back_at_once(
    tmp_path: Path, docker: DockerClient, area: Area
) -> None:
    image = BUSYBOX.format(1)
    with trio.fail_after(180):
        async with (
            condos(tmp_path, docker, 2) as (victim, survivor),
            trio.open_nursery() as nursery,
        ):
            for under_test in (victim, survivor):
                under_test.write("web", spec(image))
            source = await start(nursery, survivor, area)
            await victim.spawn(nursery, *spawn_args(area))
            with trio.fail_after(30):
                picture = await until_pictured(
                    source, lambda p: all_on(p, "web", image, [victim, survivor])
                )
            verdict = evaluate("web", image, picture.hosts)
            assert verdict.done and set(verdict.hosts) == {victim.host, survivor.host}

            # kill -9: no clean shutdown, the session just stops being renewed.
            process = victim.process
            assert process is not None
            victim.kill9()
            killed_at = trio.current_time()
            await process.wait()
            with trio.fail_after(GONE_LIMIT):
                picture = await until_pictured(source, lambda p: victim.host not in p.hosts)
            assert trio.current_time() - killed_at <= GONE_LIMIT
            verdict = evaluate("web", image, picture.hosts)
            assert verdict.done and verdict.hosts == (survivor.host,)  # no longer counted

            # Restarted: it republishes at once, not at its service's next transition.
            await victim.spawn(nursery, *spawn_args(area))
            with trio.fail_after(RESTART_LIMIT):
                await until_pictured(source, lambda p: image_of(p, "web", victim.host) == image)
            back_after = time.time() - consul_started_at(victim)

            # Killed and restarted at once: the predecessor's session still holds the key; the
            # successor takes it over instead of waiting up to 2 x TTL for Consul to expire it.
            key = f"{area.prefix}/web/{victim.host}"
            before = (await area.keys())[key]["Session"]
            process = victim.process
            assert process is not None
            victim.kill9()
            await process.wait()
            await victim.spawn(nursery, *spawn_args(area))

            def taken_over(keys: dict[str, dict[str, Any]]) -> bool:
                entry = keys.get(key)
                if entry is None or entry["Session"] in (None, before):
                    return False
                state = entry["Value"]["state"]
                return bool(state["state"] == "Stable" and state["current"]["image"] == image)

            with trio.fail_after(RESTART_LIMIT):
                await area.until_keys(taken_over)
            taken_over_after = time.time() - consul_started_at(victim)
            assert before not in await area.sessions()
            # From condo's own start (its log), so the interpreter's start-up does not count.
            assert back_after < CATCH_UP, back_after
            assert taken_over_after < CATCH_UP, taken_over_after
            nursery.cancel_scope.cancel()


def consul_started_at(under_test: CondoUnderTest) -> float:
    """Wall-clock time of the latest `consul.started` in a spawned condo's JSON log."""
    # The harness names the file (condo-<host>.log); any condo*.log in the folder is its.
    lines = [
        line
        for path in under_test.state_path.parent.glob("condo*.log")
        for line in path.read_text().splitlines()
        if '"consul.started"' in line
    ]
    assert lines, "the spawned condo never logged consul.started"
    stamps = [datetime.datetime.fromisoformat(json.loads(line)["timestamp"]) for line in lines]
    return max(stamps).timestamp()


async def consul_agent_pid() -> int:
    result = await trio.run_process(
        ["pgrep", "-f", "consul agent -dev"], capture_stdout=True, check=False
    )
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 1, f"expected one Consul dev agent, found {pids} (run scripts/test-env)"
    return pids[0]


@pytest.mark.parametrize(
    "outage", [10.0, pytest.param(30.0, marks=pytest.mark.slow, id="30s-sessions-expire")]
)
async def test_consul_outage_supervision_goes_on_and_the_picture_heals(
    tmp_path: Path, docker: DockerClient, area: Area, outage: float
) -> None:
    old, new = BUSYBOX.format(1), BUSYBOX.format(2)
    with trio.fail_after(60 + outage):
        async with (
            condos(tmp_path, docker, 2) as (changing, steady),
            trio.open_nursery() as nursery,
        ):
            sources = []
            for under_test in (changing, steady):
                under_test.write("web", spec(old))
                sources.append(await start(nursery, under_test, area))
            both = [changing, steady]
            for source in sources:
                await until_pictured(source, lambda p: all_on(p, "web", old, both))

            pid = await consul_agent_pid()
            # SIGSTOP: the agent is unreachable but keeps its data (a restarted dev agent would
            # lose everything). SIGCONT in `finally`, whatever happens to the test.
            os.kill(pid, signal.SIGSTOP)
            stopped_at = trio.current_time()
            try:
                changing.write("web", spec(new))
                await changing.wait_state("web", "Stable", image=new, limit=outage - 1)
                deployed_after = trio.current_time() - stopped_at
                # Nobody could tell Consul: the picture still has the old image, stale soon.
                assert image_of(sources[0].picture(), "web", changing.host) == old
                await trio.sleep_until(stopped_at + outage)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_at = trio.current_time()
            assert deployed_after < outage

            for source in sources:
                with trio.fail_after(CATCH_UP + 1):
                    await until_pictured(
                        source,
                        lambda p: (
                            image_of(p, "web", changing.host) == new
                            and image_of(p, "web", steady.host) == old
                        ),
                    )
                whole_after = trio.current_time() - resumed_at
                assert whole_after < CATCH_UP, whole_after
            keys = await area.keys()
            assert set(keys) == {f"{area.prefix}/web/{h.host}" for h in both}
            assert all(entry["Session"] for entry in keys.values())
            nursery.cancel_scope.cancel()

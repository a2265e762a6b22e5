"""Multi-host truth (issue 16) on a real Consul cluster: `condo wait`, `/v1/wait_for` and
`/v1/global_state` never report success for a host they cannot see.

Each simulated host is a real `condo run` process with `--expose consul` on its own client agent
of the cluster (tests/integration/cluster.py: 3 servers on 127.0.0.2-4, clients on 127.0.0.11..),
all on one engine, under a prefix unique to the test. The cases: a host cut off by a partition,
a condo killed with -9, a client agent killed and restarted, the leader server stopped during a
rollout, `condo forget` of a decommissioned host, and a restarting condo that must never flash
`Init`. Each prints its figures (run with `-s`): partition -> unreachable seen, heal -> done,
agent restart -> whole, election -> done.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from condo.docker import DockerClient
from tests.integration.cluster import ConsulCluster
from tests.integration.harness import CondoUnderTest, free_port
from tests.integration.several import condos
from tests.integration.test_wait_cli import SPEC, condo_cli, stable_on

pytest_plugins = ["tests.integration.cluster_fixtures"]
pytestmark = [pytest.mark.docker, pytest.mark.consul, pytest.mark.slow]

OLD, NEW = "condo-test/busybox:1", "condo-test/busybox:2"
CASE_LIMIT = 90  # seconds for one case, set-up and teardown included (each takes ~20-50 s)
STABLE_LIMIT = 30.0  # a spec written -> Stable (an interpreter start on a busy machine included)
# Consul invalidates a dead condo's session between TTL (10 s) and 2 x TTL after its last renewal.
SESSION_GONE_LIMIT = 30.0
FAILED_LIMIT = 20.0  # an agent cut off or killed -> the servers invalidate its node's sessions
STALE_LIMIT = 15.0  # cut off -> the cut host's own picture says stale (measured 6-12 s)


@attrs.define
class Host:
    """One simulated host: a condo's files, its API port and its own client agent."""

    files: CondoUnderTest
    agent: str  # the client agent's address (its HTTP API is on agent:8500)
    prefix: str
    port: int = attrs.field(factory=free_port)

    @property
    def name(self) -> str:
        return self.files.host

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        await self.files.spawn(
            nursery,
            "--expose", "consul", "--consul-prefix", self.prefix,
            "--consul-endpoint", ConsulCluster.http(self.agent),
            server=f"127.0.0.1:{self.port}",
        )  # fmt: skip
        await self.until("/v1/state", lambda body: True)  # the API answers

    async def stop(self) -> None:
        """SIGTERM (a clean stop: the session is destroyed, the containers stay)."""
        process = self.files.process
        assert process is not None
        process.terminate()
        await process.wait()

    def write(self, image: str, delay: int = 0) -> None:
        self.files.write("web", SPEC.format(image=image, delay=delay))

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(self.url + path, params=params)
            return response.status_code, response.json()

    async def until(self, path: str, predicate: Callable[[Any], bool], limit: float = 60) -> Any:
        """Poll `path` until its JSON answer satisfies `predicate`; returns that answer."""
        with trio.fail_after(limit):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    _, body = await self.get(path)
                    if predicate(body):
                        return body
                await trio.sleep(0.1)

    async def until_stable(self, image: str) -> dict[str, Any]:
        body = await self.until("/v1/state", lambda b: stable_on(b, image), STABLE_LIMIT)
        service: dict[str, Any] = body["services"]["web"]
        return service

    async def wait_for(self, image: str, seconds: float) -> tuple[int, Any]:
        """`/v1/wait_for` with `timeout=seconds` (condo's own limit, answered as a timeout)."""
        return await self.get("/v1/wait_for", name="web", image=image, timeout=seconds)

    async def condo_wait(self, image: str, seconds: float) -> tuple[int, str, str, float]:
        return await condo_cli(
            "wait", "--name", "web", "--image", image, "--timeout", f"{seconds:g}",
            "--url", self.url,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery, count: int
) -> AsyncIterator[list[Host]]:
    """`count` hosts (host i on client agent i), each Stable on OLD, every one live in every
    picture; the prefix is removed at the end."""
    prefix = f"condo-test/{uuid.uuid4().hex[:10]}"
    try:
        async with condos(tmp_path, docker, count) as every:
            made = [
                Host(files, agent, prefix)
                for files, agent in zip(every, cluster.clients, strict=False)
            ]
            assert len(made) == count, "the cluster has fewer client agents than hosts"
            for host in made:
                host.write(OLD)
                await host.start(nursery)
            names = {host.name for host in made}
            for host in made:
                await host.until_stable(OLD)
                await host.until("/v1/global_state", lambda g: live_hosts(g) == names, 20)
            yield made
    finally:
        with trio.move_on_after(10, shield=True):  # cleanup even when the test was cancelled
            async with httpx.AsyncClient(base_url=cluster.http(cluster.clients[-1])) as http:
                await http.delete(f"/v1/kv/{prefix}", params={"recurse": "true"})


def live_hosts(global_state: Any) -> set[str]:
    return {name for name, body in global_state["hosts"].items() if body["live"]}


def unreachable(host: Host) -> Callable[[Any], bool]:
    def seen(global_state: Any) -> bool:
        body = global_state["hosts"].get(host.name)
        return body is not None and body["live"] is False

    return seen


def assert_unreachable_pending(answer: tuple[int, Any], host: Host, image: str) -> None:
    """A `/v1/wait_for` timeout naming `host` unreachable, last seen running `image` Stable."""
    status, body = answer
    assert status == 500 and body["status"] == "timeout", body
    assert "stale" not in body, body
    pending = body["pending"][host.name]
    assert pending == {
        "state": "unreachable",
        "since": pending["since"],
        "image": image,
        "last_state": "Stable",
    }, pending
    assert isinstance(pending["since"], float) and pending["since"] <= time.time()
    assert host.name in body["hosts"]


def assert_stale_no_verdict(answer: tuple[int, Any]) -> None:
    """A `/v1/wait_for` timeout from a stale picture: no ok, and it says why."""
    status, body = answer
    assert status == 500 and body["status"] == "timeout", body
    assert body["stale"] is True, body
    assert isinstance(body["read_at"], float) and body["read_at"] < time.time()
    assert "stale" in body["error"], body


async def test_a_cut_off_host_is_unreachable_not_done_and_its_own_picture_is_stale(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 3) as (cut, one, two):
            async with cluster.partition(cut.agent):
                cut_at = time.monotonic()
                for host in (one, two):  # the others move on; the cut host stays on OLD
                    host.write(NEW)
                for host in (one, two):
                    await host.until_stable(NEW)
                code, _, err, _ = await one.condo_wait(NEW, 2)
                assert code == 1 and cut.name in err, err

                # Its session goes with its node (the servers mark it failed): unreachable.
                seen = await one.until("/v1/global_state", unreachable(cut), FAILED_LIMIT)
                unreachable_after = time.monotonic() - cut_at
                assert seen["stale"] is False
                assert seen["hosts"][cut.name]["services"] == {}
                assert seen["hosts"][cut.name]["runs"] == {"web": {"state": "Stable", "image": OLD}}
                assert_unreachable_pending(await one.wait_for(NEW, 1), cut, OLD)
                code, _, err, _ = await two.condo_wait(NEW, 2)
                assert code == 1 and f"{cut.name}=unreachable since" in err, err

                # The cut host itself: a stale picture (every host on OLD in it), no verdict.
                mine = await cut.until("/v1/global_state", lambda g: g["stale"], FAILED_LIMIT)
                stale_after = time.monotonic() - cut_at
                # Up to ~10 s: its next session renewal (every 5 s) gets no answer in 5 s. A
                # blocking read in flight hangs for its whole wait, so it cannot tell sooner.
                assert stale_after < STALE_LIMIT, stale_after
                assert mine["read_at"] < time.time()
                assert live_hosts(mine) == {cut.name, one.name, two.name}
                assert_stale_no_verdict(await cut.wait_for(OLD, 1))

                # Supervision stays local: the cut host deploys a new spec on its own.
                cut.write(NEW)
                await cut.until_stable(NEW)
                assert_stale_no_verdict(await cut.wait_for(NEW, 1))
                assert_unreachable_pending(await one.wait_for(NEW, 1), cut, OLD)

            healed_at = time.monotonic()
            await cluster.rejoin(cut.agent)
            code, out, err, _ = await one.condo_wait(NEW, 30)
            done_after = time.monotonic() - healed_at
            assert code == 0, err
            assert "on 3 host(s)" in out
            mine = await cut.until("/v1/global_state", lambda g: not g["stale"], 10)
            assert live_hosts(mine) == {cut.name, one.name, two.name}
            status, body = await cut.wait_for(NEW, 10)
            assert status == 200 and sorted(body["hosts"]) == sorted((cut.name, one.name, two.name))
    print(
        f"\n[truth] partition -> unreachable seen {unreachable_after:.1f}s,"
        f" own picture stale {stale_after:.1f}s; heal + rejoin -> done {done_after:.1f}s"
    )


async def test_a_killed_condo_is_not_done_until_it_comes_back(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 2) as (steady, killed):
            process = killed.files.process
            assert process is not None
            killed.files.kill9()
            await process.wait()
            killed_at = time.monotonic()
            for host in (steady, killed):
                host.write(NEW)
            await steady.until_stable(NEW)
            # Its keys are still held (the session is not expired yet): Stable on OLD, pending.
            code, _, err, _ = await steady.condo_wait(NEW, 2)
            assert code == 1 and killed.name in err, err

            seen = await steady.until("/v1/global_state", unreachable(killed), SESSION_GONE_LIMIT)
            unreachable_after = time.monotonic() - killed_at
            assert seen["hosts"][killed.name]["runs"] == {"web": {"state": "Stable", "image": OLD}}
            assert_unreachable_pending(await steady.wait_for(NEW, 1), killed, OLD)
            code, _, err, _ = await steady.condo_wait(NEW, 2)
            assert code == 1 and f"{killed.name}=unreachable since" in err, err

            restarted_at = time.monotonic()
            await killed.start(nursery)
            code, out, err, _ = await steady.condo_wait(NEW, 30)
            done_after = time.monotonic() - restarted_at
            assert code == 0, err
            assert "on 2 host(s)" in out
            assert stable_on((await killed.get("/v1/state"))[1], NEW)
    print(
        f"\n[truth] condo kill -9 -> unreachable seen {unreachable_after:.1f}s;"
        f" restart -> done {done_after:.1f}s"
    )


async def test_a_dead_agent_makes_its_host_unreachable_and_its_picture_stale(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 2) as (steady, orphan):
            await cluster.kill_agent(orphan.agent)
            killed_at = time.monotonic()
            # Its condo cannot read Consul any more: a stale picture, no verdict, even though
            # both hosts really are Stable on OLD.
            mine = await orphan.until("/v1/global_state", lambda g: g["stale"], 10)
            stale_after = time.monotonic() - killed_at
            assert live_hosts(mine) == {steady.name, orphan.name}
            assert_stale_no_verdict(await orphan.wait_for(OLD, 1))

            seen = await steady.until("/v1/global_state", unreachable(orphan), FAILED_LIMIT)
            unreachable_after = time.monotonic() - killed_at
            assert seen["hosts"][orphan.name]["runs"] == {"web": {"state": "Stable", "image": OLD}}
            # It does run OLD, Stable; but nobody can see it, so the wait is not done.
            assert_unreachable_pending(await steady.wait_for(OLD, 1), orphan, OLD)
            code, _, err, _ = await steady.condo_wait(OLD, 2)
            assert code == 1 and f"{orphan.name}=unreachable since" in err, err

            restarted_at = time.monotonic()
            await cluster.start_agent(orphan.agent)
            names = {steady.name, orphan.name}
            for host in (steady, orphan):
                await host.until(
                    "/v1/global_state", lambda g: not g["stale"] and live_hosts(g) == names, 30
                )
            whole_after = time.monotonic() - restarted_at
            for host in (steady, orphan):
                status, body = await host.wait_for(OLD, 5)
                assert status == 200 and sorted(body["hosts"]) == sorted(names), body
    print(
        f"\n[truth] agent kill -9 -> own picture stale {stale_after:.1f}s, unreachable seen"
        f" {unreachable_after:.1f}s; agent restart -> whole {whole_after:.1f}s"
    )


async def test_a_leader_election_during_a_rollout_gives_no_false_answer(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 3) as hosts:
            leader = await cluster.leader()
            assert leader is not None
            # The hosts turn Stable on NEW 0, 2 and 5 s after their spec changes.
            for host, delay in zip(hosts, (0, 2, 5), strict=True):
                host.write(NEW, delay)
            await cluster.stop_server(leader.split(":")[0])
            stopped_at = time.monotonic()
            async with trio.open_nursery() as waits:
                ended: list[tuple[int, str, str, float]] = []

                async def wait_through(host: Host) -> None:
                    ended.append(await host.condo_wait(NEW, 60))

                for host in hosts:
                    waits.start_soon(wait_through, host)
                new = await cluster.wait_leader(via=hosts[0].agent, other_than=leader)
                election = time.monotonic() - stopped_at
            elected_at = stopped_at + election
            done_after = time.monotonic() - elected_at
            stable_at = []
            for host in hosts:
                _, state = await host.get("/v1/state")
                assert stable_on(state, NEW), state
                stable_at.append(state["services"]["web"]["current"]["stable_at"])
            for code, out, err, at in ended:
                assert code == 0, err
                assert "on 3 host(s)" in out
                # No false answer: never before the last host really was Stable on NEW.
                assert at >= max(stable_at), (at, stable_at)
            lag = max(at for *_, at in ended) - max(stable_at)
            await cluster.start_server(leader.split(":")[0])
    print(
        f"\n[truth] leader {leader} stopped -> new leader {new} in {election:.1f}s;"
        f" election -> rollout's wait done {done_after:.1f}s ({lag:.2f}s after the last host"
        " turned Stable)"
    )


async def test_forget_is_refused_while_live_and_then_the_wait_counts_the_rest(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 2) as (kept, gone):
            code, _, err, _ = await condo_cli("forget", gone.name, "--url", kept.url)
            assert code == 2 and "live" in err, err
            async with httpx.AsyncClient() as client:
                response = await client.delete(f"{kept.url}/v1/hosts/{gone.name}")
            assert response.status_code == 409 and "live" in response.json()["error"]

            await gone.stop()  # decommissioned: its session is destroyed, its record stays
            seen = await kept.until("/v1/global_state", unreachable(gone), 10)
            assert seen["hosts"][gone.name]["runs"] == {"web": {"state": "Stable", "image": OLD}}
            kept.write(NEW)
            await kept.until_stable(NEW)
            code, _, err, _ = await kept.condo_wait(NEW, 2)
            assert code == 1 and f"{gone.name}=unreachable since" in err, err

            code, out, err, _ = await condo_cli("forget", gone.name, "--url", kept.url)
            assert code == 0, err
            assert f"forgot {gone.name}" in out
            _, state = await kept.get("/v1/global_state")
            assert set(state["hosts"]) == {kept.name}
            code, out, err, _ = await kept.condo_wait(NEW, 5)
            assert code == 0, err
            assert "on 1 host(s)" in out
            async with httpx.AsyncClient() as client:
                response = await client.delete(f"{kept.url}/v1/hosts/{gone.name}")
            assert response.status_code == 404, response.text


async def test_a_restarting_condo_never_publishes_init_nor_lets_a_wait_pass(
    tmp_path: Path, docker: DockerClient, cluster: ConsulCluster, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CASE_LIMIT):
        async with fleet(tmp_path, docker, cluster, nursery, 2) as (other, restarting):
            other.write(NEW)
            await other.until_stable(NEW)
            key = f"{restarting.prefix}/web/{restarting.name}"
            values: list[tuple[str | None, str | None]] = []  # (state, session) of each read
            answers: list[tuple[int, Any]] = []
            back = trio.Event()
            async with trio.open_nursery() as watchers:
                first_read = trio.Event()
                watchers.start_soon(watch_key, cluster.http(other.agent), key, values, first_read)
                await first_read.wait()
                assert values[0][0] == "Stable", values
                watchers.start_soon(ask_until, other, back, answers)

                await restarting.stop()
                await restarting.start(nursery)
                service = await restarting.until_stable(OLD)

                def republished() -> bool:
                    state, session = values[-1]
                    return state == "Stable" and session not in (None, values[0][1])

                with trio.fail_after(15):
                    while not republished():
                        await trio.sleep(0.05)
                back.set()
                await trio.sleep(1)  # a flash right after the republish would show by now
                watchers.cancel_scope.cancel()
            states = [state for state, _ in values]
            assert "Init" not in states, values
            assert None in states, values  # the clean stop deleted the key (session destroyed)
            assert service["current"]["image"] == OLD
            assert answers, "no /v1/wait_for was answered during the restart"
            for status, body in answers:
                assert status == 500 and body["status"] == "timeout", body
                assert restarting.name in body["pending"], body
            pending_states = {body["pending"][restarting.name]["state"] for _, body in answers}
            print(f"\n[truth] restart: key values {states}; wait_for pending {pending_states}")


async def watch_key(
    consul: str, key: str, values: list[tuple[str | None, str | None]], first: trio.Event
) -> None:
    """Follow `key` with blocking queries; append (state or None when absent, session) on each
    change of its ModifyIndex (or its absence)."""
    index = 0
    last: tuple[int, bool] | None = None
    async with httpx.AsyncClient(base_url=consul, timeout=15) as http:
        while True:
            params = {"index": str(index), "wait": "5s"} if index else {}
            response = await http.get(f"/v1/kv/{key}", params=params)
            index = int(response.headers["X-Consul-Index"])
            if response.status_code == 404:
                seen: tuple[int, bool] = (0, False)
                value: tuple[str | None, str | None] = (None, None)
            else:
                response.raise_for_status()
                entry = response.json()[0]
                seen = (entry["ModifyIndex"], True)
                document = json.loads(base64.b64decode(entry["Value"]))
                value = (document["state"]["state"], entry.get("Session"))
            if seen != last:
                last = seen
                values.append(value)
                first.set()


async def ask_until(host: Host, done: trio.Event, answers: list[tuple[int, Any]]) -> None:
    """Ask `/v1/wait_for` NEW through `host`, 0.5 s at a time, until `done`."""
    while not done.is_set():
        answers.append(await host.wait_for(NEW, 0.5))

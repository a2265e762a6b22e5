"""Restarts in odd states, on the real engine: each test attacks one promise of recovery.

- a state file of another `--host` never makes condo touch that host's containers;
- a spec removed or changed while condo was down never deploys its obsolete version;
- a deadline that passed while condo was down never loses the start-up reconciliation;
- a lost state file never removes what serves before its replacement is Stable;
- a slow engine (answers after condo's limits, through a delaying proxy in front of the real
  socket) never leaves a container running unknown, nor a stopped one counted as serving.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pytest
import trio

from condo import fsm, labels, service
from condo.docker import ContainerEvent, DockerClient
from condo.fsm import Phase
from tests.integration.harness import (
    CondoUnderTest,
    condo_files,
    remove_host_containers,
    running_condo,
)
from tests.integration.sockets import unix_listener

pytestmark = pytest.mark.docker

HEALTHY = """{{:spec {{:Image "condo-test/healthy:{tag}"}} :deploy {deploy} :stop-timeout 1}}"""
SLEEPER = """{{:spec {{:Image "condo-test/busybox:{tag}"}} :deploy {deploy} :stop-timeout 1}}"""


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


@attrs.define
class EventLog:
    """Every event of one host's containers on the engine, from before condo acts."""

    events: list[ContainerEvent] = attrs.Factory(list)

    def of(self, action: str) -> list[ContainerEvent]:
        return [e for e in self.events if e.action == action]


@contextlib.asynccontextmanager
async def engine_events(docker: DockerClient, host: str) -> AsyncIterator[EventLog]:
    log = EventLog()
    actions = ("create", "start", "die", "destroy", "health_status")
    async with trio.open_nursery() as nursery:
        opened = trio.Event()

        async def listen() -> None:
            async with docker.open_event_stream(
                labels=labels.owned_by(host), actions=actions
            ) as stream:
                opened.set()
                async for event in stream:
                    log.events.append(event)

        nursery.start_soon(listen)
        await opened.wait()
        yield log
        await trio.sleep(0.3)  # the engine's last events reach us
        nursery.cancel_scope.cancel()


async def restart_state(condo: CondoUnderTest, edit: Callable[[dict[str, object]], None]) -> None:
    data = condo.state_file()
    edit(data)
    condo.state_path.write_text(json.dumps(data))


async def test_a_state_file_of_another_host_never_touches_its_containers(
    condo: CondoUnderTest, docker: DockerClient
) -> None:
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
    # Another condo (--host b) is started on the same --state path and spec directory.
    other = attrs.evolve(condo, host=f"{condo.host}-b", running=None, process=None)
    try:
        with trio.fail_after(60):
            async with running_condo(other):
                await other.wait_state("web", "Stable")
                await trio.sleep(1)  # time for a wrong removal to show
        mine = await docker.inspect(first["current"]["id"])
        assert mine.running, "the other host's condo stopped this host's container"
        assert mine.labels[labels.HOST] == condo.host
        [aside] = condo.state_path.parent.glob("state.json.foreign-*")
        assert json.loads(aside.read_text())["host"] == condo.host
        assert other.state_file()["host"] == other.host
    finally:
        with trio.move_on_after(30, shield=True):
            await remove_host_containers(docker, other.host)


@pytest.mark.parametrize("change", ["removed", "changed"])
async def test_a_spec_changed_while_condo_was_down_never_deploys_its_old_version(
    condo: CondoUnderTest, docker: DockerClient, change: str
) -> None:
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
        # While condo is down: its container goes, and the spec is removed or changed.
        await docker.remove(first["current"]["id"])
        if change == "removed":
            condo.remove("web")
        else:
            condo.write("web", SLEEPER.format(tag=2, deploy="[:Before]"))
        async with engine_events(docker, condo.host) as seen, running_condo(condo):
            if change == "removed":
                # Its driver starts from the record, retires what is left, and ends.
                await condo.wait(lambda view: "web" in view["services"])
                await condo.wait(lambda view: "web" not in view["services"])
            else:
                await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
    created = [e.attributes.get("image") for e in seen.of("create")]
    assert created == ([] if change == "removed" else ["condo-test/busybox:2"])


async def test_a_deadline_that_passed_while_condo_was_down_still_reconciles(
    condo: CondoUnderTest, docker: DockerClient, container_labels: dict[str, str]
) -> None:
    condo.write("web", '{:spec {:Image "condo-test/exits:1"} :stop-timeout 1}')
    with trio.fail_after(90):
        async with running_condo(condo):
            await condo.wait_state("web", "TryAgain")

        # While condo is down: its retry time passes, and a labelled container it does not
        # know appears (as one created just before a kill -9 would).
        def overdue(data: dict[str, object]) -> None:
            services = data["services"]
            assert isinstance(services, dict)
            services["web"]["deadline_at"] = time.time() - 5

        await restart_state(condo, overdue)
        stray = await docker.create(
            {
                "Image": "condo-test/busybox:1",
                "Labels": {**container_labels, **labels.for_container(condo.host, "web", "x")},
            },
            name=f"{condo.host}-stray",
        )
        await docker.start(stray)
        async with running_condo(condo):
            while stray in {c.id for c in await condo.containers("web")}:
                await trio.sleep(0.1)


@pytest.mark.parametrize("strategy", ["[:After 0]", "[:Before]"])
async def test_a_lost_state_file_keeps_the_serving_container_until_replaced(
    condo: CondoUnderTest, docker: DockerClient, strategy: str
) -> None:
    condo.write("web", HEALTHY.format(tag=1, deploy=strategy))
    with trio.fail_after(90):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
        old = first["current"]["id"]
        condo.state_path.unlink()
        condo.write("web", HEALTHY.format(tag=2, deploy=strategy))
        async with engine_events(docker, condo.host) as seen, running_condo(condo):
            await condo.wait_state("web", "Stable", image="condo-test/healthy:2")
            await condo.wait(lambda _: True)
            while old in {c.id for c in await condo.containers("web")}:
                await trio.sleep(0.1)
    died = [e for e in seen.of("die") if e.container_id == old]
    assert died, "the old container was never stopped"
    if strategy == "[:After 0]":
        # Replaced beside it: the new one was healthy before the old one stopped.
        healthy = [e for e in seen.of("health_status") if e.health == "healthy"]
        assert healthy and healthy[0].time_nano < died[0].time_nano
    else:
        # Stopped by the deploy (its stop-timeout, a SIGTERM first), never killed as a stray
        # before anything was ready to replace it: nothing was created before it died.
        created = seen.of("create")
        assert created and died[0].time_nano < created[0].time_nano
        assert died[0].attributes.get("exitCode") != "137"  # it got its SIGTERM, not a SIGKILL


# --- a slow engine: the real one behind a proxy that delays chosen answers ------------------


@attrs.define
class DelayingProxy:
    """A unix-socket proxy to the real engine that holds back the answer to the next
    `armed` requests whose first line matches `pattern` (the engine has acted by then)."""

    socket_path: Path
    pattern: bytes = b""
    armed: int = 0
    delay: float = 0.0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await unix_listener(self.socket_path)
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._relay, [listener], handler_nursery=nursery)

    async def _relay(self, client: trio.abc.Stream) -> None:
        engine = await trio.open_unix_socket("/var/run/docker.sock")
        held = trio.Semaphore(0)  # one release per answer to hold back

        async def upstream() -> None:
            async for chunk in client:
                first_line = chunk.split(b"\r\n", 1)[0]
                if self.armed > 0 and self.pattern in first_line:
                    self.armed -= 1
                    held.release()
                await engine.send_all(chunk)
            await engine.send_eof()

        async def downstream() -> None:
            async for chunk in engine:
                if held.value > 0:
                    await held.acquire()
                    await trio.sleep(self.delay)
                await client.send_all(chunk)
            await client.aclose()

        try:
            async with engine, client, trio.open_nursery() as nursery:
                nursery.start_soon(upstream)
                nursery.start_soon(downstream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side hung up: the other goes with it


@pytest.fixture
async def slow_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[DelayingProxy]:
    # condo's limits, shortened so that a 3 s answer is "too slow" (the defaults are 60 s).
    monkeypatch.setattr(service, "CALL_LIMIT", 1.0)
    monkeypatch.setattr(service, "STOP_LIMIT_EXTRA", 0.5)
    monkeypatch.setattr(fsm, "RETRY_FIRST_DELAY", 1.0)
    proxy = DelayingProxy(socket_path=tmp_path / "slow-docker.sock", delay=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()


async def test_a_start_answered_too_late_leaves_no_unknown_container_running(
    condo: CondoUnderTest, docker: DockerClient, slow_engine: DelayingProxy
) -> None:
    slow_engine.pattern, slow_engine.armed = b"/start ", 1
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo, docker_url=f"unix://{slow_engine.socket_path}"):
            failed = await condo.wait_state("web", "TryAgain")
            assert "timed out" in failed["error"]["message"]
            stable = await condo.wait_state("web", "Stable")
            await trio.sleep(1)
            rows = await condo.containers("web")
            assert [r.id for r in rows if r.state == "running"] == [stable["current"]["id"]]
            assert len(rows) == 1


async def test_a_remove_answered_too_late_never_counts_a_stopped_container_as_serving(
    condo: CondoUnderTest, docker: DockerClient, slow_engine: DelayingProxy
) -> None:
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo, docker_url=f"unix://{slow_engine.socket_path}"):
            first = await condo.wait_state("web", "Stable")
            assert condo.running is not None
            store = condo.running.store
            phases: list[Phase] = []
            store.subscribe(lambda: phases.append(store.entries["web"].state.phase))
            slow_engine.pattern, slow_engine.armed = b"DELETE /", 1
            condo.write("web", SLEEPER.format(tag=2, deploy="[:Before]"))
            await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
            assert Phase.TryAgainNext not in phases
            rows = await condo.containers("web")
            assert first["current"]["id"] not in {r.id for r in rows}

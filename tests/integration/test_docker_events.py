"""run_events against the real engine, including a connection cut by a proxy in between."""

from __future__ import annotations

import functools
import gc
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from condo.docker import (
    ContainerEvent,
    ContainerId,
    DockerClient,
    EventsResumed,
    open_docker,
    run_events,
)
from tests.integration.sockets import unix_listener

pytestmark = pytest.mark.docker

ENGINE_SOCKET = "/var/run/docker.sock"

Message = ContainerEvent | EventsResumed
Namer = Callable[[str], str]


class SocketProxy:
    """A unix-socket proxy in front of the engine that a test can cut and refuse through.

    `cut()` drops every open connection and makes new ones close at once (the client sees the
    engine go away mid-stream, then fail on every reconnect); `restore()` lets them through again.
    """

    def __init__(self, path: Path, upstream: str = ENGINE_SOCKET) -> None:
        self.path = path
        self.upstream = upstream
        self.accepting = True
        self.connections = 0
        self.refused = 0
        self._open: set[trio.CancelScope] = set()

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = await unix_listener(self.path)
        await trio.serve_listeners(self._relay, [listener], task_status=task_status)

    def cut(self) -> None:
        self.accepting = False
        for scope in self._open:
            scope.cancel()

    def restore(self) -> None:
        self.accepting = True

    async def _relay(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            if not self.accepting:
                self.refused += 1
                return  # accepted and closed at once: "server disconnected"
            self.connections += 1
            upstream = await trio.open_unix_socket(self.upstream)
            with trio.CancelScope() as relaying:
                self._open.add(relaying)
                try:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, downstream, upstream, relaying)
                        nursery.start_soon(self._pump, upstream, downstream, relaying)
                finally:
                    self._open.discard(relaying)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except trio.BrokenResourceError:  # the other side went away: end the pair below
            pass
        both.cancel()


@asynccontextmanager
async def proxy_to_engine(
    tmp_path: Path, upstream: str = ENGINE_SOCKET
) -> AsyncIterator[SocketProxy]:
    proxy = SocketProxy(tmp_path / "engine.sock", upstream)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()


async def receive_until(
    receive: trio.MemoryReceiveChannel[Message], last: Callable[[Message], bool]
) -> list[Message]:
    """Everything received up to and including the first message for which `last` is true."""
    received = []
    async for message in receive:
        received.append(message)
        if last(message):
            return received
    raise AssertionError("the events channel closed")


def is_event(action: str, cid: ContainerId) -> Callable[[Message], bool]:
    def matches(message: Message) -> bool:
        return (
            isinstance(message, ContainerEvent)
            and message.action == action
            and message.container_id == cid
        )

    return matches


def summary(messages: list[Message]) -> list[tuple[str, str] | str]:
    return [
        (m.action, m.container_id) if isinstance(m, ContainerEvent) else "resumed" for m in messages
    ]


def sleeper(labels: Mapping[str, str], image: str = "condo-test/busybox:1") -> dict[str, Any]:
    return {"Image": image, "Labels": dict(labels)}


async def test_health_events_in_order(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    send, receive = trio.open_memory_channel[Message](100)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(run_events, docker, send, labels=container_labels)
            )
            cid = await docker.create(
                sleeper(container_labels, "condo-test/healthy:1"), name=container_name("hc")
            )
            await docker.start(cid)
            before_stop = await receive_until(receive, is_event("health_status", cid))
            await docker.stop(cid, grace=5)
            after_stop = await receive_until(receive, is_event("stop", cid))
            nursery.cancel_scope.cancel()
    messages = before_stop + after_stop
    assert all(isinstance(m, ContainerEvent) and m.container_id == cid for m in messages)
    events = [m for m in messages if isinstance(m, ContainerEvent)]
    assert [(e.action, e.health) for e in events] == [
        ("create", None),
        ("start", None),
        ("health_status", "healthy"),
        ("die", None),
        ("stop", None),
    ]
    assert events[3].attributes["exitCode"] == "0"
    assert events[0].attributes["name"] == container_name("hc")
    assert events[0].attributes["condo-test.run"] == container_labels["condo-test.run"]
    assert [e.time_nano for e in events] == sorted(e.time_nano for e in events)


async def test_events_survive_a_dropped_connection(
    tmp_path: Path,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    container_name: Namer,
) -> None:
    send, receive = trio.open_memory_channel[Message](100)
    with trio.fail_after(60):
        async with (
            proxy_to_engine(tmp_path) as proxy,
            open_docker(f"unix://{proxy.path}") as via_proxy,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(
                functools.partial(run_events, via_proxy, send, labels=container_labels)
            )
            a = await docker.create(sleeper(container_labels), name=container_name("a"))
            await docker.start(a)
            before_cut = await receive_until(receive, is_event("start", a))

            # Cut within a second of the last event: the replay window re-reads those events,
            # so this also proves they are de-duplicated.
            proxy.cut()
            cut_at = time.time()
            await docker.stop(a, grace=5)
            b = await docker.create(sleeper(container_labels), name=container_name("b"))
            await docker.start(b)
            await docker.remove(a)
            await trio.sleep(1.0)  # several refused reconnects (backoff 0.1, 0.2, 0.4, ...)
            refused_until = time.time()
            proxy.restore()

            replayed = await receive_until(receive, lambda m: isinstance(m, EventsResumed))
            await docker.stop(b, grace=5)
            live = await receive_until(receive, is_event("stop", b))
            nursery.cancel_scope.cancel()

    assert summary(before_cut) == [("create", a), ("start", a)]
    assert summary(replayed) == [
        ("die", a),
        ("stop", a),
        ("create", b),
        ("start", b),
        ("destroy", a),
        "resumed",
    ]
    assert summary(live) == [("die", b), ("stop", b)]
    marker = replayed[-1]
    assert isinstance(marker, EventsResumed)
    assert cut_at - 0.5 <= marker.gap_started_at <= refused_until
    # It really reconnected: attempts were refused while cut (with backoff, so only a few), and
    # a new connection carried the replay.
    assert 2 <= proxy.refused <= 8
    assert proxy.connections >= 2


async def test_engine_down_at_start_reports_started_and_replays_the_gap(
    tmp_path: Path,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    container_name: Namer,
) -> None:
    send, receive = trio.open_memory_channel[Message](100)
    started = trio.Event()
    with trio.fail_after(60):
        async with (
            proxy_to_engine(tmp_path) as proxy,
            open_docker(f"unix://{proxy.path}") as via_proxy,
            trio.open_nursery() as nursery,
        ):
            proxy.cut()

            async def start_events() -> None:
                await nursery.start(
                    functools.partial(run_events, via_proxy, send, labels=container_labels)
                )
                started.set()

            nursery.start_soon(start_events)
            # Started at once: condo need not wait for the engine, since the gap is bridged.
            with trio.fail_after(5):
                await started.wait()
            cid = await docker.create(sleeper(container_labels), name=container_name("early"))
            proxy.restore()
            # What happened while the engine was unreachable is replayed, then the resync cue.
            replayed = await receive_until(receive, lambda m: isinstance(m, EventsResumed))
            await docker.start(cid)
            live = await receive_until(receive, is_event("start", cid))
            nursery.cancel_scope.cancel()
    assert summary(replayed) == [("create", cid), "resumed"]
    assert summary(live) == [("start", cid)]


async def test_cancelled_while_delivering_leaves_no_stream_half_read(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    # httpx reads a body through a chain of async generators; stopping between two events (here:
    # cancelled while blocked delivering one) must finish that chain, or Trio warns about each
    # link when it is garbage collected.
    send, receive = trio.open_memory_channel[Message](0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(run_events, docker, send, labels=container_labels)
                )
                cid = await docker.create(sleeper(container_labels), name=container_name("x"))
                assert is_event("create", cid)(await receive.receive())
                await docker.start(cid)  # its event will wait for a receiver that never comes
                await trio.sleep(0.5)
                assert receive.statistics().tasks_waiting_send == 1
                nursery.cancel_scope.cancel()
            gc.collect()
            await trio.sleep(0.1)  # where Trio would finalize leftovers
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert (await docker.ping()) == "1.41"  # the shared client is still usable

"""The API served by hypercorn over real loopback sockets, in process (no engine): what only a real
connection shows — hypercorn's closing of keep-alive connections next to an answer in flight, and
the long-polls' shared answers as they leave the server.

Real time (sockets), so each test is kept to well under a second of work and capped.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

import condo.web.door
from condo.metrics import Metrics
from condo.store import Store
from condo.web import LocalSource, WebContext, build_app
from condo.web.assets import StaticFiles
from condo.web.door import SHARE_AT, Door
from condo.web.health import EngineHealth
from condo.web.lifecycle import Closing
from condo.web.serve import closing_connections, hypercorn_config, serve_app
from condo.web.waitfor import SharedVerdict, SharedWaits
from tests.test_web import TOKEN, MakeWeb, make_web, stable, waiting

__all__ = ["make_web"]  # the fixture, shared with test_web

CAP = 20  # seconds, real


async def _ping() -> str:
    return "1.41"


@attrs.frozen
class Served:
    store: Store
    context: WebContext
    port: int
    app: Any


@contextlib.asynccontextmanager
async def served(
    *,
    keep_alive_max_requests: int | None = None,
    with_door: bool = True,
    token: str | None = None,
    host: str = "h1",
) -> AsyncIterator[Served]:
    """The app of a fresh Store (of `host`), served by hypercorn on a free loopback port."""
    store = Store(host)
    context = WebContext(
        store=store,
        local=LocalSource(store),
        global_source=None,
        health=EngineHealth(_ping),
        state_file_error=lambda: None,
        metrics=Metrics(),
        closing=Closing(),
        static=StaticFiles.scan(),
        api_token=token,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = hypercorn_config(sock.detach())
    if keep_alive_max_requests is not None:
        config.keep_alive_max_requests = keep_alive_max_requests
    stopping = trio.Event()
    quart = build_app(context)
    app = closing_connections(quart, context.closing)
    door = quart.extensions["condo.door"] if with_door else None
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve_app, app, config, context.closing, stopping, door=door)
        )
        try:
            yield Served(store, context, port, quart)
        finally:
            stopping.set()


@contextlib.contextmanager
def hypercorn_errors() -> Iterator[list[str]]:
    """hypercorn's own error log lines (where "Error in ASGI Framework" goes), collected."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.ERROR)
    logger = logging.getLogger("hypercorn.error")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


async def read_answer(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One whole HTTP/1.1 answer with a Content-Length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"the server hung up before the head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, f"the server cut the answer at {len(body)} of {length} bytes"
        body += chunk
    return head, body


def get(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def test_closing_a_keep_alive_connection_never_cuts_an_answer() -> None:
    # hypercorn says `Connection: close` on the last answer a keep-alive connection may carry
    # (keep_alive_max_requests, 1,000 by default: under load every connection gets there) and
    # closes it. A client that sends its next request as soon as it has the answer made the
    # reading task close the socket while the app task was still writing that answer:
    # BusyResourceError, "Error in ASGI Framework", an answer lost. 1 makes every answer the last.
    clients = 50
    answered: list[bytes] = []
    async with served(keep_alive_max_requests=1) as server:
        for index in range(20):
            server.store.set_state(f"s{index:02d}", stable("img:1"))

        async def client() -> None:
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                head, body = await read_answer(stream)
                assert b"connection: close" in head.lower()
                answered.append(body)
                # Too late, and rude, but it happens (the api bench did it): it must not matter.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(get("/v1/state", server.port))

        with hypercorn_errors() as errors, trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                for _ in range(clients):
                    nursery.start_soon(client)
            await trio.sleep(0.1)  # the server's side of the last closes
    assert errors == []
    assert len(answered) == clients
    assert all(body.startswith(b'{"host":"h1"') for body in answered)


# --- /v1/wait_for: the shared verdicts and their layer in front of quart ----------------------


async def test_waiters_of_one_service_share_one_evaluation_per_picture(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    waiters = 100
    async with make_web() as web:
        web.store.set_state("web", waiting("img:2"))
        shared: SharedWaits = web.app.extensions["condo.waits"]
        responses: list[Any] = []

        async def ask() -> None:
            path = "/v1/wait_for?name=web&image=img:2&timeout=30"
            responses.append(await web.client.get(path))

        with trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                for _ in range(waiters):
                    nursery.start_soon(ask)
                await trio.sleep(1)
                assert shared.evaluations == 1  # the first waiter's; the others joined it
                web.store.set_state("other", stable("img:9"))  # a picture change: 1 more
                await trio.sleep(1)
                web.store.set_state("web", waiting("img:2", "c3"))  # still not there: 1 more
                await trio.sleep(1)
                assert shared.evaluations == 3
                web.store.set_state("web", stable("img:2", "c3"))  # done: 1, then every answer
        assert shared.evaluations == 4
        assert shared.keys == {}  # the last waiter took the key with it
    assert len(responses) == waiters
    assert {(r.status_code, await r.get_data()) for r in responses} == {
        (200, b'{"hosts":["h1"],"status":"ok"}\n')
    }


# --- the front door (condo.web.door): long-polls parked below hypercorn -----------------------

DATE = re.compile(rb"\r\ndate: [^\r]*")


def door_of(server: Served) -> Door:
    door: Door = server.app.extensions["condo.door"]
    return door


def masked(answer: tuple[bytes, bytes]) -> bytes:
    """The whole answer, its `date` header (the second it was sent) masked."""
    head, body = answer
    return DATE.sub(b"\r\ndate: -", head) + b"\r\n\r\n" + body


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("path", "close"),
    [
        ("/v1/wait_for?name=web&image=img:1&timeout=0", False),  # done at once
        ("/v1/wait_for?name=web&image=img:2&timeout=0.2", False),  # timeout, pending
        ("/v1/wait_for?name=ghost&image=img:2&timeout=0.2", False),  # runs nowhere
        ("/v1/wait_for?name=web&image=img:2&timeout=60", True),  # cut by shutdown
        ("/v1/wait_for?name=web&image=img:2&timeout=x", False),  # a 400 (quart's)
        ("/v1/state", False),  # the hot route, answered by the door too
        ("/v1/state?x=1", False),  # (quart's)
    ],
)
async def test_the_door_answers_byte_for_byte_like_hypercorn_and_the_route(
    path: str, close: bool
) -> None:
    results = []
    for with_door in (True, False):
        async with served(with_door=with_door, token=TOKEN) as server:
            server.store.set_state("web", stable("img:1"))
            with trio.fail_after(CAP):
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                    request = get(path, server.port).replace(
                        b"\r\n\r\n", f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
                    )
                    await stream.send_all(request)
                    if close:
                        await wait_until(
                            lambda: server.context.metrics.value("condo_web_open_waits") == 1
                        )
                        server.context.closing.close()
                    results.append(masked(await read_answer(stream)))
            door_answers = door_of(server).writes
            assert door_answers == (1 if with_door and "x" not in path else 0)
    by_door, by_hypercorn = results
    assert by_door == by_hypercorn
    assert (b"connection: close" in by_door) == close


async def long_polls(server: Any, count: int) -> list[trio.SocketStream]:
    """`count` connections, each holding `/v1/wait_for?name=web&image=img:2`, once condo's gauge
    counts them all (parked)."""
    streams: list[trio.SocketStream] = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        streams.append(stream)
        await stream.send_all(get("/v1/wait_for?name=web&image=img:2", server.port))
    await wait_until(lambda: server.context.metrics.value("condo_web_open_waits") == count)
    return streams


@pytest.mark.parametrize("share_at", [SHARE_AT, 10], ids=["one-thread", "worker-shares"])
async def test_the_door_answers_parked_waiters_with_one_encode_and_holds_no_hypercorn_object(
    share_at: int,
) -> None:
    waiters = 50
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = share_at  # from 10 waiters a worker thread writes half of the answers
        with trio.fail_after(CAP):
            streams = await long_polls(server, waiters)
            assert len(door.conns) == waiters
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, (TCPServer, H11Protocol))]
            encodes = door.encodes
            server.store.set_state("web", stable("img:2", "c3"))
            bodies = [(await read_answer(stream))[1] for stream in streams]
            assert door.encodes == encodes + 1  # one answer for all
            # (the worker's writes count once its results are back: its clients may read first)
            await wait_until(lambda: door.writes == waiters)
            assert door.thread_writes == (0 if share_at > waiters else waiters // 2)
            assert bodies == [b'{"hosts":["h1"],"status":"ok"}\n'] * waiters
            assert server.context.metrics.value("condo_web_open_waits") == 0
            # Each connection goes on (kept alive) whichever thread wrote its answer.
            for stream in streams:
                await stream.send_all(get("/v1/wait_for?name=web&image=img:2", server.port))
                assert (await read_answer(stream))[1] == bodies[0]
            assert door.handed == 0
            for stream in streams:
                await stream.aclose()
            # Their hang-ups are closed by the door itself: no server built to find EOF.
            await wait_until(lambda: door.conns == {})
            assert door.handed == 0


async def test_a_keep_alive_connection_goes_on_after_a_door_answer_and_then_through_quart() -> None:
    async with served() as server:
        server.store.set_state("web", stable("img:1"))
        door = door_of(server)
        with trio.fail_after(CAP):
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/wait_for?name=web&image=img:1", server.port))
                head, body = await read_answer(stream)
                assert head.startswith(b"HTTP/1.1 200 ") and body.endswith(b'"status":"ok"}\n')
                assert door.writes == 1
                assert door.handed == 0
                # the state route and the next long-polls are the door's too
                for path in ("/v1/state", "/v1/wait_for?name=web&image=img:1", "/v1/state"):
                    await stream.send_all(get(path, server.port))
                    head, body = await read_answer(stream)
                    assert head.startswith(b"HTTP/1.1 200 ")
                assert (door.writes, door.handed) == (4, 0)
                # a route of quart's: hypercorn serves it, and the connection from then on
                await stream.send_all(get("/healthz", server.port))
                head, body = await read_answer(stream)
                assert head.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in body
                assert door.handed == 1
                await stream.send_all(get("/v1/wait_for?name=web&image=img:1", server.port))
                head, body = await read_answer(stream)
                assert body.endswith(b'"status":"ok"}\n')
                assert (door.writes, door.handed) == (4, 1)


async def test_a_parked_waiter_that_hangs_up_frees_its_slot() -> None:
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        metrics = server.context.metrics
        with trio.fail_after(CAP):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(get("/v1/wait_for?name=web&image=img:2", server.port))
            await wait_until(lambda: metrics.value("condo_web_open_waits") == 1)
            await stream.aclose()
            await wait_until(lambda: metrics.value("condo_web_open_waits") == 0)
            assert door.conns == {}
            assert door.shared.keys == {}
            assert door.slots.taken == 0


async def test_the_door_keeps_hypercorns_keep_alive_limit_byte_for_byte() -> None:
    # hypercorn's last answer on a connection (keep_alive_max_requests) says `connection: close`
    # and closes it: the door's answers do the same, whichever route is the last.
    results = []
    for with_door in (True, False):
        async with served(with_door=with_door, keep_alive_max_requests=2) as server:
            server.store.set_state("web", stable("img:1"))
            with trio.fail_after(CAP):
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                    got = []
                    for path in ("/v1/state", "/v1/wait_for?name=web&image=img:1"):
                        await stream.send_all(get(path, server.port))
                        got.append(masked(await read_answer(stream)))
                    assert await stream.receive_some(100) == b""  # closed by the server
            assert door_of(server).writes == (2 if with_door else 0)
            results.append(got)
    by_door, by_hypercorn = results
    assert by_door == by_hypercorn
    assert [b"connection: close" in answer for answer in by_door] == [False, True]


async def test_a_shutdown_as_a_shared_bulk_answer_begins_leaves_no_waiter_without_one() -> None:
    # The verdict turns final and condo stops at once (no checkpoint between): the answering
    # loop unparks the worker's half before the shutdown's cancel reaches it. Each waiter still
    # gets one whole answer (the verdict's, or the shutdown's 503), never a bare close.
    for _ in range(6):  # which of the two tasks runs first is the scheduler's pick
        await stop_during_a_shared_answer(waiters=24)


async def stop_during_a_shared_answer(waiters: int) -> None:
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        with trio.fail_after(CAP):
            streams = await long_polls(server, waiters)
            server.store.set_state("web", stable("img:2", "c3"))
            server.context.closing.close()
            for stream in streams:
                head, _ = await read_answer(stream)
                assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 "))
                assert await stream.receive_some(100) == b""  # then closed
                await stream.aclose()
            await wait_until(lambda: door.conns == {})
            assert metrics.value("condo_web_open_waits") == 0
            assert door.slots.taken == 0


async def test_a_bulk_answer_with_no_worker_thread_to_be_had_is_written_whole_all_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker thread may not start (a pids limit: "can't start new thread"). The half meant for
    # it is unparked already: the Trio thread writes it, and the door (and the API) go on.
    run_sync = trio.to_thread.run_sync

    async def no_thread(fn: Callable[..., Any], *args: Any) -> Any:
        if fn is condo.web.door._send_each:
            raise RuntimeError("can't start new thread")
        return await run_sync(fn, *args)

    waiters = 12
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
        with trio.fail_after(CAP):
            streams = await long_polls(server, waiters)
            server.store.set_state("web", stable("img:2", "c3"))
            bodies = [(await read_answer(stream))[1] for stream in streams]
            assert bodies == [b'{"hosts":["h1"],"status":"ok"}\n'] * waiters
            assert (door.writes, door.thread_writes) == (waiters, 0)
            assert metrics.value("condo_web_open_waits") == 0
            assert door.slots.taken == 0
            for stream in streams:  # kept alive, as ever
                await stream.send_all(get("/v1/state", server.port))
                assert (await read_answer(stream))[0].startswith(b"HTTP/1.1 200 ")
                await stream.aclose()
            await wait_until(lambda: door.conns == {})


async def read_answers(stream: trio.SocketStream, count: int) -> list[tuple[bytes, bytes]]:
    """`count` whole answers in a row (pipelined ones may come in one read): [(head, body)]."""
    data = b""
    answers: list[tuple[bytes, bytes]] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end]
            found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert found is not None, head
            length = int(found[1])
            if len(data) >= end + 4 + length:
                answers.append((head, data[end + 4 : end + 4 + length]))
                data = data[end + 4 + length :]
                continue
        chunk = await stream.receive_some(65536)
        assert chunk, f"the server hung up after {len(answers)} answers: {data!r}"
        data += chunk
    assert data == b"", "more than the answers asked for"
    return answers


async def test_a_shared_bulk_answer_keeps_pipelined_requests_and_the_keep_alive_limit() -> None:
    # Whichever thread writes a waiter's answer: a request pipelined behind the long-poll is
    # served right after it, and hypercorn's keep-alive limit (3 here) closes where it would.
    wait = "/v1/wait_for?name=web&image=img:2"
    async with served(keep_alive_max_requests=3) as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        # (requests before the long-poll, a /v1/state pipelined behind it)
        plans = [(0, True), (1, True), (2, False)] * 8
        streams: list[trio.SocketStream] = []
        with trio.fail_after(CAP):
            for before, pipelined in plans:
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                streams.append(stream)
                for _ in range(before):
                    await stream.send_all(get("/v1/state", server.port))
                    await read_answers(stream, 1)
                extra = get("/v1/state", server.port) if pipelined else b""
                await stream.send_all(get(wait, server.port) + extra)
            await wait_until(lambda: metrics.value("condo_web_open_waits") == len(plans))
            server.store.set_state("web", stable("img:2", "c3"))
            for stream, (before, pipelined) in zip(streams, plans, strict=True):
                answers = await read_answers(stream, 2 if pipelined else 1)
                head, body = answers[0]
                assert body == b'{"hosts":["h1"],"status":"ok"}\n'
                assert (b"connection: close" in head) == (before == 2)
                if pipelined:
                    head, body = answers[1]
                    assert head.startswith(b"HTTP/1.1 200 ") and body.startswith(b"{")
                    assert (b"connection: close" in head) == (before == 1)
                if before >= 1:
                    assert await stream.receive_some(100) == b""  # closed at the limit
                else:  # still kept alive
                    await stream.send_all(get("/v1/state", server.port))
                    await read_answers(stream, 1)
            assert 0 < door.thread_writes < len(plans)
            assert door.handed == 0
            assert (metrics.value("condo_web_open_waits"), door.slots.taken) == (0, 0)
            for stream in streams:
                await stream.aclose()
            await wait_until(lambda: door.conns == {})


async def test_hang_ups_wait_while_the_worker_thread_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hang-ups and a final verdict at the same moment (the clients reset from within the
    # verdict's hook): the door must not close a socket of the worker's half while the worker
    # holds it (its descriptor may be a new client's by then). Hang-ups wait for the bulk answer.
    # The worker is slowed down (a busy kernel) to see it.
    closed_under_it: list[int] = []
    run_sync, send_each = trio.to_thread.run_sync, condo.web.door._send_each

    async def slow_worker(fn: Callable[..., Any], *args: Any) -> Any:
        if fn is not send_each:
            return await run_sync(fn, *args)
        socks, data = args
        held = [sock.fileno() for sock in socks]  # handed to the worker

        def slowly(socks: list[socket.socket], data: bytes) -> list[int]:
            time.sleep(0.02)
            return send_each(socks, data)

        sent = await run_sync(slowly, socks, data)
        closed_under_it.extend(
            fd for fd, sock in zip(held, socks, strict=True) if fd != -1 and sock.fileno() != fd
        )
        return sent

    monkeypatch.setattr(trio.to_thread, "run_sync", slow_worker)
    for _ in range(12):  # which task runs first is the scheduler's pick
        await hang_ups_with_a_final_verdict(waiters=16)
    assert closed_under_it == []


async def hang_ups_with_a_final_verdict(waiters: int) -> None:
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        clients: list[socket.socket] = []
        with trio.fail_after(CAP):
            for _ in range(waiters):
                client = socket.create_connection(("127.0.0.1", server.port))
                client.sendall(get("/v1/wait_for?name=web&image=img:2", server.port))
                clients.append(client)
            await wait_until(lambda: metrics.value("condo_web_open_waits") == waiters)
            on_final = door.shared.on_final
            assert on_final is not None

            def hang_ups_and_final(key: SharedVerdict) -> None:
                for client in clients[::2]:  # half of them hang up (reset) as the verdict comes
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                on_final(key)

            door.shared.on_final = hang_ups_and_final
            server.store.set_state("web", stable("img:2", "c3"))
            for client in clients[1::2]:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
                assert (await read_answer(stream))[1] == b'{"hosts":["h1"],"status":"ok"}\n'
                await stream.aclose()
            await wait_until(lambda: door.conns == {})
            assert (metrics.value("condo_web_open_waits"), door.slots.taken) == (0, 0)


async def test_crowds_of_two_and_three_services_shared_with_the_worker_get_one_answer_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two services final in one picture, then a third while the worker still writes the first
    # (slowed down: a busy kernel): every waiter gets one whole answer, once, and goes on.
    send_each = condo.web.door._send_each

    def slowly(socks: list[socket.socket], data: bytes) -> list[int]:
        time.sleep(0.02)
        return send_each(socks, data)

    monkeypatch.setattr(condo.web.door, "_send_each", slowly)
    names, crowd = ("web", "api", "db"), 10
    async with served() as server:
        for name in names:
            server.store.set_state(name, waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        streams: dict[str, list[trio.SocketStream]] = {name: [] for name in names}
        with trio.fail_after(CAP):
            for name in names:
                for _ in range(crowd):
                    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    await stream.send_all(get(f"/v1/wait_for?name={name}&image=img:2", server.port))
                    streams[name].append(stream)
            await wait_until(lambda: metrics.value("condo_web_open_waits") == 3 * crowd)
            server.store.set_state("web", stable("img:2", "c3"))
            server.store.set_state("api", stable("img:2", "c3"))  # (the same picture)
            await wait_until(lambda: metrics.value("condo_web_open_waits") != 3 * crowd)
            server.store.set_state("db", stable("img:2", "c3"))  # (the worker may still send)
            for name in names:
                for stream in streams[name]:
                    answers = await read_answers(stream, 1)  # one, whole, and nothing more
                    assert answers[0][1] == b'{"hosts":["h1"],"status":"ok"}\n'
            await wait_until(lambda: door.writes == 3 * crowd)  # (the worker's, once back)
            assert door.thread_writes == 3 * crowd // 2
            assert (metrics.value("condo_web_open_waits"), door.slots.taken) == (0, 0)
            assert door.shared.keys == {}
            for name in names:
                for stream in streams[name]:  # kept alive, whichever thread wrote
                    await stream.send_all(get("/v1/state", server.port))
                    await read_answers(stream, 1)
                    await stream.aclose()
            await wait_until(lambda: door.conns == {})


async def test_clients_that_do_not_read_get_the_rest_of_a_shared_answer_later() -> None:
    # An answer larger than a slow client's socket takes at once (a long host name here): the
    # worker sends what it takes, a task of the door the rest once the client reads, and a
    # request pipelined behind the long-poll is served after it, never interleaved.
    host = "h" * 200_000
    body = b'{"hosts":["' + host.encode() + b'"],"status":"ok"}\n'
    waiters = 12
    async with served(host=host) as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        metrics = server.context.metrics
        clients: list[trio.SocketStream] = []
        with trio.fail_after(CAP):
            for _ in range(waiters):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", server.port))
                stream = trio.SocketStream(sock)
                await stream.send_all(
                    get("/v1/wait_for?name=web&image=img:2", server.port)
                    + get("/v1/state", server.port)
                )
                clients.append(stream)
            await wait_until(lambda: metrics.value("condo_web_open_waits") == waiters)
            server.store.set_state("web", stable("img:2", "c3"))
            await wait_until(lambda: door.writes == waiters)  # none read yet
            assert door.thread_writes == waiters // 2
            assert [c for c in door.conns.values() if c.sending is not None]  # rests pending
            for stream in clients:
                (_, first), (head, _) = await read_answers(stream, 2)
                assert first == body
                assert head.startswith(b"HTTP/1.1 200 ")
            assert (metrics.value("condo_web_open_waits"), door.slots.taken) == (0, 0)
            for stream in clients:
                await stream.aclose()
            await wait_until(lambda: door.conns == {})


async def test_supervision_runs_while_the_worker_thread_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The Trio thread only awaits the worker: other tasks (supervision) run meanwhile. The worker
    # is slowed down (a busy kernel) to measure it.
    send_each = condo.web.door._send_each
    ticks: list[int] = []
    during: list[int] = []

    def slowly(socks: list[socket.socket], data: bytes) -> list[int]:
        before = len(ticks)
        time.sleep(0.1)
        during.append(len(ticks) - before)
        return send_each(socks, data)

    async def ticking() -> None:
        while True:
            await trio.sleep(0.005)
            ticks.append(1)

    monkeypatch.setattr(condo.web.door, "_send_each", slowly)
    waiters = 8
    async with served() as server, trio.open_nursery() as nursery:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        door.share_at = 4
        with trio.fail_after(CAP):
            streams = await long_polls(server, waiters)
            assert len(door.shared.keys) == 1 and door.slots.taken == waiters
            nursery.start_soon(ticking)
            server.store.set_state("web", stable("img:2", "c3"))
            for stream in streams:
                await read_answer(stream)
                await stream.aclose()
            assert len(during) == 1 and during[0] >= 5  # ~20 ticks of 5 ms in the worker's 100
            nursery.cancel_scope.cancel()

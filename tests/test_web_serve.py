"""The API served by hypercorn over real loopback sockets, in process (no engine): what only a real
connection shows — hypercorn's closing of keep-alive connections next to an answer in flight, and
the long-polls' shared answers as they leave the server.

Real time (sockets), so each test is kept to well under a second of work and capped.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from condo.metrics import Metrics
from condo.store import Store
from condo.web import LocalSource, WebContext, build_app
from condo.web.assets import StaticFiles
from condo.web.health import EngineHealth
from condo.web.lifecycle import Closing
from condo.web.serve import closing_connections, hypercorn_config, serve_app
from condo.web.waitfor import SharedWaits
from tests.test_web import TOKEN, MakeWeb, Web, make_web, stable, waiting

__all__ = ["make_web"]  # the fixture, shared with test_web

CAP = 20  # seconds, real


async def _ping() -> str:
    return "1.41"


@attrs.frozen
class Served:
    store: Store
    context: WebContext
    port: int


@contextlib.asynccontextmanager
async def served(*, keep_alive_max_requests: int | None = None) -> AsyncIterator[Served]:
    """The app of a fresh Store, served by hypercorn on a free loopback port."""
    store = Store("h1")
    context = WebContext(
        store=store,
        local=LocalSource(store),
        global_source=None,
        health=EngineHealth(_ping),
        state_file_error=lambda: None,
        metrics=Metrics(),
        closing=Closing(),
        static=StaticFiles.scan(),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = hypercorn_config(sock.detach())
    if keep_alive_max_requests is not None:
        config.keep_alive_max_requests = keep_alive_max_requests
    stopping = trio.Event()
    app = closing_connections(build_app(context), context.closing)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_app, app, config, context.closing, stopping)
        try:
            yield Served(store, context, port)
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


async def answers(web: Web, path: str, *, close: bool = False) -> list[tuple[int, Any, bytes]]:
    """(status, headers, body) of `path` asked at once, after 5 s, and of a wait cut by closing."""
    got: list[tuple[int, Any, bytes]] = []

    async def ask() -> None:
        response = await web.client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        got.append(
            (response.status_code, list(response.headers.items()), await response.get_data(False))
        )

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(5)
            if close:
                web.context.closing.close()
    return got


@pytest.mark.parametrize(
    ("path", "close"),
    [
        ("/v1/wait_for?name=web&image=img:1&timeout=0", False),  # done at once
        ("/v1/wait_for?name=web&image=img:2&timeout=1", False),  # timeout, pending
        ("/v1/wait_for?name=ghost&image=img:2&timeout=1", False),  # runs nowhere
        ("/v1/wait_for?name=web&image=img:2&timeout=60", True),  # cut by shutdown
        ("/v1/wait_for?name=web&image=img:2&timeout=x", False),  # a 400 (quart's)
    ],
)
async def test_the_layer_answers_byte_for_byte_like_the_route(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, path: str, close: bool
) -> None:
    results = []
    for layered in (True, False):
        async with make_web(token=TOKEN) as web:
            if not layered:
                del web.app.asgi_app  # back to quart's own: the route answers everything
            web.store.set_state("web", stable("img:1"))
            results.append(await answers(web, path, close=close))
    with_layer, route_only = results
    assert with_layer == route_only
    assert len(with_layer) == 1

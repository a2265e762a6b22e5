"""Red team of issue 12 (performance): hostile clients of the API's front door (condo.web.door),
in process over real loopback sockets, each answer compared with what hypercorn and quart give
for the same bytes (the door must never answer otherwise, nor fail).

Real time (sockets): each test is a fraction of a second of work, capped.
"""

from __future__ import annotations

import time

import pytest
import trio

import condo.web.door as door_module
from condo.consul.layout import ForeignValue, KeyLayout, decode_value, encode_value
from condo.waiting import evaluate
from tests.test_web import TOKEN, stable, waiting
from tests.test_web_serve import CAP, door_of, get, masked, read_answer, served, wait_until


class Answers:
    """The answers of one connection, in order, pipelined ones too (read_answer drops what
    follows the first)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.data = b""

    async def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.data:
            await self._more()
        head, _, rest = self.data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        self.data = rest
        while len(self.data) < length:
            await self._more()
        body, self.data = self.data[:length], self.data[length:]
        return head, body

    async def _more(self) -> None:
        chunk = await self.stream.receive_some(65536)
        assert chunk, f"the server hung up after {len(self.data)} bytes: {self.data[:80]!r}"
        self.data += chunk


async def test_a_non_utf8_authorization_gets_quarts_401_and_the_door_keeps_serving() -> None:
    # Header values may carry obs-text (bytes 0x80-0xff): h11 takes them and quart reads them as
    # latin-1. The door decoded the token as UTF-8: UnicodeDecodeError out of hypercorn's handler.
    request = b"GET /v1/state HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"
    results = []
    for with_door in (True, False):
        async with served(with_door=with_door, token=TOKEN) as server:
            with trio.fail_after(CAP):
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                    await stream.send_all(request)
                    results.append(masked(await read_answer(stream)))
                # and the server still serves
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                    await stream.send_all(
                        get("/v1/state", server.port).replace(
                            b"\r\n\r\n", f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
                        )
                    )
                    head, _ = await read_answer(stream)
                    assert head.startswith(b"HTTP/1.1 200 ")
    by_door, by_hypercorn = results
    assert by_door.startswith(b"HTTP/1.1 401 ")
    assert by_door == by_hypercorn


async def test_a_request_pipelined_behind_a_long_poll_on_a_kept_connection_is_answered() -> None:
    # A kept-alive connection sends a long-poll and, in the same segment, the next request
    # (pipelining). The door parks the long-poll; once it is answered, the request behind it
    # (already in the socket: no new epoll edge comes for it) must be read and answered too.
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        with trio.fail_after(CAP):
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                head, _ = await read_answer(stream)  # the connection is the door's, idle now
                assert head.startswith(b"HTTP/1.1 200 ")
                await stream.send_all(
                    get("/v1/wait_for?name=web&image=img:2&timeout=0.3", server.port)
                    + get("/v1/state", server.port)
                )
                answers = Answers(stream)
                head, body = await answers.next()
                assert head.startswith(b"HTTP/1.1 500 ") and b'"timeout"' in body
                with trio.fail_after(2):  # (the keep-alive timeout is 5 s)
                    head, body = await answers.next()
                assert head.startswith(b"HTTP/1.1 200 ") and body.startswith(b'{"host":"h1"')
        assert server.context.metrics.value("condo_web_open_waits") == 0


async def test_a_request_pipelined_behind_a_long_poll_answered_at_once_is_answered() -> None:
    # The same with the long-poll answered right away (done already) and a third request.
    async with served() as server:
        server.store.set_state("web", stable("img:1"))
        door = door_of(server)
        with trio.fail_after(CAP):
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                await read_answer(stream)
                await stream.send_all(
                    get("/v1/state", server.port)
                    + get("/v1/wait_for?name=web&image=img:1&timeout=0.3", server.port)
                    + get("/v1/state", server.port)
                )
                answers = Answers(stream)
                with trio.fail_after(2):
                    heads = [(await answers.next())[0] for _ in range(3)]
                assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads)
                await wait_until(lambda: door.slots.taken == 0)


async def test_a_client_that_half_closes_after_its_request_gets_the_whole_state() -> None:
    # `printf 'GET /v1/state ...' | nc -N`: the request, then shutdown(SHUT_WR). A /v1/state
    # larger than the socket takes at once is finished by a task of the door's; the half-close
    # cut it. (hypercorn itself answers such a client or not, by a race: whether it reads the
    # EOF before the app answers; once it writes, it writes the whole answer.)
    async with served() as server:
        for index in range(200):
            server.store.set_state(f"service-{index:03d}", stable(f"registry/img:{index}"))
        with trio.fail_after(CAP):
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(get("/v1/state", server.port))
                await stream.send_eof()
                await trio.sleep(0.3)  # the door meets the half-close mid-answer
                head, body = await Answers(stream).next()
                assert await stream.receive_some(10) == b""  # then it closes
        assert door_of(server).writes == 1
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body.startswith(b'{"host":"h1"') and body.endswith(b"}")
    assert len(body) > 50_000  # more than the socket took at once


async def test_a_connection_that_never_asks_anything_does_not_hold_shutdown() -> None:
    # hypercorn closes its idle connections as soon as it is told to stop (its keep-alive timer
    # waits on `terminated`). The door looks at each new connection first: a client connected
    # but silent (a browser's preconnect, a balancer's) held shutdown for hypercorn's whole
    # graceful timeout, or the drain limit.
    with trio.fail_after(CAP):
        async with served() as server:
            silent = await trio.open_tcp_stream("127.0.0.1", server.port)
            await trio.sleep(0.1)  # (the server is looking at it)
            stopping = trio.current_time()
        took = trio.current_time() - stopping
        assert await silent.receive_some(10) == b""  # closed by the server
        await silent.aclose()
    assert took < 0.3


@pytest.mark.parametrize("field", ["current", "error", "reverted"])
async def test_a_consul_value_with_a_broken_state_is_foreign_and_waits_go_on(field: str) -> None:
    # A value under the prefix that is JSON, names its own key and has a state, but whose
    # `current`, `error` or `reverted` is not an object (another version, a hand edit): it
    # passed as a SERVICE and condo.waiting.evaluate failed on it (AttributeError) for every
    # wait on that service: out of the door's first look, that took the API server down.
    layout = KeyLayout.of("condo")
    broken = {"state": "Stable", "current": {"image": "img:1"}, field: "oops"}
    raw = encode_value("h2", "web", broken, 1.0)
    with pytest.raises(ForeignValue, match=f"{field} is not an object"):
        decode_value(layout, layout.key("web", "h2"), raw)
    good = decode_value(
        layout,
        layout.key("web", "h1"),
        encode_value("h1", "web", {"state": "Stable", "current": {"image": "img:1"}}, 1.0),
    )
    assert evaluate("web", "img:1", {"h1": {"web": good.state}}).done


async def test_long_polls_that_time_out_together_are_answered_in_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI jobs started together with one timeout: their long-polls end at the same instant, each
    # with an answer of its own. The deadline loop wrote them all without a checkpoint (10,000:
    # ~0.6 s of the one Trio thread, supervision waiting); it yields every BATCH, as the bulk
    # answers do.
    monkeypatch.setattr(door_module, "BATCH", 4)
    waiters = 12
    async with served() as server:
        server.store.set_state("web", waiting("img:2"))
        door = door_of(server)
        with trio.fail_after(CAP):
            streams = []
            for _ in range(waiters):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.send_all(
                    get("/v1/wait_for?name=web&image=img:2&timeout=0.3", server.port)
                )
                streams.append(stream)
            await wait_until(lambda: door.slots.taken == waiters)
            # The Trio thread busy: every deadline has passed when the door looks.
            time.sleep(0.4)  # noqa: ASYNC251 -- blocking on purpose
            seen: set[int] = set()
            while door.writes < waiters:  # sampled between the other tasks' steps
                seen.add(door.writes)
                await trio.lowlevel.checkpoint()
            heads = [(await read_answer(stream))[0] for stream in streams]
            for stream in streams:
                await stream.aclose()
    assert all(head.startswith(b"HTTP/1.1 500 ") for head in heads)
    assert seen & {4, 8}, f"no checkpoint between the timeouts' answers: {sorted(seen)}"


async def test_a_bug_of_the_door_costs_one_connection_never_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defence in depth: whatever the door's code raises, hypercorn serves the connection (a bug
    # when routing) or that connection alone is closed (a bug once the door holds it).
    def broken(*_: object) -> None:
        raise RuntimeError("a bug of the door")

    async with served() as server:
        with trio.fail_after(CAP):
            monkeypatch.setattr(door_module.Door, "_route", broken)
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                head, _ = await read_answer(stream)
                assert head.startswith(b"HTTP/1.1 200 ")  # quart's answer
            monkeypatch.undo()
            monkeypatch.setattr(door_module.Door, "_take", broken)
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                assert await stream.receive_some(65536) == b""  # that connection closed
            monkeypatch.undo()
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(get("/v1/state", server.port))
                head, _ = await read_answer(stream)
                assert head.startswith(b"HTTP/1.1 200 ")  # and the door serves on

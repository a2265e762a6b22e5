"""A recording proxy: a byte pump between condo and the engine (`open_unix_proxy`) or Consul
(`open_tcp_proxy`) that timestamps the start of every HTTP request it forwards, so "the first
Docker call" and "Consul writes" are measured without condo's debug logs.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio

from bench.common.wait import Feed, wall

_REQUEST_LINE = re.compile(rb"^(GET|POST|PUT|DELETE|HEAD|PATCH|OPTIONS) (\S+) HTTP/1\.[01]\r\n")


@attrs.frozen(kw_only=True)
class ProxiedRequest:
    at: float
    method: str
    target: str


class RecordingProxy:
    """Forwards bytes both ways; records the start of every HTTP request going upstream."""

    def __init__(self, connect: Callable[[], Awaitable[trio.SocketStream]]) -> None:
        self._connect = connect
        self.requests: Feed[ProxiedRequest] = Feed()
        self.address = ""

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await self._connect()
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
                # A peer that resets or closes ends the pair: HTTP has nothing to half-close.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for chunk in source:
                        if up:
                            # A request's head arrives in one write; a chunk that starts with a
                            # request line is a new request (keep-alive, never pipelined).
                            match = _REQUEST_LINE.match(chunk)
                            if match is not None:
                                self.requests.append(
                                    ProxiedRequest(
                                        at=wall(),
                                        method=match.group(1).decode(),
                                        target=match.group(2).decode(errors="replace"),
                                    )
                                )
                        await sink.send_all(chunk)
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, True)
            nursery.start_soon(pump, upstream, client, False)


@contextlib.asynccontextmanager
async def open_unix_proxy(path: Path, upstream: str) -> AsyncIterator[RecordingProxy]:
    """A recording proxy listening on the unix socket `path`, forwarding to `upstream`."""
    proxy = RecordingProxy(functools.partial(trio.open_unix_socket, upstream))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(256)
    proxy.address = str(path)
    async with _serving(proxy, [trio.SocketListener(sock)]):
        yield proxy


@contextlib.asynccontextmanager
async def open_tcp_proxy(host: str, port: int) -> AsyncIterator[RecordingProxy]:
    """A recording proxy on a free loopback port, forwarding to `host:port`."""
    proxy = RecordingProxy(functools.partial(trio.open_tcp_stream, host, port))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=256)
    bound = listeners[0].socket.getsockname()
    proxy.address = f"{bound[0]}:{bound[1]}"
    async with _serving(proxy, listeners):
        yield proxy


@contextlib.asynccontextmanager
async def _serving(
    proxy: RecordingProxy, listeners: Sequence[trio.SocketListener]
) -> AsyncIterator[None]:
    """`proxy` serves `listeners` while the block runs; they are closed at its end."""
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy.handle, listeners)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()

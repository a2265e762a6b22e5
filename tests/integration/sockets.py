"""Small socket helpers for the tests' stand-in servers and proxies in front of the engine.

`unix_listener` binds a unix socket at a path (the engine's transport); `read_head` reads an
HTTP/1.1 request head off a stream, enough for a scripted answer.
"""

from __future__ import annotations

from pathlib import Path

import trio


async def unix_listener(path: Path, *, backlog: int = 32) -> trio.SocketListener:
    """A listening unix socket at `path`."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(backlog)
    return trio.SocketListener(sock)


async def read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request's head (up to the blank line), or None when the client left before it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some()
        if not chunk:
            return None
        head += chunk
    return head

"""A minimal keep-alive HTTP/1.1 client on raw Trio sockets (`HttpConnection`), and condo's
Prometheus metrics read by name.

httpx would cost the load generator more CPU than condo spends answering, on a 2-core machine;
httpx serves only the occasional request (a metric's scrape).
"""

from __future__ import annotations

import httpx
import trio

from bench.common.wait import BenchError


class HttpConnection:
    """One keep-alive HTTP/1.1 connection for GET requests (load and long-polls)."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._buffer = bytearray()
        # The last answer said `Connection: close`: the server takes no further request here
        # (hypercorn says so on the 1,000th answer of a keep-alive connection).
        self.closing = False

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        parsed = httpx.URL(url)
        port = parsed.port or 80
        stream = await trio.open_tcp_stream(parsed.host, port)
        return cls(stream, f"{parsed.host}:{port}")

    @property
    def stream(self) -> trio.SocketStream:
        return self._stream

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def get(self, target: str) -> tuple[int, bytes]:
        """Send one GET and read its whole response: (status, body)."""
        await self.send_get(target)
        return await self.read_response()

    async def send_get(self, target: str) -> None:
        await self._stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {self._host}\r\n\r\n".encode())

    async def read_response(self) -> tuple[int, bytes]:
        """Read one whole response: (status, body)."""
        head = await self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        self.closing = "close" in headers.get("connection", "").lower()
        if "content-length" in headers:
            body = await self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._read_to_end()
        return status, body

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise BenchError("the server closed the connection mid-response")
        self._buffer += chunk

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._read_until(b"\r\n")
                return bytes(body)
            body += await self._read_exactly(size)
            await self._read_exactly(2)

    async def _read_to_end(self) -> bytes:
        while chunk := await self._stream.receive_some(65536):
            self._buffer += chunk
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


async def read_metric(url: str, name: str) -> float | None:
    """One sample of condo's Prometheus metric `name` (unlabelled), or None if absent."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_metric_at_least(url: str, name: str, value: float) -> None:
    """Until condo's metric `name` reaches `value` (callers bound the wait)."""
    # Polling on purpose: the gauge lives in another process and only answers when asked.
    while (await read_metric(url, name) or 0) < value:  # noqa: ASYNC110
        await trio.sleep(0.2)

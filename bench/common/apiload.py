"""API load from a process of its own: `/v1/state` hammered, or long-polls held then answered.

`python -m bench.common.apiload state URL CONNECTIONS` hammers `GET /v1/state` over that many
keep-alive connections until killed; `python -m bench.common.apiload polls URL TARGET COUNT`
holds COUNT long-polls (`GET TARGET`), prints `held` once every request is sent, and
`answered OK COUNT` once every answer is in (OK: how many were 200), then exits.

A process of its own because the reaction benchmark times condo's first Docker call through a
proxy that runs in the benchmark's own Trio loop: load generated in that loop would delay the
proxy's timestamps and be counted as condo's reaction.
`open_load` starts one such process and ends it (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import trio

from bench.common.rawhttp import HttpConnection
from bench.common.wait import BenchError

CONNECTING = 128  # connections being opened at once (condo's listen backlog is 128)
STOP_LIMIT = 5.0


class Load:
    """A running load process; `line()` reads its next line of output."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise BenchError(f"the load process ended: {self._buffer.decode()!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@contextlib.asynccontextmanager
async def open_load(*argv: str) -> AsyncIterator[Load]:
    """Start `python -m bench.common.apiload ARGV...`; end it when the block ends."""
    import subprocess

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.common.apiload", *argv], stdout=subprocess.PIPE
    )
    try:
        yield Load(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_LIMIT):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _state(url: str, connections: int) -> None:
    async def worker() -> None:
        while True:
            connection = await HttpConnection.open(url)
            try:
                while not connection.closing:
                    await connection.get("/v1/state")
            except (BenchError, trio.BrokenResourceError):
                pass  # dropped: reopen (the api benchmark counts these; here it is only load)
            finally:
                await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)


async def _polls(url: str, target: str, count: int) -> None:
    connecting = trio.CapacityLimiter(CONNECTING)
    sent = 0
    answered = ok = 0

    async def poll() -> None:
        nonlocal sent, answered, ok
        async with connecting:
            connection = await HttpConnection.open(url)
        try:
            await connection.send_get(target)
            sent += 1
            if sent == count:
                print("held", flush=True)
            status, body = await connection.read_response()
            answered += 1
            ok += status == 200 and b'"ok"' in body
        finally:
            await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(poll)
    print(f"answered {ok} {answered}", flush=True)


def main(argv: list[str]) -> None:
    kind, url, *rest = argv
    if kind == "state":
        trio.run(_state, url, int(rest[0]))
    else:
        trio.run(_polls, url, rest[0], int(rest[1]))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # load only: nothing to clean up
    main(sys.argv[1:])

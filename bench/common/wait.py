"""How a benchmark waits: always bounded (`deadline`, raising `BenchError`), on observations that
arrive while it waits (`Feed`), against the wall clock (`wall`).

Invariants:
- Every time is wall-clock unix seconds (the engine's event times, condo's log timestamps and our
  own share the machine's clock), so they can be subtracted from each other.
- Every wait is bounded (`deadline`), also in cleanup (shielded).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


class BenchError(Exception):
    """A benchmark could not measure what it set out to (not: a bar was missed)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a wait; on expiry raise BenchError naming what did not happen."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise BenchError(f"{what}: not done within {seconds:g} s") from None


def wall() -> float:
    return time.time()


class Feed(Generic[T]):
    """An append-only list of observations; waiters re-check their condition on every append."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.closed = False
        self._changed = trio.Event()

    def append(self, item: T) -> None:
        self.items.append(item)
        self._bump()

    def close(self) -> None:
        self.closed = True
        self._bump()

    def _bump(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, found: Callable[[], R | None]) -> R:
        """The first non-None `found()`, re-evaluated after every append (no polling)."""
        while True:
            result = found()
            if result is not None:
                return result
            if self.closed:
                raise BenchError("the observed stream ended before the condition was met")
            await self._changed.wait()

    async def next_after(self, mark: int, match: Callable[[T], bool]) -> T:
        """The first item at index ≥ `mark` that matches, waiting for it if needed."""
        return await self.wait_for(functools.partial(self.first_after, mark, match))

    def first_after(self, mark: int, match: Callable[[T], bool]) -> T | None:
        """The first item at index ≥ `mark` that matches."""
        for item in self.items[mark:]:
            if match(item):
                return item
        return None

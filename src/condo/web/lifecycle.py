"""The web app's shutdown switch: one call wakes every long-poll and websocket at once.

hypercorn does not interrupt requests in flight at shutdown: it waits up to its graceful timeout
and then drops them (hypercorn 0.17's trio worker). So every handler that may wait long runs inside
`Closing.guard()`, a cancel scope that `close()` cancels; the handler then answers 503 (HTTP) or
closes with 1001 (websocket) by itself, well before hypercorn's deadline.

Invariants: after `close()`, every open guard is cancelled and every new guard starts cancelled;
`close()` is synchronous, idempotent and never blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Closing:
    """Tracks the cancel scopes of waiting handlers, to cancel them all at shutdown."""

    def __init__(self) -> None:
        self._closed = False
        self._scopes: set[trio.CancelScope] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        for scope in self._scopes:
            scope.cancel()

    @contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that `close()` cancels; check `cancelled_caught` after it."""
        scope = trio.CancelScope()
        if self._closed:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

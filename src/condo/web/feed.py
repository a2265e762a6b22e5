"""`WS /v1/feed`: the full `/v1/state` as the first message, then the latest state on every change.

Latest-value semantics: each connection remembers only the last version it sent; after a send it
reads the Store's *current* version, so a slow client skips the versions it was too slow for and
never builds a backlog. A send blocks only its own connection: the Store is never waited on by
writers (its listeners are synchronous), so condo and the other clients carry on. Messages are
encoded once per version, however many clients read them.

Message: `{"type": "snapshot", "version": N, "state": {"host": ..., "services": {...}}}`.
Whatever the client sends is read and dropped (so its disconnect is noticed at once).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from condo.store import Store


class Snapshots:
    """The feed message of the Store's current version, encoded at most once per version."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._version = -1
        self._text = ""

    def latest(self) -> tuple[int, str]:
        version = self._store.version
        if version != self._version:
            message = {"type": "snapshot", "version": version, "state": self._store.view()}
            self._text = json.dumps(message, separators=(",", ":"), sort_keys=True)
            self._version = version
        return self._version, self._text


async def run_feed(
    store: Store,
    snapshots: Snapshots,
    send: Callable[[str], Awaitable[None]],
    receive: Callable[[], Awaitable[object]],
) -> None:
    """Send the snapshot now and after every change, until cancelled (or the client leaves).

    Never returns by itself; typed `None` (not NoReturn) because callers catch its cancellation
    in their own scope and carry on.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drop_incoming, receive)
        sent = -1
        while True:
            version, text = snapshots.latest()
            if version != sent:
                await send(text)
                sent = version
            await store.wait_changed(sent)


async def _drop_incoming(receive: Callable[[], Awaitable[object]]) -> NoReturn:
    # The feed is one-way; reading keeps the server's small inbound queue from filling up.
    while True:
        await receive()

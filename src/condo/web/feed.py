"""`WS /v1/feed`: the full `/v1/state` as the first message, then the latest state on every change.

Latest-value semantics: each connection remembers only the last version it sent; after a send it
reads the Store's *current* version, so a slow client skips the versions it was too slow for and
never builds a backlog. A send blocks only its own connection: the Store is never waited on by
writers (its listeners are synchronous), so condo and the other clients carry on. Messages are
encoded once per version, however many clients read them.

Messages (JSON objects, told apart by `type`):
- `{"type": "snapshot", "version": N, "state": {"host": ..., "services": {...}}}`: this host's
  `/v1/state`; always the first message, then one per change of the Store.
- `{"type": "global", "token": T, "stale": bool, "hosts": {H: {"services", "live", "last_seen",
  "runs"?}}}`: every host's services (the `/v1/global_state` hosts, plus the picture's token and
  whether Consul could not be read lately). Only when condo exposes to Consul: right after the
  first snapshot, then one per new picture (or change of `stale`). Same latest-value rule,
  independently of the snapshots.
- `{"type": "history", "version": N, "services": {NAME: [DEPLOY...]}}`: deploy history
  (`/v1/history`'s DEPLOY objects, newest first): every service's right after the first
  snapshot (when there is any), then, per change of the history, the whole list of each
  service that changed since the last one this client got (latest value: a slow client gets
  one message with the newest lists, never a backlog). Independent of the other two.
Whatever the client sends is read and dropped (so its disconnect is noticed at once).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from condo.history import History
from condo.memo import PerVersion
from condo.store import Store
from condo.waiting import StateSource, hosts_document


def _encode(message: dict[str, object]) -> str:
    return json.dumps(message, separators=(",", ":"), sort_keys=True)


class Snapshots(PerVersion[int, str]):
    """The feed message of the Store's current version, encoded at most once per version."""

    def __init__(self, store: Store) -> None:
        super().__init__(
            lambda: store.version,
            lambda version: _encode(
                {"type": "snapshot", "version": version, "state": store.view()}
            ),
        )


class GlobalSnapshots(PerVersion[tuple[int, bool], str]):
    """The feed's `global` message of a StateSource's current picture, encoded once per picture.

    The version of a message is (token, stale): a source may wake its waiters for a change of
    staleness alone (condo.consul.ConsulSource does), with the same token.
    """

    def __init__(self, source: StateSource) -> None:
        self.source = source
        super().__init__(lambda: (source.picture().token, source.stale), self._message)

    def _message(self, version: tuple[int, bool]) -> str:
        token, stale = version
        # Synchronous with the version read: the picture is the one `version` names.
        picture = self.source.picture()
        hosts = hosts_document(picture)
        return _encode({"type": "global", "token": token, "stale": stale, "hosts": hosts})


async def run_feed(
    store: Store,
    snapshots: Snapshots,
    send: Callable[[str], Awaitable[None]],
    receive: Callable[[], Awaitable[object]],
    global_snapshots: GlobalSnapshots | None = None,
    history: History | None = None,
) -> None:
    """Send the snapshot now and after every change, until cancelled (or the client leaves);
    with `global_snapshots`, also every host's picture, from right after the first snapshot.

    Never returns by itself; typed `None` (not NoReturn) because callers catch its cancellation
    in their own scope and carry on.
    """
    # Two senders share one websocket: one message at a time, never interleaved.
    sending = trio.Lock()

    async def send_one(text: str) -> None:
        async with sending:
            await send(text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drop_incoming, receive)
        sent = -1
        while True:
            version, text = snapshots.latest()
            if version != sent:
                await send_one(text)
                if sent == -1 and global_snapshots is not None:
                    nursery.start_soon(_send_pictures, global_snapshots, send_one)
                if sent == -1 and history is not None:
                    nursery.start_soon(_send_history, history, send_one)
                sent = version
            await store.wait_changed(sent)


async def _send_pictures(
    global_snapshots: GlobalSnapshots, send: Callable[[str], Awaitable[None]]
) -> NoReturn:
    sent: tuple[int, bool] | None = None
    while True:
        key, text = global_snapshots.latest()
        if key != sent:
            await send(text)
            sent = key
        await global_snapshots.source.wait_beyond(key[0])


async def _send_history(history: History, send: Callable[[str], Awaitable[None]]) -> NoReturn:
    sent = -1  # every service first
    while True:
        version, services = history.changed_since(sent)
        if services:  # never an empty message (a condo that has deployed nothing yet)
            await send(_encode({"type": "history", "version": version, "services": services}))
        sent = version
        await history.wait_changed(sent)


async def _drop_incoming(receive: Callable[[], Awaitable[object]]) -> NoReturn:
    # The feed is one-way; reading keeps the server's small inbound queue from filling up.
    while True:
        await receive()

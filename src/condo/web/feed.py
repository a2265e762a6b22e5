"""`WS /v1/feed`: the full `/v1/state` as the first message, then the latest state on every change.

Latest-value semantics: each connection remembers only the last version it sent; after a send it
reads the Store's *current* version, so a slow client skips the versions it was too slow for and
never builds a backlog. A send blocks only its own connection: the Store is never waited on by
writers (its listeners are synchronous), so condo and the other clients carry on. Messages are
encoded once per version, however many clients read them.

Messages (JSON objects, told apart by `type`):
- `{"type": "snapshot", "version": N, "state": {"host": ..., "services": {...}}}`: this host's
  `/v1/state`; always the first message, then one per change of the Store.
- `{"type": "global", "token": T, "stale": bool, "read_at": T|null, "hosts": {H: {"services",
  "live", "last_seen", "runs"?}}}`: every host's services (the `/v1/global_state` hosts, plus the
  picture's token, whether Consul could not be read lately and when it last was). Only when
  condo exposes to Consul: right after the first snapshot (a fresh picture: an idle source reads
  first), then one per new picture (or change of `stale`); the connection is demand (Consul is
  followed while it lasts). Same latest-value rule, independently of the snapshots.
- `{"type": "global_delta", "token", "stale", "read_at", "hosts": {H: BODY}, "gone": [H...]}`:
  for a client that asked for them (`?global=delta`: the dashboard), in place of every `global`
  after the first: only the hosts whose body differs from what this client was last sent, and the
  hosts it was sent that are gone; applied to the last `global`, it makes the new picture. Its
  size grows with what changed, not with the fleet. (Opt-in: a client of the first contract
  keeps getting whole `global` messages.)
- `{"type": "history", "version": N, "services": {NAME: [DEPLOY...]}}`: deploy history
  (`/v1/history`'s DEPLOY objects, newest first): every service's right after the first
  snapshot (when there is any), then, per change of the history, the whole list of each
  service that changed since the last one this client got (latest value: a slow client gets
  one message with the newest lists, never a backlog). Independent of the other two.
Whatever the client sends is read and dropped (so its disconnect is noticed at once).

Each host's body is encoded once per change of that host (a picture keeps the mappings of hosts
it did not touch: condo.consul.ConsulSource), so a new picture costs the hosts that changed, and
each client's delta is a comparison of those encoded bodies with the ones it was sent.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

import attrs
import trio

from condo.history import History
from condo.memo import PerVersion
from condo.store import Store
from condo.waiting import StateSource, host_document


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


@attrs.frozen(kw_only=True)
class GlobalPicture:
    """One picture for the feed: each host's body encoded, and the messages made of them."""

    token: int
    stale: bool
    read_at: float | None
    bodies: Mapping[str, str]  # host -> its encoded `hosts_document` body

    def _head(self) -> str:
        return (
            f"{_encode({'read_at': self.read_at, 'stale': self.stale, 'token': self.token})[:-1]},"
        )

    def full(self) -> str:
        """The `global` message: every host."""
        hosts = ",".join(f"{json.dumps(host)}:{body}" for host, body in self.bodies.items())
        return f'{self._head()}"type":"global","hosts":{{{hosts}}}}}'

    def delta(self, sent: Mapping[str, str]) -> str:
        """The `global_delta` message for a client that was last sent the bodies `sent`."""
        bodies = self.bodies
        changed = [
            f"{json.dumps(host)}:{body}"
            for host, body in bodies.items()
            if (before := sent.get(host)) is not body and before != body
        ]
        gone = json.dumps([host for host in sent if host not in bodies])
        return (
            f'{self._head()}"type":"global_delta","gone":{gone},"hosts":{{{",".join(changed)}}}}}'
        )


class GlobalSnapshots(PerVersion[tuple[int, bool], GlobalPicture]):
    """The feed's view of a StateSource's current picture, built once per picture.

    The version of a picture is (token, stale): a source may wake its waiters for a change of
    staleness alone (condo.consul.ConsulSource does), with the same token. A host's body is
    encoded again only when its services or its record are other objects than last time.
    """

    def __init__(self, source: StateSource) -> None:
        self.source = source
        # host -> (its services, its record, their encoded body) as of the last picture
        self._encoded: dict[str, tuple[object, object, str]] = {}
        super().__init__(lambda: (source.picture().token, source.stale), self._build)

    def _build(self, version: tuple[int, bool]) -> GlobalPicture:
        token, stale = version
        # Synchronous with the version read: the picture is the one `version` names.
        picture = self.source.picture()
        encoded: dict[str, tuple[object, object, str]] = {}
        for host in sorted(picture.hosts.keys() | picture.records.keys()):
            services, record = picture.hosts.get(host), picture.records.get(host)
            known = self._encoded.get(host)
            if known is not None and known[0] is services and known[1] is record:
                encoded[host] = known
            else:
                encoded[host] = (services, record, _encode(host_document(picture, host)))
        self._encoded = encoded
        bodies = {host: body for host, (_, _, body) in encoded.items()}
        return GlobalPicture(token=token, stale=stale, read_at=self.source.read_at, bodies=bodies)


async def run_feed(
    store: Store,
    snapshots: Snapshots,
    send: Callable[[str], Awaitable[None]],
    receive: Callable[[], Awaitable[object]],
    global_snapshots: GlobalSnapshots | None = None,
    history: History | None = None,
    *,
    deltas: bool = False,
) -> None:
    """Send the snapshot now and after every change, until cancelled (or the client leaves);
    with `global_snapshots`, also every host's picture, from right after the first snapshot
    (whole each time, or as `global_delta` messages after the first with `deltas`).

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
                    nursery.start_soon(_send_pictures, global_snapshots, send_one, deltas)
                if sent == -1 and history is not None:
                    nursery.start_soon(_send_history, history, send_one)
                sent = version
            await store.wait_changed(sent)


async def _send_pictures(
    global_snapshots: GlobalSnapshots, send: Callable[[str], Awaitable[None]], deltas: bool
) -> NoReturn:
    sent_key: tuple[int, bool] | None = None
    sent: Mapping[str, str] | None = None  # the bodies this client has: None before the first
    source = global_snapshots.source
    # The client follows the fleet for as long as it is connected (sends included): Consul's
    # source reads only while somebody asks, and the first picture is a fresh one.
    with source.demand():
        await source.fresh()
        while True:
            key, picture = global_snapshots.latest()
            if key != sent_key:
                await send(picture.full() if sent is None or not deltas else picture.delta(sent))
                sent_key, sent = key, picture.bodies
                # Read again before waiting: a change of staleness alone during the send keeps
                # the token, and waiting beyond that token would miss it.
                continue
            await source.wait_beyond(key[0])


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

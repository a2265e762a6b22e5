"""`ConsulSource`: every host's services, as Consul holds them, for the web app (a StateSource).

One watcher task (`run`) reads `<prefix>/` with blocking queries and keeps the latest `Picture`
(token: the read's `X-Consul-Index`; hosts: {host: {service: SERVICE}} from the keys held by live
sessions; records: every host's record, whether it is live, and when it was last seen live); a
change swaps in a fresh `trio.Event`, so any number of `wait_beyond` callers cost one query in
flight.

What a wake-up costs (many hosts: 200 x 20 keys is ~5 MB of answer): a key whose ModifyIndex and
bytes are those of the last read is not decoded again (its decoded objects are reused, so that
comparing pictures is cheap too); a small prefix is read whole, one blocking query; a large one
(over PROBE_WORTH bytes per folder) by folder: a blocking `?keys&separator=/` on the prefix (the
folders' names), one probe per folder (`?keys&separator=/` on the folder's path without its `/`:
Consul's index of everything under it), and a read of each folder whose index moved. `reads`,
`read_bytes` and `decodes` count what it did.

Invariants:
- Blocking-query index rules (Consul's HTTP API docs, "Blocking Queries"): start at 0 (no
  blocking), then pass the last `X-Consul-Index`; an index that goes backwards (a restarted
  agent) or any failed read resets to 0; never block with 0. By folder, a folder is read again
  whenever its probe's index differs from the one it had when last read (any difference: a
  restarted agent's smaller index too). A probe comes before the read it guards (after a whole
  read, the folder's newest ModifyIndex stands for it), so a change in between is read again
  at the next wake-up, never lost. Reads start at most every
  MIN_READ_INTERVAL (Consul may answer a blocking query at once, again and again).
- A foreign or broken value skips that key only (logged once per key and version), never the
  whole read. An empty prefix (Consul's 404) is an empty picture, not an error.
- The token only moves when the picture (or a key's holder) changes, and only forwards, even
  across an index reset, so `wait_beyond` never waits on a picture it has already seen.
- A host is live while its `.live` key (or any service key of it) is held by a session. When it
  stops being live, its `last_seen` is the wall time of the last read that saw it live (from
  this process; the record's own time when this process never saw it live). Live hosts carry
  no time in the picture, so that reads which change nothing wake nobody.
- While Consul cannot be read the picture keeps its last value and `stale` is true; the first
  good read clears it. Both changes of `stale` wake waiters (with the token unchanged), so a
  reader can wait for the first read even when the prefix is empty.
- Any call of this process that Consul did not answer (the publisher's too: a timeout, a 5xx
  such as "No cluster leader") makes the picture stale until a read answered after it, and the
  blocking read in flight is abandoned for a new one at once: it may hang on a connection that
  died with the old leader (for its whole wait), and a later answer to some other call (a
  renewal the new leader takes) says nothing about what this picture missed meanwhile.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog
import trio

from condo.consul.client import ConsulClient, Entry, Folders, Listing, SessionId
from condo.consul.layout import (
    LIVE,
    RECORDS,
    ForeignValue,
    KeyLayout,
    Published,
    Record,
    decode_record,
    decode_value,
)
from condo.errors import ConsulError, ForgetRefused
from condo.waiting import HostRecord, Picture

log = structlog.get_logger(__name__)

MIN_READ_INTERVAL = 0.02
FIRST_RETRY_DELAY = 0.1
# Capped so that a read after Consul comes back happens within ~1 s (catch-up within 2 s).
MAX_RETRY_DELAY = 1.0
PROBES_IN_FLIGHT = 1  # probes one after the other, on one connection: cheapest here
# A whole read of the prefix costs this process about as much per this many bytes of answer as
# one probe of a folder (measured: ~1 ms of CPU per request, ~20 us per KiB of a whole read:
# Python and httpx on a 2-core machine); below that the prefix is read whole.
PROBE_WORTH = 64 * 1024


class _Kind(enum.Enum):
    SERVICE = "service"  # <prefix>/<service>/<host>: a Published
    LIVE = "live"  # .live/<host>: the host's name
    RECORD = "record"  # .hosts/<host>: a Record
    FOREIGN = "foreign"  # anything else: why it is skipped


@attrs.frozen
class _Decoded:
    """One key as last decoded, with what it was decoded from: a read that brings the same
    ModifyIndex and the same bytes reuses it (no JSON decode, no check, the same objects, so
    that comparing pictures is cheap too)."""

    modify_index: int
    raw: bytes | None
    kind: _Kind
    what: Published | Record | str

    def same(self, entry: Entry) -> bool:
        # The bytes too: a restarted agent reuses small indexes for other values.
        return entry.modify_index == self.modify_index and entry.value == self.raw


class ConsulSource:
    """The global picture from Consul; `run` (one task) keeps it fresh."""

    def __init__(
        self, client: ConsulClient, layout: KeyLayout, *, probe_worth: int = PROBE_WORTH
    ) -> None:
        self._client = client
        self._layout = layout
        self._probe_worth = probe_worth
        self._picture = Picture(token=0, hosts={})
        # (service, host) -> the session that holds its key: what the publisher checks itself by
        self._holders: Mapping[tuple[str, str], SessionId | None] = {}
        self._changed = trio.Event()
        self._read_ok = False  # the last read (if any) succeeded
        self._fresh_at: float | None = None  # Trio time of the last good read
        self._read_at: float | None = None  # wall time of the last good read
        self._seen_live: dict[str, float] = {}  # host -> wall time of the last read it was live
        self._reported: dict[str, int] = {}  # key -> ModifyIndex of a foreign value logged once
        self._read_observers: list[Callable[[], None]] = []
        self._reading: trio.CancelScope | None = None  # the read in flight, if any
        self._decoded: dict[str, _Decoded] = {}  # key -> its value as of the last read
        self._entries: dict[str, Entry] = {}  # key -> its entry as of its folder's last read
        self._probed: dict[str, int] = {}  # folder -> its index when it was last read
        self._whole_size = 0  # bytes of a whole read of the prefix (the last one, or estimated)
        # Counters (tests, the multihost bench): good reads applied, the bytes of their answers
        # (what condo parsed: Consul's body after gzip), and the values decoded from JSON.
        self.reads = 0
        self.read_bytes = 0
        self.decodes = 0

    def __repr__(self) -> str:
        return f"ConsulSource(prefix={self._layout.prefix!r}, token={self._picture.token})"

    # --- StateSource ------------------------------------------------------------------------

    def picture(self) -> Picture:
        return self._picture

    async def wait_beyond(self, token: int) -> None:
        if self._picture.token != token:
            return
        await self._changed.wait()

    @property
    def read_at(self) -> float | None:
        return self._read_at

    # --- extras -----------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """True until the first good read, and from any call Consul did not answer until the
        next good read."""
        if not self._read_ok or self._fresh_at is None:
            return True
        failed = self._client.failed_at
        # Another task of this process (the publisher) found Consul silent since this read.
        return failed is not None and failed > self._fresh_at

    def add_read_observer(self, observer: Callable[[], None]) -> None:
        """Call `observer` (synchronously; it must not block) after every good read, changed or
        not: a read equal to the last picture may still contradict what a writer believes."""
        self._read_observers.append(observer)

    def holders(self, host: str) -> Mapping[str, SessionId | None]:
        """service -> the session holding `<prefix>/<service>/<host>`, as of the latest read."""
        return {svc: sid for (svc, h), sid in self._holders.items() if h == host}

    # --- the watcher ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and follow the prefix until cancelled; reports started at once (Consul may be
        away: the picture is then empty and stale)."""
        self._client.add_failure_observer(self._unanswered)
        task_status.started()
        index = 0
        delay = FIRST_RETRY_DELAY
        failing_since: float | None = None
        while True:
            started = trio.current_time()
            try:
                with trio.CancelScope() as reading:
                    self._reading = reading
                    listing = await self._read(index)
                self._reading = None
                if reading.cancelled_caught:
                    index = 0  # abandoned (see _unanswered): read afresh, without blocking
                    await trio.sleep_until(started + MIN_READ_INTERVAL)
                    continue
            except ConsulError as exc:
                if self._read_ok:
                    self._read_ok = False
                    self._wake()  # `stale` changed: a (spurious) wake-up lets readers see it
                if failing_since is None:
                    failing_since = started
                    # Once per outage. A transient outage is the publisher's to report (it
                    # meets it too); a permanent refusal (ACL) may be this read's alone.
                    report = log.debug if exc.transient else log.warning
                    report("consul.watch_failed", error=str(exc))
                index = 0  # the agent may come back restarted, with smaller indexes
                await trio.sleep(delay if exc.transient else MAX_RETRY_DELAY * 10)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            if failing_since is not None:
                outage = round(trio.current_time() - failing_since, 3)
                log.debug("consul.watch_resumed", outage=outage)
                failing_since = None
            delay = FIRST_RETRY_DELAY
            self._apply(listing)
            # (An index gone backwards, a restarted agent, was read afresh by `_read`.)
            index = max(listing.index, 1)
            await trio.sleep_until(started + MIN_READ_INTERVAL)

    async def _read(self, index: int) -> Listing:
        """The whole prefix as it is now, read afresh (index 0) or once it changed beyond
        `index`, reading as little as pays.

        A small prefix is read whole, with one blocking query, as before. A large one (its whole
        answer worth more than PROBE_WORTH bytes per folder) is followed by folder: a blocking
        `?keys&separator=/` on the prefix waits for any change and names its folders
        (`<prefix>/<service>/`, `.live/`, `.hosts/`: a few bytes each); each folder's own index
        (a probe of the folder's path without its `/`: a few bytes) tells which folders changed,
        and only those are read again; the others keep the entries of their last read. So the
        bytes of a wake-up grow with the folders that changed, not with the prefix."""
        if index == 0:
            return await self._read_whole(0)
        if self._whole_size <= self._probe_worth * max(len(self._probed), 1):
            return await self._read_whole(index)
        root = await self._client.list_folders(self._layout.folder, index=index)
        if root.index < index:
            return await self._read_whole(0)  # backwards: a restarted agent
        probed = await self._probe(root)
        size = root.size + sum(probe.size for probe in probed.values())
        changed = [name for name, probe in probed.items() if self._probed.get(name) != probe.index]
        kept = {name for name in probed if name not in changed}
        entries = {k: e for k, e in self._entries.items() if self._folder_of(k) in kept}
        for name in changed:
            part = await self._client.read_prefix(name)
            size += part.size
            entries |= {entry.key: entry for entry in part.entries}
        self._entries = {key: entries[key] for key in sorted(entries)}
        self._probed = {name: probe.index for name, probe in probed.items()}
        # What a whole read would bring now (the values, base64, and Consul's framing).
        self._whole_size = sum(len(e.value or b"") * 4 // 3 + 200 for e in self._entries.values())
        return Listing(index=root.index, entries=tuple(self._entries.values()), size=size)

    async def _read_whole(self, index: int) -> Listing:
        listing = await self._client.read_prefix(self._layout.folder, index=index)
        if listing.index < index:  # backwards: a restarted agent; read afresh at once
            listing = await self._client.read_prefix(self._layout.folder)
        self._whole_size = listing.size
        self._entries = {entry.key: entry for entry in listing.entries}
        # What each folder's probe will answer if nothing changes: its newest ModifyIndex (a
        # probe of `<prefix>/web` also covers `<prefix>/webapp/`). A change after this read has
        # a higher index, so that its folder is read again; an older delete (a tombstone) may
        # cost one needless read of its folder.
        newest: dict[str, int] = {}
        for entry in listing.entries:
            name = self._folder_of(entry.key)
            newest[name] = max(newest.get(name, 0), entry.modify_index)
        self._probed = {
            name: max(i for other, i in newest.items() if other.startswith(name.removesuffix("/")))
            for name in newest
        }
        return listing

    async def _probe(self, root: Folders) -> dict[str, Folders]:
        """Each folder's index (concurrently: one round trip for all)."""
        probed: dict[str, Folders] = {}
        failed: list[ConsulError] = []

        async def probe(name: str, cancel: trio.CancelScope) -> None:
            try:
                probed[name] = await self._client.list_folders(name.removesuffix("/"))
            except ConsulError as exc:  # raised as itself below, not in an exception group
                failed.append(exc)
                cancel.cancel()

        limiter = trio.CapacityLimiter(PROBES_IN_FLIGHT)

        async def limited(name: str, cancel: trio.CancelScope) -> None:
            async with limiter:
                await probe(name, cancel)

        async with trio.open_nursery() as nursery:
            for name in root.names:
                nursery.start_soon(limited, name, nursery.cancel_scope)
        if failed:
            raise failed[0]
        return {name: probed[name] for name in root.names}

    def _folder_of(self, key: str) -> str:
        """The name the prefix's `?keys&separator=/` gives `key`: its folder, or itself."""
        rest = key[len(self._layout.folder) :]
        cut = rest.find("/")
        return key if cut < 0 else key[: len(self._layout.folder) + cut + 1]

    def _unanswered(self) -> None:
        """A call got no answer from Consul: the picture is stale (`stale` says so from now on);
        waiters hear of it, and the read in flight is abandoned for a new one."""
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
        self._wake()

    def _apply(self, listing: Listing) -> None:
        self.reads += 1
        self.read_bytes += listing.size
        hosts: dict[str, dict[str, Mapping[str, Any]]] = {}
        holders: dict[tuple[str, str], SessionId | None] = {}
        recorded: dict[str, tuple[Mapping[str, Mapping[str, Any]], float]] = {}
        live: set[str] = set()
        seen: set[str] = set()
        decoded: dict[str, _Decoded] = {}
        for entry in listing.entries:
            seen.add(entry.key)
            known = self._decoded.get(entry.key)
            if known is None or not known.same(entry):
                known = self._decode(entry)
            decoded[entry.key] = known
            kind, what = known.kind, known.what
            if kind is _Kind.FOREIGN:
                self._report(entry.key, entry.modify_index, str(what))
            elif kind is _Kind.RECORD:
                assert isinstance(what, Record)
                recorded[what.host] = (what.services, what.at)
            elif kind is _Kind.LIVE:
                assert isinstance(what, str)
                holders[LIVE, what] = entry.session
                if entry.session is not None:
                    live.add(what)
            else:
                assert isinstance(what, Published)
                hosts.setdefault(what.host, {})[what.service] = what.state
                holders[what.service, what.host] = entry.session
                if entry.session is not None:
                    live.add(what.host)
        # Only the keys of this read: a key gone from Consul leaves the cache with it.
        self._decoded = decoded
        # Forget reports of keys that are gone, so the set never grows without bound.
        self._reported = {k: i for k, i in self._reported.items() if k in seen}
        # Stale for any reason (this read's failures or the publisher's): a waiter that would
        # not decide from the picture then is woken now that it is fresh again.
        was_stale, self._read_ok = self.stale, True
        self._fresh_at = trio.current_time()
        self._read_at = time.time()
        for host in live:
            self._seen_live[host] = self._read_at
        self._seen_live = {h: t for h, t in self._seen_live.items() if h in recorded or h in live}
        records = {
            host: HostRecord(
                services=services,
                live=host in live,
                last_seen=None if host in live else self._seen_live.get(host, at),
            )
            for host, (services, at) in recorded.items()
        }
        if (
            hosts != self._picture.hosts
            or holders != self._holders
            or records != self._picture.records
        ):
            token = (
                listing.index if listing.index > self._picture.token else self._picture.token + 1
            )
            self._picture = Picture(token=token, hosts=hosts, records=records)
            self._holders = holders
            self._wake()
        elif was_stale:
            self._wake()  # the same picture, but no longer stale (or no longer unknown)
        # else: a wake-up with nothing new for waiters (another key, a mere index bump)
        for observer in self._read_observers:
            observer()

    # --- HostDirectory ----------------------------------------------------------------------

    async def forget(self, host: str) -> None:
        """Remove `host`'s record (a decommissioned host), checked against a fresh read: a live
        host (or one this read cannot confirm is gone) is never forgotten. Live is what holds a
        session: a key held by one, or the session itself (its condo runs, although its keys
        were deleted by hand or are not written yet)."""
        try:
            listing = await self._client.read_prefix(self._layout.folder)
            sessions = await self._client.list_sessions()
        except ConsulError as exc:
            raise ForgetRefused(f"Consul cannot be read: {exc}", reason="unavailable") from exc
        self._apply(listing)
        picture = self._picture
        record = picture.records.get(host)
        session = self._layout.session_name(host)
        if (
            host in picture.hosts
            or (record is not None and record.live)
            or any(held.name == session for held in sessions)
        ):
            raise ForgetRefused(
                f"{host} is live: its condo runs and holds its session (stop it, or remove its"
                " specs, first)",
                reason="live",
            )
        if record is None:
            raise ForgetRefused(f"no host {host!r} under {self._layout.folder}", reason="unknown")
        try:
            await self._client.delete(self._layout.record_key(host))
            await self._client.delete(self._layout.live_key(host))  # a leftover, if any
        except ConsulError as exc:
            raise ForgetRefused(f"Consul refused: {exc}", reason="unavailable") from exc
        log.warning("consul.host_forgotten", host=host, ran=sorted(record.services))

    def _decode(self, entry: Entry) -> _Decoded:
        """Decode one key whose ModifyIndex (or bytes) moved since the last read."""
        self.decodes += 1
        where = self._layout.parse(entry.key)
        what: Published | Record | str
        try:
            if where is not None and where[0] == RECORDS:
                kind, what = _Kind.RECORD, decode_record(self._layout, entry.key, entry.value)
            elif where is not None and where[0] == LIVE:
                kind, what = _Kind.LIVE, where[1]
            else:
                kind, what = _Kind.SERVICE, decode_value(self._layout, entry.key, entry.value)
        except ForeignValue as exc:
            kind, what = _Kind.FOREIGN, str(exc)
        return _Decoded(entry.modify_index, entry.value, kind, what)

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _report(self, key: str, modify_index: int, reason: str) -> None:
        if self._reported.get(key) == modify_index:
            return
        self._reported[key] = modify_index
        log.warning("consul.foreign_value", key=key, reason=reason)

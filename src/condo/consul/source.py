"""`ConsulSource`: every host's services, as Consul holds them, for the web app (a StateSource).

One watcher task (`run`) reads `<prefix>/` with blocking queries and keeps the latest `Picture`
(token: the read's `X-Consul-Index`; hosts: {host: {service: SERVICE}} from the keys held by live
sessions; records: every host's record, whether it is live, and when it was last seen live); a
change swaps in a fresh `trio.Event`, so any number of `wait_beyond` callers cost one query in
flight.

What a change costs (many hosts: 200 x 20 keys is ~5 MB of answer): a key whose ModifyIndex and
bytes are those of the last read is not decoded again (its decoded objects are reused), and a
read is applied from the folders it brought alone (the picture is rebuilt for the hosts they
touch). A small prefix is read whole, one blocking query; a large one (over WATCH_WORTH bytes,
in at most MAX_WATCHES folders) is followed by folder: one blocking `?recurse` watch per folder
(`<prefix>/<service>/`, `.live/`, `.hosts/`), all in flight at once, and one blocking
`?keys&separator=/` on the prefix (the folders' names: folders come and go). A change wakes its
folder's watch (Consul's index of a prefix is its newest write or delete) and the prefix's: two
answers, the bytes of one folder.
`requests`, `reads`, `read_bytes` and `decodes` count what it did.

It follows Consul only while somebody asks (many hosts on one Consul: each change would
otherwise wake every condo of the fleet): `demand()` (held by every `wait_beyond`, by
condo.web's open waits and feeds) starts it, and it stops `linger` seconds (LINGER: CI's
consecutive `condo wait`s and a dashboard reload stay warm) after the last demand ended. One-shot
readers (`/v1/global_state`, a feed's first picture) `await fresh()`: demand, and the first read
that ends after it (bounded: FRESH_LIMIT). `following` says which it is (`/metrics`:
`condo_consul_following`).

Invariants:
- Blocking-query index rules (Consul's HTTP API docs, "Blocking Queries"): start at 0 (no
  blocking), then pass the last `X-Consul-Index`; an index that goes backwards (a restarted
  agent, tombstones reaped) or any failed read resets to 0 (a whole read, then the watches
  again); never block with 0. By folder, every watch starts from the index of the whole read
  before it (everything under the prefix is at most that: a later change is beyond it, never
  lost); a folder that appears is read at once (index 0), then followed. A watch starts a read
  at most every MIN_READ_INTERVAL (Consul may answer a blocking query at once, again and
  again).
- By folder, the keys of one change that spans folders (a session ending deletes its host's
  keys in every folder) arrive folder by folder, milliseconds apart; each in-between picture
  is one a whole read could not give, but the truth rules hold for it (a host live by its
  `.live` key whose service key went first is pending, never done: its record names it).
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
- Idle (no demand, the linger over) it sends no query at all: other hosts' writes cost this
  process nothing. The picture keeps its last value, `read_at` the wall time of the last good
  read (it grows old), and `stale` is true: nobody follows, the picture may be out of date (so
  that nothing decides from it: `SharedWaits` evaluates no stale picture). The publisher checks
  its own keys by itself meanwhile (condo.consul.publisher).
- Demand is a count, no task: taking it is synchronous and free. Demand after idle starts a
  whole read from index 0 (the decode cache makes it cost the bytes, not the decodes), then
  follows with the rules above; `stale` stays true until that read is good, and its end (good
  or failed) ends every `fresh()` waiting on it. Demand during the linger keeps following
  (no read is lost, none is repeated).
- `forget` reads on its own (a whole read and the sessions), idle or not, and applies that read;
  idle, the picture stays `stale` after it (nobody follows beyond it).
- Any call of this process that Consul did not answer (the publisher's too: a timeout, a 5xx
  such as "No cluster leader") makes the picture stale until a read answered after it, and the
  blocking read in flight is abandoned for a new one at once: it may hang on a connection that
  died with the old leader (for its whole wait), and a later answer to some other call (a
  renewal the new leader takes) says nothing about what this picture missed meanwhile.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import structlog
import trio

from condo.consul.client import MAX_CONNECTIONS, ConsulClient, Entry, Listing, SessionId
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
# How long the source keeps following after the last demand ended: CI's consecutive `condo
# wait`s, a dashboard reloaded, `condo wait`'s progress reads a second apart stay warm (one whole
# read each time otherwise).
LINGER = 30.0
# How long a one-shot reader (`fresh`) waits for the read its demand started: a local agent
# answers a whole read in milliseconds; beyond this, it answers from the stale picture, saying so.
FRESH_LIMIT = 2.0
FIRST_RETRY_DELAY = 0.1
# Capped so that a read after Consul comes back happens within ~1 s (catch-up within 2 s).
MAX_RETRY_DELAY = 1.0
# A prefix whose whole answer is over this many bytes is followed by folder: a whole read costs
# this process ~20 us of CPU per KiB of answer (Python and httpx on a 2-core machine), an answer
# ~1 ms; below this, one whole read per change is as cheap as two small answers.
WATCH_WORTH = 64 * 1024
# ... unless it has more folders than this: every folder's watch holds a connection to the agent,
# and Consul's agent takes at most 200 at once from one address (`http_max_conns_per_client`),
# the publisher's and other clients' included. Beyond it the prefix is read whole. (Below the
# client's own MAX_CONNECTIONS, with room for the prefix's watch and the publisher's calls.)
MAX_WATCHES = 100
assert MAX_WATCHES + 1 < MAX_CONNECTIONS


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
        self,
        client: ConsulClient,
        layout: KeyLayout,
        *,
        watch_worth: int = WATCH_WORTH,
        linger: float = LINGER,
    ) -> None:
        self._client = client
        self._layout = layout
        self._watch_worth = watch_worth
        self._linger = linger
        self._demand = 0  # holders of `demand()`
        self._demand_changed = trio.Event()  # set (and swapped) when `_demand` turns 0 or 1
        self._following = False  # `run` follows Consul (demand, or its linger)
        self._failing = False  # the last read of this following failed
        self._attempted = trio.Event()  # set (and swapped) when a read ends, good or failed
        self._picture = Picture(token=0, hosts={})
        # (service, host) -> the session that holds its key: what the publisher checks itself by
        self._holders: dict[tuple[str, str], SessionId | None] = {}
        self._changed = trio.Event()
        self._read_ok = False  # the last read (if any) succeeded
        self._fresh_at: float | None = None  # Trio time of the last good read
        self._read_at: float | None = None  # wall time of the last good read
        self._seen_live: dict[str, float] = {}  # host -> wall time of the last read it was live
        self._reported: dict[str, int] = {}  # key -> ModifyIndex of a foreign value logged once
        self._read_observers: list[Callable[[], None]] = []
        self._reading: trio.CancelScope | None = None  # the read in flight, if any
        # folder (a name of the prefix's `?keys&separator=/`) -> key -> its value as last decoded
        # and the session holding it: what the picture is built from, folder by folder
        self._folders: dict[str, dict[str, tuple[_Decoded, SessionId | None]]] = {}
        self._services: dict[str, dict[str, Mapping[str, Any]]] = {}  # host -> service -> SERVICE
        self._held: dict[str, int] = {}  # host -> how many of its keys a session holds (live)
        self._recorded: dict[str, tuple[Mapping[str, Mapping[str, Any]], float]] = {}
        self._failure: ConsulError | None = None  # why the folder watches stopped, if a call
        self._whole_size = 0  # bytes of the last whole read of the prefix
        # Counters (tests, the multihost bench): good reads applied (changes), the bytes of every
        # answer (what condo parsed: Consul's body after gzip), and the values decoded from JSON.
        self.reads = 0
        self.read_bytes = 0
        self.requests = 0  # every answer Consul gave this watcher (a wait that ran out too)
        self.decodes = 0

    def __repr__(self) -> str:
        return f"ConsulSource(prefix={self._layout.prefix!r}, token={self._picture.token})"

    # --- StateSource ------------------------------------------------------------------------

    def picture(self) -> Picture:
        return self._picture

    async def wait_beyond(self, token: int) -> None:
        if self._picture.token != token:
            return
        with self.demand():  # a waiter is demand: an idle source starts following for it
            await self._changed.wait()

    @property
    def read_at(self) -> float | None:
        return self._read_at

    @property
    def following(self) -> bool:
        """True while `run` follows Consul (somebody asks, or did within the linger)."""
        return self._following

    @contextmanager
    def demand(self) -> Iterator[None]:
        """Follow Consul while this is held (and `linger` seconds beyond the last holder)."""
        self._demand += 1
        if self._demand == 1:
            self._demand_moved()
        try:
            yield
        finally:
            self._demand -= 1
            if self._demand == 0:
                self._demand_moved()

    async def fresh(self, limit: float = FRESH_LIMIT) -> None:
        """Return once the picture is fresh: at once while following with a good last read (or a
        failed one: Consul is away, the picture says stale); else after the first read that ends
        after this call (at most `limit` seconds: then it stays stale)."""
        with self.demand():
            if self._following and (not self.stale or self._failing):
                return
            attempted = self._attempted
            with trio.move_on_after(limit):
                await attempted.wait()

    # --- extras -----------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """True until the first good read, while idle (nobody follows), and from any call Consul
        did not answer until the next good read."""
        if not self._following or not self._read_ok or self._fresh_at is None:
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
        """Follow the prefix while there is demand (and its linger), until cancelled; reports
        started at once (idle, or Consul away: the picture is then empty and stale)."""
        self._client.add_failure_observer(self._unanswered)
        task_status.started()
        while True:
            while not self._demand:
                await self._demand_changed.wait()
            self._following, self._read_ok, self._failing = True, False, False
            log.debug("consul.following", prefix=self._layout.prefix)
            async with trio.open_nursery() as following:
                following.start_soon(self._follow)
                await self._until_unwanted()
                following.cancel_scope.cancel()
            self._following, self._read_ok = False, False
            self._reading, self._failure = None, None
            log.debug("consul.idle", prefix=self._layout.prefix)
            self._wake()  # `stale` changed

    async def _until_unwanted(self) -> None:
        """Return once nobody has held `demand()` for `linger` seconds."""
        while True:
            changed = self._demand_changed
            if self._demand:
                await changed.wait()
                continue
            with trio.move_on_after(self._linger) as lingering:
                await changed.wait()
            if lingering.cancelled_caught:
                return

    def _demand_moved(self) -> None:
        changed, self._demand_changed = self._demand_changed, trio.Event()
        changed.set()

    def _attempt_ended(self, *, failed: bool) -> None:
        self._failing = failed
        attempted, self._attempted = self._attempted, trio.Event()
        attempted.set()

    async def _follow(self) -> None:
        """Read the prefix whole (index 0), then follow it with blocking queries, until
        cancelled (see the invariants: whole or by folder)."""
        index = 0
        delay = FIRST_RETRY_DELAY
        failing_since: float | None = None
        while True:
            started = trio.current_time()
            listing: Listing | None = None
            try:
                with trio.CancelScope() as reading:
                    self._reading = reading
                    if (
                        index > 0
                        and self._whole_size > self._watch_worth
                        and len(self._folders) <= MAX_WATCHES
                    ):
                        await self._watch_folders(index)  # returns on an index gone backwards
                    else:
                        listing = await self._read_whole(index)
                self._reading = None
                failure, self._failure = self._failure, None
                if failure is not None:
                    raise failure
                if reading.cancelled_caught or listing is None:
                    index = 0  # abandoned (see _unanswered) or reset: read afresh, at once
                    await trio.sleep_until(started + MIN_READ_INTERVAL)
                    continue
            except ConsulError as exc:
                self._reading = None
                self._attempt_ended(failed=True)
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
            # (An index gone backwards, a restarted agent, was read afresh by `_read_whole`.)
            index = max(listing.index, 1)
            await trio.sleep_until(started + MIN_READ_INTERVAL)

    async def _read_whole(self, index: int) -> Listing:
        """The whole prefix, at once (index 0) or once it changed beyond `index` (a blocking
        query: a small prefix is followed this way)."""
        listing = await self._client.read_prefix(self._layout.folder, index=index)
        self.requests += 1
        if listing.index < index:  # backwards: a restarted agent; read afresh at once
            listing = await self._client.read_prefix(self._layout.folder)
            self.requests += 1
        self._whole_size = listing.size
        return listing

    async def _watch_folders(self, index: int) -> None:
        """Follow a large prefix folder by folder, from `index` (that of a whole read just
        applied), until a watch sees an index go backwards (then it returns: read afresh) or a
        call fails (its ConsulError).

        One blocking `?recurse` per folder (`<prefix>/<service>/`, `.live/`, `.hosts/`; a key
        right under the prefix is watched alone), all in flight at once: Consul answers the one
        whose folder changed (its index is that of the folder: its newest write or delete), with
        that folder's keys, and the change is applied from that folder alone. One blocking
        `?keys&separator=/` on the prefix (a few bytes) says when folders appear or go. So a
        change costs a request or two and the bytes of its folder, not of the prefix."""
        reset = False
        watches: dict[str, trio.CancelScope] = {}

        async with trio.open_nursery() as nursery:

            def stop(exc: ConsulError | None) -> None:
                nonlocal reset
                if exc is None:
                    reset = True
                elif self._failure is None:
                    self._failure = exc  # raised by `run`, as a read's failure
                nursery.cancel_scope.cancel()

            async def watch(name: str, since: int, scope: trio.CancelScope) -> None:
                # `since` is the whole read's index until this folder's first answer: Consul's
                # index of a folder is its own newest write or delete, at most that.
                own = since == 0
                with scope:
                    while True:
                        started = trio.current_time()
                        try:
                            part = await self._client.read_prefix(name, index=since)
                        except ConsulError as exc:
                            stop(exc)
                            return
                        if scope.cancel_called:
                            # Its folder went (or the watching ended) while this answer was on
                            # its way: applying it would bring back a folder that is gone.
                            return
                        self.requests += 1
                        entries = part.entries
                        if not name.endswith("/"):  # a key alone: not its namesakes
                            entries = tuple(e for e in entries if e.key == name)
                        if part.index < since and own:
                            stop(None)  # backwards: a restarted agent (or tombstones reaped)
                            return
                        if since == 0 or part.index > since or not self._holds(name, entries):
                            self._apply_folders({name: entries}, part.size, part.index)
                        else:
                            # The wait ran out: nothing changed. Below the whole read's index
                            # (a folder quiet since before it) is the folder's own index, the
                            # one to block on from now on, not an agent gone backwards.
                            self._answered(part.size)
                        since, own = max(part.index, 1), True
                        await trio.sleep_until(started + MIN_READ_INTERVAL)

            def follow(name: str, since: int) -> None:
                watches[name] = scope = trio.CancelScope()
                nursery.start_soon(watch, name, since, scope)

            for name in self._folders:
                follow(name, index)
            since = index
            while True:
                started = trio.current_time()
                try:
                    root = await self._client.list_folders(self._layout.folder, index=since)
                except ConsulError as exc:
                    stop(exc)
                    break
                self.requests += 1
                self.read_bytes += root.size
                if root.index < since:
                    stop(None)
                    break
                names = set(root.names)
                if len(names) > MAX_WATCHES:
                    stop(None)  # too many connections: read whole from now on
                    break
                gone = [name for name in watches if name not in names]
                for name in gone:
                    watches.pop(name).cancel()
                if gone:  # its keys were deleted (its watch may not have told yet)
                    self._apply_folders(dict.fromkeys(gone, ()), 0, root.index)
                for name in sorted(names - watches.keys()):
                    follow(name, 0)  # a new folder: read at once, then followed
                since = max(root.index, 1)
                await trio.sleep_until(started + MIN_READ_INTERVAL)
        assert reset or self._failure is not None

    def _holds(self, name: str, entries: Sequence[Entry]) -> bool:
        """Whether folder `name`, as last applied, is `entries` (the same keys, versions, bytes
        and holders)."""
        known = self._folders.get(name, {})
        if len(known) != len(entries):
            return False
        for entry in entries:
            held = known.get(entry.key)
            if held is None or not held[0].same(entry) or held[1] != entry.session:
                return False
        return True

    def _folder_of(self, key: str) -> str:
        """The name the prefix's `?keys&separator=/` gives `key`: its folder, or itself."""
        rest = key[len(self._layout.folder) :]
        cut = rest.find("/")
        return key if cut < 0 else key[: len(self._layout.folder) + cut + 1]

    def _unanswered(self) -> None:
        """A call got no answer from Consul: the picture is stale (`stale` says so from now on);
        waiters hear of it, and the read in flight is abandoned for a new one."""
        self._abandon_reading()
        self._wake()

    def _abandon_reading(self) -> None:
        """Cancel the read in flight (whole, or the folder watches): `run` reads afresh at once."""
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()

    def _apply(self, listing: Listing) -> None:
        """A whole read: every folder as it brings them (folders it lacks are gone)."""
        folders: dict[str, list[Entry]] = {name: [] for name in self._folders}
        for entry in listing.entries:
            folders.setdefault(self._folder_of(entry.key), []).append(entry)
        self._apply_folders(folders, listing.size, listing.index)

    def _answered(self, size: int) -> None:
        """A good read that changed nothing (a blocking query's wait ran out)."""
        self.read_bytes += size
        self._fresh_at = trio.current_time()
        self._read_at = time.time()
        self._attempt_ended(failed=False)
        for observer in self._read_observers:
            observer()

    def _apply_folders(self, folders: Mapping[str, Sequence[Entry]], size: int, index: int) -> None:
        """Apply what a read says of some folders (each one whole: its keys as they are now);
        the others keep what they had. Costs the keys of those folders, not of the prefix."""
        self.reads += 1
        self.read_bytes += size
        holders = self._holders
        touched: set[str] = set()  # hosts whose services or liveness may have changed
        slots: dict[tuple[str, str], SessionId | None] = {}  # holder slots before this read
        for name, entries in folders.items():
            old = self._folders.pop(name, {})
            new: dict[str, tuple[_Decoded, SessionId | None]] = {}
            for entry in entries:
                known = old.pop(entry.key, None)
                if known is not None and known[0].same(entry) and known[1] == entry.session:
                    new[entry.key] = known
                    continue
                decoded = known[0] if known is not None and known[0].same(entry) else None
                if decoded is None:
                    decoded = self._decode(entry)
                if known is not None:
                    self._remove(*known, touched, slots)
                new[entry.key] = (decoded, entry.session)
                self._add(entry.key, decoded, entry.session, touched, slots)
            for key, known in old.items():  # gone from Consul: it leaves the cache with it
                self._remove(*known, touched, slots)
                self._reported.pop(key, None)  # so that the reports never grow without bound
            if new:
                self._folders[name] = new
        # Stale for any reason (this read's failures or the publisher's): a waiter that would
        # not decide from the picture then is woken now that it is fresh again.
        was_stale, self._read_ok = self.stale, True
        last_read, self._read_at = self._read_at, time.time()
        self._fresh_at = trio.current_time()
        picture = self._picture
        hosts = dict(picture.hosts)
        records = dict(picture.records)
        for host in touched:
            services = self._services.get(host)
            if services:
                hosts[host] = dict(services)
            else:
                hosts.pop(host, None)
            live = self._held.get(host, 0) > 0
            if live:
                self._seen_live[host] = -1.0  # live now: its time is that of the last read
            elif self._seen_live.get(host) == -1.0:
                # It was live until this read: the last read that saw it live is the one before.
                self._seen_live[host] = last_read if last_read is not None else self._read_at
            recorded = self._recorded.get(host)
            if recorded is None:
                records.pop(host, None)
                if not live:
                    self._seen_live.pop(host, None)
                continue
            seen = self._seen_live.get(host)
            records[host] = HostRecord(
                services=recorded[0],
                live=live,
                last_seen=None if live else (recorded[1] if seen is None else seen),
            )
        if (
            any(hosts.get(h) != picture.hosts.get(h) for h in touched)
            or any(records.get(h) != picture.records.get(h) for h in touched)
            or any(holders.get(slot) != before for slot, before in slots.items())
        ):
            token = index if index > picture.token else picture.token + 1
            self._picture = Picture(token=token, hosts=hosts, records=records)
            self._wake()
        elif was_stale:
            self._wake()  # the same picture, but no longer stale (or no longer unknown)
        # else: a wake-up with nothing new for waiters (another key, a mere index bump)
        self._attempt_ended(failed=False)
        for observer in self._read_observers:
            observer()

    def _remove(
        self,
        decoded: _Decoded,
        session: SessionId | None,
        touched: set[str],
        slots: dict[tuple[str, str], SessionId | None],
    ) -> None:
        """Take one key's part out of the picture being built."""
        if decoded.kind is _Kind.FOREIGN:
            return
        if decoded.kind is _Kind.RECORD:
            assert isinstance(decoded.what, Record)
            self._recorded.pop(decoded.what.host, None)
            touched.add(decoded.what.host)
            return
        if decoded.kind is _Kind.LIVE:
            assert isinstance(decoded.what, str)
            slot, host = (LIVE, decoded.what), decoded.what
        else:
            assert isinstance(decoded.what, Published)
            slot, host = (decoded.what.service, decoded.what.host), decoded.what.host
            services = self._services.get(host, {})
            services.pop(decoded.what.service, None)
            if not services:
                self._services.pop(host, None)
        slots.setdefault(slot, self._holders.get(slot))
        self._holders.pop(slot, None)
        if session is not None:
            self._held[host] -= 1
            if not self._held[host]:
                del self._held[host]
        touched.add(host)

    def _add(
        self,
        key: str,
        decoded: _Decoded,
        session: SessionId | None,
        touched: set[str],
        slots: dict[tuple[str, str], SessionId | None],
    ) -> None:
        """Put one key's part into the picture being built."""
        what = decoded.what
        if decoded.kind is _Kind.FOREIGN:
            self._report(key, decoded.modify_index, str(what))
            return
        if decoded.kind is _Kind.RECORD:
            assert isinstance(what, Record)
            self._recorded[what.host] = (what.services, what.at)
            touched.add(what.host)
            return
        if decoded.kind is _Kind.LIVE:
            assert isinstance(what, str)
            slot, host = (LIVE, what), what
        else:
            assert isinstance(what, Published)
            slot, host = (what.service, what.host), what.host
            self._services.setdefault(host, {})[what.service] = what.state
        slots.setdefault(slot, self._holders.get(slot))
        self._holders[slot] = session
        if session is not None:
            self._held[host] = self._held.get(host, 0) + 1
        touched.add(host)

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
        # A change the watcher applied while this read was on its way is newer than it, and the
        # watcher's reads block beyond that change: it reads afresh at once, or the picture
        # would stay behind until that folder changes again.
        self._abandon_reading()
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

"""The session keeper and publisher: this host's services, kept in Consul while condo runs.

`Publisher.run` is one task; it owns this process's one Consul session and every key of this
host (`<prefix>/<service>/<host>`, see condo.consul.layout). Each round it brings Consul in line
with the store:

    round:  no session?  → take over stale sessions of this host (first time only), create one,
                           forget what was published (republish everything)
            renew due?   → renew (404: the session is lost → a new one, everything again);
                           checked again before each write of a long round
            sync         → hold `.live/<host>`, delete the keys of services that left the store,
                           acquire-write every service whose entry changed since it was last
                           confirmed, then write the host's record if what it runs changed

Rounds run when the store changes (a synchronous listener only sets an Event: the store is never
blocked and changes coalesce into the latest value, never a backlog), when the renewal is due
(TTL/2), and when a read of the watcher (ConsulSource) disagrees with what this host believes it
published (keys deleted behind its back, a session invalidated while its renewal was in flight):
the publisher is level-triggered against Consul itself.

The watcher reads only while somebody asks for the fleet (condo.consul.source): idle, it reads
nothing, so the publisher checks its own keys itself. At each renewal (every TTL/2) that finds
the watcher not following with a good read, it reads this host's keys alone (`.live/<host>`, its
record, every key it published) in one transaction of `get`s per 64 keys (`PUT /v1/txn`,
ConsulClient.read_keys; a missing key costs one more), and checks them as it checks the
watcher's reads: one request per TTL/2 beside the renewal, growing with this host's keys, never
with the fleet. A key deleted by hand while the watcher idles is thus back within TTL/2 (5 s) and
a round; a session invalidated behind its back shows at that same renewal (404: a new session,
everything again). A check that fails (an ACL, a 5xx or garbage from `/v1/txn` alone) is skipped
until the next renewal: it never ends the round before its writes.
Between renewals one blocking query on `.live/<host>` alone (`_watch_live`; Consul answers it
only when that key changes, so the fleet's writes never wake it) runs the check at once when the
key goes: a prefix deleted by hand, or the session invalidated, is written back within
milliseconds, not at the next renewal (5 s in which a wait asked of another condo would count
without this host, its record gone).

Invariants:
- A service is published only after its first reconciliation (not while `Init`, unless it has
  a spec error to show): a restarting condo never shows a Stable service as `Init`.
- The host's record (`.hosts/<host>`, no session) lists what this host runs: a service joins it
  when it is published past `Init`, and leaves it only when this host says so (its view says
  `removed`, it left the store, or the settled store never had it). Until then the record read back
  from Consul at the first session is carried over, so a restart never drops a service from it.
- `_published` only holds services whose key Consul confirmed (`true`) under the current session;
  losing the session empties it, so a full republish follows every loss (and start-up).
- `_held` holds every service whose key this session may hold: added before a write is sent,
  removed only once its delete is confirmed (or the session is gone). Deletes go by `_held`, not
  `_published`, so a key the re-check (`_check`) stopped trusting is still deleted when its
  service leaves meanwhile.
- Failures are per key. A key Consul refuses (403 ACL, 413 too large, any 4xx), a value over
  MAX_VALUE_SIZE (checked before sending) or a key another session holds is skipped for that
  round: the other keys are written. It is logged once per distinct error (`consul.publish_failed`),
  counted by failure observers (condo_consul_publish_* metrics), and retried when that service
  changes, or after its delay (PERMANENT_RETRY_DELAY; a value too large waits for a change).
  The host's record is one more such key (failures named `.hosts`). Only an unreachable Consul
  (a transient error) ends the round.
- A round reads the store once: its keys and its record say the same moment.
- A write answered `false` is checked by a renewal: a lost session is replaced; a live one means
  another session (another condo with the same --host?) holds the key: logged once, retried.
- Consul unreachable: supervision never notices (nothing here is awaited by a driver); one log
  line per outage, retries back off to at most MAX_RETRY_DELAY, so the first round after Consul's
  return starts within ~1 s and catches up at once (and renews first: the session may be gone).
- The first session of a process destroys older sessions with the same name (this host and
  prefix): those are a killed predecessor's, whose keys would block this one's for up to 2 x TTL.
- Clean shutdown destroys the session (shielded, bounded): the keys vanish at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog
import trio

from condo.consul.client import Acquire, ConsulClient, SessionId
from condo.consul.layout import (
    LIVE,
    RECORDS,
    ForeignValue,
    KeyLayout,
    decode_record,
    encode_live,
    encode_record,
    encode_value,
    summary,
)
from condo.consul.source import ConsulSource
from condo.errors import ConsulError
from condo.fsm import Phase
from condo.store import ServiceEntry, Store, now

log = structlog.get_logger(__name__)

SESSION_TTL = 10.0  # Consul's minimum; the keys of a killed condo vanish within 2 x TTL
FIRST_RETRY_DELAY = 0.1
MAX_RETRY_DELAY = 1.0  # catch up within ~1 s of Consul's return
MIN_WATCH_INTERVAL = 0.02  # between two blocking reads of `.live/<host>`
PERMANENT_RETRY_DELAY = 10.0  # an ACL refusal waits for an operator; no need to hammer Consul
REFUSED_RETRY_DELAY = 2.0  # a key held by another session: try again (it may expire)
DESTROY_LIMIT = 2.0  # how long shutdown waits for Consul to destroy the session
# Consul's default kv_max_value_size (512 KiB): a bigger value is refused with 413. Checked before
# sending, so that one huge value (a long error message) costs no request.
MAX_VALUE_SIZE = 512 * 1024

# Told of every failed write or delete of a service's key (service, error), and of its end
# (service, None): the key was written or deleted after all, or the service is gone.
FailureObserver = Callable[[str, str | None], None]


@attrs.frozen(kw_only=True)
class _Failure:
    """Why a service's key is not as the store says, and when to try it again."""

    entry: ServiceEntry | None  # what failed to be written (None: the delete failed)
    error: str
    retry_at: float  # Trio time; math.inf: only a change of the service retries


class Publisher:
    """Keeps this host's session and keys in Consul; `run` is its one task."""

    def __init__(
        self,
        client: ConsulClient,
        store: Store,
        layout: KeyLayout,
        host: str,
        *,
        ttl: float = SESSION_TTL,
        max_value_size: int = MAX_VALUE_SIZE,
    ) -> None:
        self._client = client
        self._store = store
        self._layout = layout
        self._host = host
        self._ttl = ttl
        self._max_value_size = max_value_size
        self._session: SessionId | None = None
        self._session_count = 0
        self._published: dict[str, ServiceEntry] = {}
        self._held: set[str] = set()  # services whose key this session may hold
        self._failures: dict[str, _Failure] = {}
        self._failure_observers: list[FailureObserver] = []
        self._renew_at = math.inf
        self._retry_at = math.inf
        self._wake = trio.Event()
        self._refused: set[str] = set()  # services whose key another session holds (logged)
        self._down_since: float | None = None
        self._losses = 0  # sessions lost in a row, without a full round in between
        self._live = False  # `.live/<host>` is held by the current session
        # What the host's record says in Consul (None: not read yet this process).
        self._record: dict[str, dict[str, Any]] | None = None
        self._record_failed: dict[str, dict[str, Any]] | None = None  # the last refused value
        self._record_lost = False  # the record is gone from Consul: write it even if unchanged
        self._known: set[str] = set()  # every service the store had while this process ran
        self._source: ConsulSource | None = None  # the watcher whose reads check this host's keys
        self._check_refused = False  # a transaction refused (ACL): logged once
        self.own_checks = 0  # reads of this host's own keys while the watcher idled (tests)
        self._check_soon = False  # `.live/<host>` changed behind our back: check in this round
        self._watch_refused = False  # the watch of `.live/<host>` refused (ACL): logged once
        self._live_held = trio.Event()  # set (and swapped) each time `.live/<host>` is acquired

    def __repr__(self) -> str:
        return f"Publisher(host={self._host!r}, prefix={self._layout.prefix!r})"

    @property
    def session_name(self) -> str:
        """What the session is called in Consul: names the host (and the prefix it writes)."""
        return self._layout.session_name(self._host)

    @property
    def session(self) -> SessionId | None:
        """The current session (None before the first one, or right after one was lost)."""
        return self._session

    @property
    def published(self) -> frozenset[str]:
        """The services whose keys Consul confirmed under the current session."""
        return frozenset(self._published)

    @property
    def failures(self) -> dict[str, str]:
        """service -> why its key is not as the store says (refused, too large, held elsewhere)."""
        return {name: failure.error for name, failure in self._failures.items()}

    def add_failure_observer(self, observer: FailureObserver) -> Callable[[], None]:
        """Call `observer` (synchronously; it must not block) on every failed write or delete of a
        key, and once when that service's failure ends. Returns a function that removes it."""
        self._failure_observers.append(observer)
        return lambda: self._failure_observers.remove(observer)

    # --- the task ---------------------------------------------------------------------------

    async def run(
        self,
        source: ConsulSource | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish until cancelled, then destroy the session. Reports started at once: Consul
        may be away, condo supervises regardless."""
        self._store.subscribe(self._changed)
        self._source = source
        if source is not None:
            source.add_read_observer(lambda: self._check(source))
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if source is not None:
                    nursery.start_soon(self._watch_live)
                await self._run_rounds()
        finally:
            await self._destroy()

    def _changed(self) -> None:
        # Called synchronously by the store after every change: only wake the round loop.
        self._wake.set()

    async def _run_rounds(self) -> None:
        delay = FIRST_RETRY_DELAY
        while True:
            self._wake = trio.Event()  # changes from here on wake the next round
            self._retry_at = math.inf
            started = trio.current_time()
            try:
                await self._round()
            except ConsulError as exc:
                self._failed(exc, started)
                await trio.sleep(delay if exc.transient else PERMANENT_RETRY_DELAY)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            self._answered()
            delay = FIRST_RETRY_DELAY
            if self._session is None:
                # Lost mid-round: a new session at once; back off only if that keeps happening.
                if self._losses > 1:
                    await trio.sleep(min(FIRST_RETRY_DELAY * 2**self._losses, MAX_RETRY_DELAY))
                continue
            self._losses = 0
            with trio.move_on_at(min(self._renew_at, self._retry_at)):
                await self._wake.wait()

    async def _round(self) -> None:
        session = self._session
        if session is None:
            session = await self._open_session()
        else:
            due = trio.current_time() >= self._renew_at
            if not await self._renewed(session):
                return
            source = self._source
            idle = source is not None and (not source.following or source.stale)
            if self._check_soon or (due and idle):
                self._check_soon = False
                await self._check_own(session)
        await self._sync(session)

    async def _renewed(self, session: SessionId) -> bool:
        """Renew the session if it is due; False when it turned out to be lost. Also called
        between the writes of a round: a long round (many keys, a slow Consul) must not outlast
        the TTL, or the session expires under it and every key goes (as 200 simulated hosts on
        one busy agent showed)."""
        if trio.current_time() < self._renew_at:
            return True
        if not await self._client.renew_session(session):
            self._lost("the renewal answered 404")
            return False
        self._renew_at = trio.current_time() + self._ttl / 2
        return True

    async def _sync(self, session: SessionId) -> None:
        # One instant, and one reading of the store, for every value of the round: the keys and
        # the record say the same. (The store changes while the round awaits Consul: reading it
        # again for the record dropped a service reconciled meanwhile, whose key was not written
        # yet, so that for a moment the host counted for it nowhere.)
        at = now()
        store = dict(self._store.entries)
        settled = self._store.settled
        # A service dropped while this round awaits Consul is still one the store had (it left;
        # it is not one never learnt of).
        self._known |= store.keys()
        if not self._live and not await self._hold_live(session, at.wall):
            return
        entries = {
            name: entry
            for name, entry in store.items()
            if entry.state.phase is not Phase.Init or entry.spec_error is not None
        }
        services = self._store.view(at)["services"]
        pending = self._failures.keys() - entries.keys() - self._held - {RECORDS}
        for name in sorted(pending):
            self._resolved(name)  # gone from the store, and no key of ours left to delete
        for name in sorted(self._held - entries.keys()):
            if self._waiting(name, None):
                continue
            key = self._layout.key(name, self._host)
            try:
                await self._client.delete(key)
            except ConsulError as exc:
                if exc.transient:
                    raise  # Consul is away: the round ends (and is retried as a whole)
                self._refused_by_consul(name, None, key, str(exc), PERMANENT_RETRY_DELAY)
                continue
            self._held.discard(name)
            # pop: _check (another task) may have dropped it meanwhile.
            self._published.pop(name, None)
            self._resolved(name)
            log.debug("consul.unpublished", service=name)
        for name, entry in sorted(entries.items()):
            if self._published.get(name) == entry or self._waiting(name, entry):
                continue
            if not await self._renewed(session):
                return
            key = self._layout.key(name, self._host)
            value = encode_value(self._host, name, services[name], at.wall)
            if len(value) > self._max_value_size:
                error = (
                    f"value of {len(value)} bytes is over Consul's limit of"
                    f" {self._max_value_size} bytes (kv_max_value_size); not sent"
                )
                # The same entry gives the same value: only a change of the service retries.
                self._refused_by_consul(name, entry, key, error, math.inf)
                continue
            was_held = name in self._held
            self._held.add(name)  # before sending: an answer lost in transit may still mean held
            try:
                outcome = await self._client.acquire(key, value, session)
            except ConsulError as exc:
                if exc.transient:
                    raise
                if not was_held:
                    self._held.discard(name)  # a 4xx answer: nothing was written
                self._refused_by_consul(name, entry, key, str(exc), PERMANENT_RETRY_DELAY)
                continue
            if outcome is Acquire.DONE:
                self._published[name] = entry
                self._resolved(name)
                if name in self._refused:
                    self._refused.discard(name)
                    log.info("consul.key_acquired", key=key)
                continue
            if not was_held:
                self._held.discard(name)  # refused or no session: nothing was written
            if outcome is Acquire.REFUSED and await self._client.renew_session(session):
                # Our session is alive, so another one holds the key.
                if name not in self._refused:
                    self._refused.add(name)
                    log.warning(
                        "consul.key_held_elsewhere",
                        key=key,
                        hint="another condo with this --host and --consul-prefix? (or the lock"
                        " delay of a session that ended)",
                    )
                self._failed_key(name, entry, "held by another session", REFUSED_RETRY_DELAY)
                continue
            self._lost("a write answered that the session is invalid")
            return
        await self._write_record(store, settled, services, at.wall)

    async def _hold_live(self, session: SessionId, at: float) -> bool:
        """Hold `.live/<host>`; False when the session turned out to be lost."""
        key = self._layout.live_key(self._host)
        outcome = await self._client.acquire(key, encode_live(self._host, at), session)
        if outcome is Acquire.DONE:
            self._live = True
            held, self._live_held = self._live_held, trio.Event()
            held.set()
            self._refused.discard(LIVE)
            return True
        if outcome is Acquire.REFUSED and await self._client.renew_session(session):
            if LIVE not in self._refused:
                self._refused.add(LIVE)
                log.warning(
                    "consul.key_held_elsewhere", key=key, hint="another condo with this --host?"
                )
            self._retry_at = min(self._retry_at, trio.current_time() + REFUSED_RETRY_DELAY)
            return True  # the services are published all the same
        self._lost("a write answered that the session is invalid")
        return False

    async def _write_record(
        self,
        store: Mapping[str, ServiceEntry],
        settled: bool,
        services: Mapping[str, Mapping[str, Any]],
        at: float,
    ) -> None:
        """Bring the host's record in line with what this host runs (see the invariants), from
        the round's reading of the store (`store`, `settled`, `services`: one moment)."""
        key = self._layout.record_key(self._host)
        if self._record is None:
            stored = await self._client.read_key(key)
            try:
                found = decode_record(self._layout, key, stored.value) if stored else None
            except ForeignValue:
                found = None  # not ours to keep: written anew below
            self._record = {n: dict(s) for n, s in found.services.items()} if found else {}
        wanted: dict[str, dict[str, Any]] = {}
        for name, said in self._record.items():
            entry = store.get(name)
            # Not known yet (the store is not settled), or not reconciled yet: as it was. (A
            # service the store had and dropped is gone: its driver retired it.)
            unknown = name not in self._known and not settled
            if (entry is None and unknown) or (
                entry is not None and entry.state.phase is Phase.Init
            ):
                wanted[name] = said
        for name, view in services.items():
            if view.get("state") != Phase.Init.value and not view.get("removed"):
                wanted[name] = summary(view)
        if wanted == self._record and not self._record_lost:
            self._record_failed = None
            self._resolved(RECORDS)
            return
        if wanted == self._record_failed and self._waiting(RECORDS, None):
            return
        # The record is one more key: a refusal fails it alone (logged, counted, retried), as
        # it would a service's key. Only an unreachable Consul ends the round.
        value = encode_record(self._host, wanted, at)
        if len(value) > self._max_value_size:
            error = (
                f"record of {len(value)} bytes is over Consul's limit of"
                f" {self._max_value_size} bytes (kv_max_value_size); not sent"
            )
            self._record_failed = wanted
            self._refused_by_consul(RECORDS, None, key, error, math.inf)
            return
        try:
            await self._client.put(key, value)
        except ConsulError as exc:
            if exc.transient:
                raise
            self._record_failed = wanted
            self._refused_by_consul(RECORDS, None, key, str(exc), PERMANENT_RETRY_DELAY)
            return
        self._record = wanted
        self._record_failed = None
        self._record_lost = False
        self._resolved(RECORDS)

    def _waiting(self, name: str, entry: ServiceEntry | None) -> bool:
        """True while a failed key waits for its retry (unless its service changed since)."""
        failure = self._failures.get(name)
        if failure is None or failure.entry != entry:
            return False
        if trio.current_time() >= failure.retry_at:
            return False
        self._retry_at = min(self._retry_at, failure.retry_at)
        return True

    def _refused_by_consul(
        self, name: str, entry: ServiceEntry | None, key: str, error: str, delay: float
    ) -> None:
        previous = self._failures.get(name)
        self._failed_key(name, entry, error, delay)
        # Once per distinct error of a key, not once per retry.
        if previous is None or previous.error != error:
            log.warning(
                "consul.publish_failed",
                service=name,
                key=key,
                error=error,
                note="the other keys are published; this one is retried when it changes"
                if math.isinf(delay)
                else f"the other keys are published; this one is retried every {delay:g} s",
            )

    def _failed_key(self, name: str, entry: ServiceEntry | None, error: str, delay: float) -> None:
        retry_at = trio.current_time() + delay
        self._failures[name] = _Failure(entry=entry, error=error, retry_at=retry_at)
        self._retry_at = min(self._retry_at, retry_at)
        for observer in self._failure_observers:
            observer(name, error)

    def _resolved(self, name: str) -> None:
        failure = self._failures.pop(name, None)
        if failure is None:
            return
        log.info("consul.publish_resolved", service=name, error=failure.error)
        for observer in self._failure_observers:
            observer(name, None)

    async def _open_session(self) -> SessionId:
        if self._session_count == 0:
            await self._take_over()
        session = await self._client.create_session(self.session_name, self._ttl)
        self._session = session
        self._session_count += 1
        self._published.clear()  # a new session holds nothing yet: republish everything
        self._held.clear()
        self._live = False
        self._renew_at = trio.current_time() + self._ttl / 2
        log.info("consul.session_created", session=session, name=self.session_name, ttl=self._ttl)
        return session

    async def _take_over(self) -> None:
        """Destroy older sessions of this host: a killed predecessor's keys would otherwise
        refuse this process's writes until Consul expires them (up to 2 x TTL)."""
        try:
            sessions = await self._client.list_sessions()
        except ConsulError as exc:
            if exc.transient:
                raise
            # An ACL that may not list sessions: publish anyway (a predecessor's keys expire).
            log.warning("consul.takeover_skipped", error=str(exc))
            return
        for stale in sessions:
            if stale.name == self.session_name:
                await self._client.destroy_session(stale.id)
                log.warning("consul.session_taken_over", session=stale.id, name=stale.name)

    def _lost(self, reason: str) -> None:
        log.warning("consul.session_lost", session=self._session, reason=reason)
        self._session = None
        self._published.clear()
        self._held.clear()  # `Behavior: delete`: the session's keys went with it
        self._live = False
        self._losses += 1

    def _failed(self, exc: ConsulError, round_started: float) -> None:
        # The session may expire while Consul is away: renew first thing when it is back.
        self._renew_at = -math.inf
        if self._down_since is None:
            # From the start of the round that failed: a silent Consul takes a timeout to notice.
            self._down_since = round_started
            # Once per outage, not per retry.
            log.warning(
                "consul.unreachable" if exc.transient else "consul.refused",
                error=str(exc),
                note="supervision continues; publishing resumes when Consul answers",
            )

    def _answered(self) -> None:
        if self._down_since is not None:
            outage = round(trio.current_time() - self._down_since, 3)
            self._down_since = None
            log.info("consul.reachable", outage=outage, session=self._session)

    # --- checking against Consul's own picture --------------------------------------------

    def _check(self, source: ConsulSource) -> None:
        """After each read of the watcher: re-publish what Consul lost of ours (synchronous)."""
        session = self._session
        if session is None:
            return
        recorded = self._host in source.picture().records
        self._compare(session, source.holders(self._host), recorded=recorded)

    async def _watch_live(self) -> None:
        """Follow `.live/<host>` alone while it is held (see the module's docstring): a change
        that leaves it not ours (deleted, another session) wakes a round that checks every key
        of this host at once."""
        key = self._layout.live_key(self._host)
        index = 0
        while True:
            if not self._live:
                await self._live_held.wait()
                index = 0
                continue
            started = trio.current_time()
            try:
                entry, found = await self._client.watch_key(key, index=index)
            except ConsulError as exc:
                # The rounds say why Consul is away; a refusal (an ACL that does not let this
                # token read its own key) is said once and asked again rarely.
                if not exc.transient and not self._watch_refused:
                    self._watch_refused = True
                    log.warning("consul.live_watch_refused", key=key, error=str(exc))
                index = 0
                await trio.sleep(MAX_RETRY_DELAY if exc.transient else PERMANENT_RETRY_DELAY)
                continue
            # An index that goes backwards (a restarted agent) starts again from a plain read.
            index = found if found >= index else 0
            # (If the check has run meanwhile, one more costs a transaction, nothing else.)
            if entry is None or entry.session != self._session:
                self._check_soon = True
                self._wake.set()
            # Consul may answer at once, again and again (the key missing: any write answers).
            await trio.sleep_until(started + MIN_WATCH_INTERVAL)

    async def _check_own(self, session: SessionId) -> None:
        """This host's keys alone, read at once (the watcher idles: see the module's docstring),
        compared as the watcher's reads are."""
        keys = {self._layout.key(name, self._host): name for name in self._published}
        if self._live:
            keys[self._layout.live_key(self._host)] = LIVE
        record = self._layout.record_key(self._host)
        if self._record:
            keys[record] = RECORDS
        if not keys:
            return
        try:
            found = await self._client.read_keys(list(keys))
        except ConsulError as exc:
            # Never the round's end: a transaction that alone fails (refused by an ACL, a 5xx or
            # garbage from whatever answers `/v1/txn`) would otherwise end every round before
            # its writes, retried at once (renewal due again), forever. Checked again at the
            # next renewal; a Consul that is away fails this round's writes (or the next
            # renewal) by itself.
            if exc.transient:
                log.debug("consul.own_check_failed", error=str(exc))
            elif not self._check_refused:  # publishing goes on unchecked
                self._check_refused = True
                log.warning("consul.own_check_refused", error=str(exc))
            return
        self.own_checks += 1
        holders = {keys[key]: entry.session for key, entry in found.items() if key != record}
        if self._session is session:  # (not lost meanwhile: that round republishes anyway)
            self._compare(session, holders, recorded=record in found)

    def _compare(
        self, session: SessionId, holders: Mapping[str, SessionId | None], *, recorded: bool
    ) -> None:
        """Re-publish what Consul lost of ours, by what a read says: `holders` (service, or LIVE,
        -> the session holding its key; absent: the key is gone) and whether the record is
        there."""
        if self._live and holders.get(LIVE) != session:
            self._live = False  # deleted, or its session invalidated, behind our back
            self._wake.set()
        if self._record and not recorded:
            # Forgotten (or deleted) while this host is live: written again, whole. What it
            # carries over (services not reconciled yet) stays in it: they still run here.
            self._record_lost = True
            self._wake.set()
        missing = [name for name in self._published if holders.get(name) != session]
        if not missing:
            return
        # Usually a picture read just before a write landed (one harmless rewrite); otherwise
        # the keys were deleted or the session invalidated behind our back. `_held` keeps them:
        # the key may well be there, and must be deleted if its service leaves before the rewrite.
        log.debug("consul.keys_missing", services=missing, session=session)
        for name in missing:
            del self._published[name]
        self._wake.set()

    # --- shutdown ---------------------------------------------------------------------------

    async def _destroy(self) -> None:
        session = self._session
        if session is None:
            return
        # Cleanup I/O during cancellation: shielded, and bounded.
        with trio.move_on_after(DESTROY_LIMIT, shield=True) as scope:
            try:
                await self._client.destroy_session(session)
            except ConsulError as exc:
                log.warning(
                    "consul.session_not_destroyed", error=str(exc), keys_expire_in=2 * self._ttl
                )
                return
            self._session = None
            log.info("consul.session_destroyed", session=session)
        if scope.cancelled_caught:
            log.warning(
                "consul.session_not_destroyed",
                error="Consul did not answer in time",
                keys_expire_in=2 * self._ttl,
            )

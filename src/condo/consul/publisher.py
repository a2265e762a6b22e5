"""The session keeper and publisher: this host's services, kept in Consul while condo runs.

`Publisher.run` is one task; it owns this process's one Consul session and every key of this
host (`<prefix>/<service>/<host>`, see condo.consul.layout). Each round it brings Consul in line
with the store:

    round:  no session?  → take over stale sessions of this host (first time only), create one,
                           forget what was published (republish everything)
            renew due?   → renew (404: the session is lost → a new one, everything again)
            sync         → delete the keys of services that left the store, acquire-write every
                           service whose entry changed since it was last confirmed

Rounds run when the store changes (a synchronous listener only sets an Event: the store is never
blocked and changes coalesce into the latest value, never a backlog), when the renewal is due
(TTL/2), and when a read of the watcher (ConsulSource) disagrees with what this host believes it
published (keys deleted behind its back, a session invalidated while its renewal was in flight):
the publisher is level-triggered against Consul itself.

Invariants:
- `_published` only holds services whose key Consul confirmed (`true`) under the current session;
  losing the session empties it, so a full republish follows every loss (and start-up).
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

import structlog
import trio

from condo.consul.client import Acquire, ConsulClient, SessionId
from condo.consul.layout import KeyLayout, encode_value
from condo.consul.source import ConsulSource
from condo.errors import ConsulError
from condo.store import ServiceEntry, Store, now

log = structlog.get_logger(__name__)

SESSION_TTL = 10.0  # Consul's minimum; the keys of a killed condo vanish within 2 x TTL
FIRST_RETRY_DELAY = 0.1
MAX_RETRY_DELAY = 1.0  # catch up within ~1 s of Consul's return
PERMANENT_RETRY_DELAY = 10.0  # an ACL refusal waits for an operator; no need to hammer Consul
REFUSED_RETRY_DELAY = 2.0  # a key held by another session: try again (it may expire)
DESTROY_LIMIT = 2.0  # how long shutdown waits for Consul to destroy the session


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
    ) -> None:
        self._client = client
        self._store = store
        self._layout = layout
        self._host = host
        self._ttl = ttl
        self._session: SessionId | None = None
        self._session_count = 0
        self._published: dict[str, ServiceEntry] = {}
        self._renew_at = math.inf
        self._retry_at = math.inf
        self._wake = trio.Event()
        self._refused: set[str] = set()  # services whose key another session holds (logged)
        self._down_since: float | None = None
        self._losses = 0  # sessions lost in a row, without a full round in between

    def __repr__(self) -> str:
        return f"Publisher(host={self._host!r}, prefix={self._layout.prefix!r})"

    @property
    def session_name(self) -> str:
        """What the session is called in Consul: names the host (and the prefix it writes)."""
        return f"condo:{self._layout.prefix}:{self._host}"

    @property
    def session(self) -> SessionId | None:
        """The current session (None before the first one, or right after one was lost)."""
        return self._session

    @property
    def published(self) -> frozenset[str]:
        """The services whose keys Consul confirmed under the current session."""
        return frozenset(self._published)

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
        if source is not None:
            source.add_read_observer(lambda: self._check(source))
        task_status.started()
        try:
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
        elif trio.current_time() >= self._renew_at:
            if not await self._client.renew_session(session):
                self._lost("the renewal answered 404")
                return
            self._renew_at = trio.current_time() + self._ttl / 2
        await self._sync(session)

    async def _sync(self, session: SessionId) -> None:
        # One instant for every value of the round; entries and views from the same moment.
        at = now()
        entries = dict(self._store.entries)
        services = self._store.view(at)["services"]
        for name in sorted(self._published.keys() - entries.keys()):
            await self._client.delete(self._layout.key(name, self._host))
            # pop: _check (another task) may have dropped it meanwhile.
            self._published.pop(name, None)
            log.debug("consul.unpublished", service=name)
        for name, entry in sorted(entries.items()):
            if self._published.get(name) == entry:
                continue
            key = self._layout.key(name, self._host)
            value = encode_value(self._host, name, services[name], at.wall)
            outcome = await self._client.acquire(key, value, session)
            if outcome is Acquire.DONE:
                self._published[name] = entry
                if name in self._refused:
                    self._refused.discard(name)
                    log.info("consul.key_acquired", key=key)
                continue
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
                self._retry_at = trio.current_time() + REFUSED_RETRY_DELAY
                continue
            self._lost("a write answered that the session is invalid")
            return

    async def _open_session(self) -> SessionId:
        if self._session_count == 0:
            await self._take_over()
        session = await self._client.create_session(self.session_name, self._ttl)
        self._session = session
        self._session_count += 1
        self._published.clear()  # a new session holds nothing yet: republish everything
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
        holders = source.holders(self._host)
        missing = [name for name in self._published if holders.get(name) != session]
        if not missing:
            return
        # Usually a picture read just before a write landed (one harmless rewrite); otherwise
        # the keys were deleted or the session invalidated behind our back.
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

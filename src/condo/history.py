"""The deploy history of every service: kept, persisted beside the state file, observed.

`History` owns the entries (condo.deploys) of every service this condo ran, and their file,
`<state file>.history.json`: `{"version": 1, "host": H, "services": {NAME: [DEPLOY...]}}`.
It hears every new `ServiceState` from the Store (`on_transition`, synchronous, never blocks),
tells every step's changes of the entries to its listeners (`listen`: condo.notify's notices are
told from them, so the history and the notices never disagree) and lets readers (`/v1/history`,
the feed) wait for its version to move, latest-value, like the Store.

Why a file of its own, not a part of the state file: the state file is written ahead of every
Docker call (the hot path), and up to 50 entries per service would multiply those bytes; the
history is a record for people, not something recovery acts on, so it must not share the state
file's fate either (a damaged history is moved aside alone, the state file stays).

Invariants:
- Written as the state file is (condo.persist: temp file, fsync, rename, fsync of the folder;
  coalesced, never blocking): a `kill -9` loses at most the last moments, and the first state a
  restarted condo sees brings the history up to date (the rules are level-triggered).
- Bounded: `deploys.MAX_ENTRIES` per service, and at most `MAX_GONE` services whose last deploy
  ended `removed` (the oldest removals are forgotten first).
- A file of another host or version is moved aside (`.foreign-<time>`), an unreadable one
  (`.corrupt-<time>`), as the state file is; an unreadable service's entries are dropped alone.
- The digest of a deploy that turned stable is the one its container's record carries (the
  driver asks the engine at start, for a revert's pin); else it is asked of the engine once
  (`run`), off the supervision path: one pending lookup per service at most (a newer one
  replaces it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from condo import deploys, persist
from condo.deploys import DeployEntry, Entries, Step
from condo.errors import DockerError
from condo.fsm import ServiceState
from condo.record import nested_json

log = structlog.get_logger(__name__)

HISTORY_VERSION = 1
MAX_GONE = 100
LOOKUP_LIMIT = 30.0


def history_path(state_path: Path) -> Path:
    """`<state file>.history.json`, beside the state file."""
    return state_path.with_name(state_path.name + ".history.json")


class _Inspected(Protocol):
    @property
    def image_id(self) -> str: ...


class ImageDigests(Protocol):
    """The part of condo.docker.DockerClient the digest lookup uses."""

    async def inspect(self, cid_or_name: str) -> _Inspected: ...
    async def image_digests(self, image: str) -> tuple[str, ...]: ...


class History:
    """Every service's deploys, newest first; one writer (the Store's transitions), many readers.

    Usage::

        history = History(path, host)
        history.load()                              # before the first transition
        store.on_transition(history.on_transition)
        history.listen(notifier.on_step)           # optional: told every step's changes
        await nursery.start(history.run, engine)    # writes the file, asks for digests
        ...
        await history.close(limit)                  # at shutdown: the last write
    """

    def __init__(self, path: Path | None = None, host: str = "") -> None:
        self._path = path
        self._host = host
        self._entries: dict[str, Entries] = {}
        self._changed_at: dict[str, int] = {}  # service -> the version of its last change
        self._version = 0
        self._changed = trio.Event()
        self._lookups: dict[str, str] = {}  # service -> container whose digest is wanted
        self._lookup_wanted = trio.Event()
        self._listeners: list[Callable[[Step], None]] = []
        # Each service's entries as encoded for the file, while they are the same tuple: a
        # write encodes only the services that changed since the last one (the file is written
        # after every change; the whole history through json's pure-Python indenting encoder
        # cost ~30 ms with 200 services, in the Trio thread).
        self._fragments: dict[str, tuple[Entries, str]] = {}
        self.encoded = 0  # services encoded for the file so far (tests count them)
        self._writer = None if path is None else persist.StateWriter(path, self.file_bytes)

    @property
    def version(self) -> int:
        return self._version

    @property
    def entries(self) -> Mapping[str, Entries]:
        return self._entries

    @property
    def writer(self) -> persist.StateWriter | None:
        return self._writer

    def load(self) -> None:
        """Read the file (blocking, once, before anything happens); a missing one is empty."""
        if self._path is None:
            return
        data = persist.read_state_file(self._path)
        if not isinstance(data, dict):
            return
        version, host = data.get("version"), data.get("host")
        services = data.get("services")
        if version != HISTORY_VERSION or host != self._host or not isinstance(services, dict):
            reason = f"version {version!r}, host {host!r}: not this condo's history"
            persist.move_aside(self._path, reason, kind="foreign")
            return
        for name, entries in services.items():
            try:
                if not isinstance(entries, list):
                    raise deploys.EntryError("not a list")
                self._entries[str(name)] = tuple(DeployEntry.from_json(e) for e in entries)
            except deploys.EntryError as exc:
                log.warning("history.service_dropped", service=name, error=str(exc))
        self._changed_at = dict.fromkeys(self._entries, 0)

    def listen(self, listener: Callable[[Step], None]) -> None:
        """Call `listener` (synchronously, it must not block) after every step of a service
        that changed its entries."""
        self._listeners.append(listener)

    def on_transition(self, service: str, old: ServiceState | None, new: ServiceState) -> None:
        """A service's state changed (synchronous, O(entries)): update its deploys."""
        before = self._entries.get(service, ())
        at = time.time()
        after, changes = deploys.advance(before, old, new, at)
        for change in changes:
            # A digest the driver learned already came with the state: no second lookup.
            if (
                change.stabilized
                and change.after.container is not None
                and change.after.digest is None
            ):
                self._lookups[service] = change.after.container
                self._lookup_wanted.set()
        if after != before:
            self._entries[service] = after
            if after and after[0].outcome == "removed":
                self._forget_gone()
            self._bump((service,))
        if changes:
            step = Step(service, old, new, after, changes, at)
            for listener in self._listeners:
                listener(step)

    def view(self, name: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """`/v1/history`'s `services`: every service, or the one named (empty when unknown)."""
        if name is None:
            return deploys.document(self._entries)
        return deploys.document({name: self._entries.get(name, ())})

    def changed_since(self, version: int) -> tuple[int, dict[str, list[dict[str, Any]]]]:
        """The current version and the full list of every service changed after `version`."""
        names = [n for n, v in self._changed_at.items() if v > version]
        return self._version, deploys.document({n: self._entries.get(n, ()) for n in names})

    async def wait_changed(self, seen_version: int) -> int:
        """Wait until the version is past `seen_version`; return the new version."""
        while self._version <= seen_version:
            await self._changed.wait()
        return self._version

    def document(self) -> dict[str, Any]:
        """The history file's whole content."""
        return {
            "version": HISTORY_VERSION,
            "host": self._host,
            "services": deploys.document(self._entries),
        }

    def file_bytes(self) -> bytes:
        """The history file's bytes: exactly `persist.encode_state(self.document())`, each
        service's entries encoded again only when they changed."""
        fragments: dict[str, tuple[Entries, str]] = {}
        for name in sorted(self._entries):
            entries = self._entries[name]
            cached = self._fragments.get(name)
            if cached is None or cached[0] is not entries:
                cached = (entries, nested_json([e.to_json() for e in entries], 2))
                self.encoded += 1
            fragments[name] = cached
        self._fragments = fragments
        services = (
            "{\n    "
            + ",\n    ".join(f"{nested_json(n, 0)}: {text}" for n, (_, text) in fragments.items())
            + "\n  }"
            if fragments
            else "{}"
        )
        head = f'{{\n  "version": {HISTORY_VERSION},\n  "host": {nested_json(self._host, 0)},\n'
        return f'{head}  "services": {services}\n}}\n'.encode()

    async def run(
        self, engine: ImageDigests, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the file (coalesced) and ask the engine for digests, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self._writer is not None:
                await nursery.start(self._writer.run)
            task_status.started()
            while True:
                if not self._lookups:
                    self._lookup_wanted = trio.Event()
                    await self._lookup_wanted.wait()
                    continue
                service, container = self._lookups.popitem()
                digest = await self._lookup(engine, service, container)
                entries = self._entries.get(service)
                if digest is not None and entries is not None:
                    self._entries[service] = deploys.with_digest(entries, container, digest)
                    self._bump((service,))

    async def close(self, limit: float) -> None:
        """The last write, at shutdown (see `persist.StateWriter.close`)."""
        if self._writer is not None:
            await self._writer.close(limit)

    async def _lookup(self, engine: ImageDigests, service: str, container: str) -> str | None:
        entry = next((e for e in self._entries.get(service, ()) if e.container == container), None)
        if entry is None:
            return None
        try:
            with trio.fail_after(LOOKUP_LIMIT):
                info = await engine.inspect(container)
                digests = await engine.image_digests(info.image_id)
        except (DockerError, trio.TooSlowError) as exc:
            # The entry keeps a null digest; the deploy itself is not affected.
            log.warning("history.digest_failed", service=service, error=str(exc) or "timed out")
            return None
        return deploys.pick_digest(entry.image, digests)

    def _bump(self, services: tuple[str, ...]) -> None:
        self._version += 1
        for name in services:
            self._changed_at[name] = self._version
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if self._writer is not None:
            self._writer.mark_dirty()

    def _forget_gone(self) -> None:
        gone = [
            (entries[0].ended_at or 0.0, name)
            for name, entries in self._entries.items()
            if entries and entries[0].outcome == "removed"
        ]
        for _, name in sorted(gone)[: max(len(gone) - MAX_GONE, 0)]:
            del self._entries[name]
            self._changed_at.pop(name, None)


def open_history(state_path: Path, host: str) -> History:
    """The history beside `state_path`, read (blocking: call it before the root nursery)."""
    history = History(history_path(state_path), host)
    history.load()
    return history

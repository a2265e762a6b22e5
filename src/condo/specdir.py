"""Watching the spec directories (the PREFIXes): full, level-triggered snapshots of every spec.

This module owns the translation "what is on disk" → `SpecSnapshot`, and the task that keeps
publishing it. `SpecScanner.scan` is synchronous file I/O (run it in `trio.to_thread`);
`run_spec_watcher` is the long-lived task.

Invariants (each one is a bug of the original condo we must not repeat):

- A snapshot always covers *every* PREFIX at once: consumers diff whole snapshots, so one
  directory never removes another one's services (original bug: several PREFIXes thrashed).
- A file that cannot be read or parsed is an entry with `error`, never a removal: a partial
  write, binary junk, a folder named `x.edn`, a symlink loop or an unreadable file must not stop
  what runs. Only a file that is really gone from an existing directory is a removal.
- A PREFIX that cannot be listed (missing, unmounted, unreadable) keeps the entries of its last
  good scan and adds a problem: an unmounted volume must not stop everything. An existing empty
  directory is a real "everything removed".
- First PREFIX wins a name clash; the loser is reported in `problems`, never silently merged.
- Parsing is cached on the file's stat key and its bytes: an unchanged file gives the very same
  entry, so an unchanged directory gives an equal snapshot and nothing is re-published.
- inotify (Linux, read in Trio's own event loop) is only a wake-up hint; the periodic rescan is the
  source of truth, and it is cheap: an unchanged file is only stat'ed, never read nor parsed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import attrs
import structlog
import trio

from condo.errors import SpecError
from condo.spec import (
    MAX_SPEC_BYTES,
    SelfSpec,
    ServiceSpec,
    check_service_name,
    parse_self_spec,
    parse_spec,
    shared_listener_errors,
)

log = structlog.get_logger(__name__)

SPEC_SUFFIX = ".edn"
SELF_SERVICE = "self"

# A file whose mtime/ctime was this close to "now" when we read it may be rewritten later with
# the same stat key (coarse file-system clocks, same size): such a cache entry is not trusted and
# the file is re-read on the next scan (git's "racy" rule). 2 s also covers 2 s-granular file
# systems.
_RACY_WINDOW_NS = 2_000_000_000

# inotify wake-ups: a burst of events (an editor's temp file, write, rename) is grouped until
# `_HINT_QUIET` passes without one, for at most `_HINT_DEBOUNCE`; a rename wakes a scan
# ~`_HINT_QUIET` after it lands.
_HINT_QUIET = 0.005
_HINT_DEBOUNCE = 0.1


def _error_key(error: SpecError | None) -> tuple[str, str, int | None, str] | None:
    """Value identity of a SpecError (exceptions compare by identity, snapshots by value)."""
    if error is None:
        return None
    return (type(error).__name__, error.file, error.line, error.message)


def _errors_key(errors: tuple[SpecError, ...]) -> tuple[object, ...]:
    return tuple(_error_key(e) for e in errors)


def _self_key(value: SelfSpec | SpecError | None) -> object:
    return _error_key(value) if isinstance(value, SpecError) else value


@attrs.frozen(kw_only=True)
class SpecEntry:
    """One `*.edn` file that names a service: its parsed spec, or why it is unusable.

    Exactly one of `spec` / `error` is set. Equality is by value (errors by file, line and
    message), so a re-scan of an unchanged file gives an equal entry.
    """

    service: str
    path: Path
    spec: ServiceSpec | None
    error: SpecError | None = attrs.field(eq=_error_key)

    def __attrs_post_init__(self) -> None:
        if (self.spec is None) == (self.error is None):
            raise ValueError("SpecEntry needs exactly one of spec / error")


@attrs.frozen(kw_only=True)
class SpecSnapshot:
    """A full picture of every PREFIX at one scan.

    Attributes:
        entries: every service by name, valid and invalid ones (read-only mapping, sorted).
        self_spec: condo's own container spec from `self.edn`, its error, or None when absent.
        problems: what is wrong beyond single services: name clashes between PREFIXes and
            PREFIXes that cannot be listed (their last good entries are kept in `entries`).
        complete: every PREFIX was listed at least once (now or at an earlier scan). When
            False, a service missing from `entries` may live in a PREFIX never seen yet (an
            unmounted volume at start-up): its absence says nothing.
    """

    entries: Mapping[str, SpecEntry]
    self_spec: SelfSpec | SpecError | None = attrs.field(eq=_self_key)
    problems: tuple[SpecError, ...] = attrs.field(eq=_errors_key)
    complete: bool = True


def spec_service_name(filename: str) -> str | None:
    """The service a directory entry names, or None when the entry is not a spec file.

    Only `NAME.edn` counts. Dot-files (`.web.edn.swp`, `.#web.edn`, `.edn`) and anything not
    ending in `.edn` (`web.edn~`, `#web.edn#`, `4913`, `web.ctmpl`) are ignored: editors and
    templating tools leave those next to real specs.
    """
    if filename.startswith(".") or not filename.endswith(SPEC_SUFFIX):
        return None
    return filename[: -len(SPEC_SUFFIX)]


@attrs.frozen
class _StatKey:
    """What must stay equal for a cached parse to be reused without re-reading the file."""

    dev: int
    ino: int
    mtime_ns: int
    size: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _StatKey:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


_Parsed = ServiceSpec | SelfSpec | SpecError


@attrs.frozen
class _Cached:
    key: _StatKey
    data: bytes
    result: _Parsed
    trusted: bool  # False: the file was fresh when read, re-read it next time (see _RACY_WINDOW_NS)


@attrs.frozen
class _PrefixScan:
    """What one PREFIX held at its last good listing."""

    services: Mapping[str, SpecEntry]
    self_spec: tuple[Path, SelfSpec | SpecError] | None


class _Gone(Exception):
    """The file vanished between listing and reading: a removal, seen consistently next scan."""


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


class SpecScanner:
    """Synchronous scanner of the PREFIXes; keeps the parse cache and the last good listings.

    Not thread-safe: call `scan` from one thread at a time (the watcher runs it in
    `trio.to_thread.run_sync`, one scan after the other).
    """

    def __init__(self, prefixes: Sequence[Path]) -> None:
        # The same directory given twice would clash with itself on every name: keep the first.
        unique: dict[Path, None] = {}
        for prefix in prefixes:
            unique.setdefault(Path(os.path.abspath(prefix)), None)
        self._prefixes = tuple(unique)
        self._cache: dict[Path, _Cached] = {}
        self._entries: dict[Path, SpecEntry] = {}  # the last entry of each file, to reuse
        self._last_good: dict[Path, _PrefixScan] = {}
        self._listed: dict[Path, tuple[int, int]] = {}

    @property
    def prefixes(self) -> tuple[Path, ...]:
        """The watched directories, absolute, in priority order (duplicates dropped)."""
        return self._prefixes

    @property
    def listed_prefixes(self) -> Mapping[Path, tuple[int, int]]:
        """(st_dev, st_ino) of each PREFIX the last scan could list: what inotify can watch."""
        return MappingProxyType(self._listed)

    def scan(self) -> SpecSnapshot:
        """Read every PREFIX and return the full snapshot (blocking file I/O)."""
        problems: list[SpecError] = []
        seen_paths: set[Path] = set()
        listed: dict[Path, tuple[int, int]] = {}
        per_prefix: list[tuple[Path, _PrefixScan]] = []
        for prefix in self._prefixes:
            try:
                scanned, identity = self._scan_prefix(prefix, seen_paths)
            except OSError as exc:
                # Unlistable PREFIX: keep what it held at its last good scan (an unmounted volume
                # must not stop its services) and say so.
                problems.append(
                    SpecError(
                        str(prefix),
                        f"cannot list the spec directory ({_strerror(exc)}); "
                        "its services are kept as last seen",
                    )
                )
                scanned = self._last_good.get(prefix, _PrefixScan(MappingProxyType({}), None))
            else:
                self._last_good[prefix] = scanned
                listed[prefix] = identity
            per_prefix.append((prefix, scanned))
        # Forget parses of files that are gone (kept entries of unlistable PREFIXes live on in
        # `_last_good`; they are re-read when their directory comes back).
        for path in self._cache.keys() - seen_paths:
            del self._cache[path]
        for path in self._entries.keys() - seen_paths:
            del self._entries[path]
        self._listed = listed

        entries: dict[str, SpecEntry] = {}
        self_spec: tuple[Path, SelfSpec | SpecError] | None = None
        for _prefix, scanned in per_prefix:
            for name, entry in scanned.services.items():
                winner = entries.get(name)
                if winner is None:
                    entries[name] = entry
                else:
                    problems.append(_clash(name, entry.path, winner.path))
            if scanned.self_spec is not None:
                if self_spec is None:
                    self_spec = scanned.self_spec
                else:
                    problems.append(_clash(SELF_SERVICE, scanned.self_spec[0], self_spec[0]))
        entries = _without_shared_listeners(entries)
        return SpecSnapshot(
            entries=MappingProxyType(dict(sorted(entries.items()))),
            self_spec=None if self_spec is None else self_spec[1],
            problems=tuple(problems),
            complete=all(prefix in self._last_good for prefix in self._prefixes),
        )

    def _scan_prefix(
        self, prefix: Path, seen_paths: set[Path]
    ) -> tuple[_PrefixScan, tuple[int, int]]:
        """List one PREFIX and load its spec files; OSError means "cannot list it"."""
        with os.scandir(prefix) as listing:
            names = sorted(entry.name for entry in listing)
        st = os.stat(prefix)
        services: dict[str, SpecEntry] = {}
        self_spec: tuple[Path, SelfSpec | SpecError] | None = None
        for filename in names:
            name = spec_service_name(filename)
            if name is None:
                continue
            path = prefix / filename
            if name == SELF_SERVICE:
                try:
                    self_result = self._load(path, parse_self_spec)
                except _Gone:
                    continue
                seen_paths.add(path)
                assert not isinstance(self_result, ServiceSpec)
                self_spec = (path, self_result)
                continue
            problem = check_service_name(name)
            if problem is not None:
                services[name] = SpecEntry(
                    service=name, path=path, spec=None, error=SpecError(str(path), problem)
                )
                continue
            try:
                result = self._load(path, parse_spec)
            except _Gone:
                continue
            seen_paths.add(path)
            services[name] = self._entry(name, path, result)
        return _PrefixScan(MappingProxyType(services), self_spec), (st.st_dev, st.st_ino)

    def _entry(self, name: str, path: Path, result: _Parsed) -> SpecEntry:
        """The entry of a loaded file: the very same object as last scan when its parse is.

        Snapshots are compared on every scan; an identical entry compares by identity (dicts do),
        where an equal one would compare its spec by value (the create body as canonical JSON).
        """
        last = self._entries.get(path)
        # Identity, not equality: comparing specs by value is the cost this avoids.
        if (
            last is not None
            and last.service == name
            and (result is last.spec or result is last.error)
        ):
            return last
        if isinstance(result, SpecError):
            entry = SpecEntry(service=name, path=path, spec=None, error=result)
        else:
            assert isinstance(result, ServiceSpec)
            entry = SpecEntry(service=name, path=path, spec=result, error=None)
        self._entries[path] = entry
        return entry

    def _load(self, path: Path, parse: Callable[[bytes, str], _Parsed]) -> _Parsed:
        """Parse one file, through the cache. Raises `_Gone` when it vanished meanwhile."""
        file = str(path)
        try:
            st = os.stat(path)  # follows symlinks: a symlinked spec is the file it points to
        except FileNotFoundError:
            if not os.path.lexists(path):
                raise _Gone from None
            return SpecError(file, "is a symbolic link to nothing")
        except OSError as exc:
            # ELOOP (symlink loop), EACCES on the path, EIO...: an error state, not a removal.
            return SpecError(file, f"cannot read the spec file ({_strerror(exc)})")
        if not stat.S_ISREG(st.st_mode):
            return SpecError(file, _not_regular(st.st_mode))
        cached = self._cache.get(path)
        if cached is not None and cached.trusted and cached.key == _StatKey.of(st):
            return cached.result
        try:
            key, data = _read_spec_bytes(path)
        except FileNotFoundError:
            if not os.path.lexists(path):
                raise _Gone from None
            return SpecError(file, "cannot read the spec file (No such file or directory)")
        except _NotRegular as exc:
            return SpecError(file, _not_regular(exc.mode))
        except OSError as exc:
            return SpecError(file, f"cannot read the spec file ({_strerror(exc)})")
        read_at_ns = time.time_ns()
        if len(data) > MAX_SPEC_BYTES:
            result: _Parsed = SpecError(file, f"is larger than {MAX_SPEC_BYTES} bytes")
        elif cached is not None and cached.data == data:
            result = cached.result  # same bytes (e.g. touched, or racy re-read): same entry
        else:
            try:
                result = parse(data, file)
            except SpecError as exc:
                result = exc
        trusted = read_at_ns - max(key.mtime_ns, key.ctime_ns) > _RACY_WINDOW_NS
        self._cache[path] = _Cached(key, data, result, trusted)
        return result


class _NotRegular(Exception):
    def __init__(self, mode: int) -> None:
        super().__init__(mode)
        self.mode = mode


def _read_spec_bytes(path: Path) -> tuple[_StatKey, bytes]:
    """Read at most MAX_SPEC_BYTES + 1 bytes; the key is taken before reading, so the bytes are
    never older than the key (a write in between only costs one extra re-read next scan)."""
    # O_NONBLOCK: a FIFO swapped in after our stat must not block the scan waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(st.st_mode)
        chunks: list[bytes] = []
        remaining = MAX_SPEC_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return _StatKey.of(st), b"".join(chunks)
    finally:
        os.close(fd)


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory, not a spec file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe, not a spec file"
    return "is not a regular file"


def _without_shared_listeners(entries: dict[str, SpecEntry]) -> dict[str, SpecEntry]:
    """Two services whose `:proxy` claim one listen address are both errors (file:line, naming
    the other): neither file changes what runs until one of them gives it up."""
    errors = shared_listener_errors(
        {name: (str(e.path), e.spec) for name, e in entries.items() if e.spec is not None}
    )
    return {
        name: attrs.evolve(entry, spec=None, error=errors[name]) if name in errors else entry
        for name, entry in entries.items()
    }


def _clash(name: str, loser: Path, winner: Path) -> SpecError:
    return SpecError(
        str(loser), f"service {name!r} is already defined by {winner}; this file is ignored"
    )


# --- the watcher task ---------------------------------------------------------------------------


async def run_spec_watcher(
    prefixes: Sequence[Path],
    publish: Callable[[SpecSnapshot], None],
    *,
    rescan_interval: float = 10.0,
    task_status: trio.TaskStatus[SpecSnapshot] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Keep publishing the snapshot of `prefixes` whenever it changes.

    Scans once, publishes, then reports `started(first_snapshot)`. Afterwards it rescans on an
    inotify hint or every `rescan_interval` seconds, whichever comes first, and calls `publish`
    (sync, must not block) only with a snapshot that differs from the last one published. New
    spec errors and problems are logged once each, when they first appear.
    """
    scanner = SpecScanner(prefixes)
    snapshot = await trio.to_thread.run_sync(scanner.scan)
    _log_news(None, snapshot)
    publish(snapshot)
    # Capacity 1: a pending wake-up covers every change that happens before the next scan.
    hint_send, hint_receive = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        watched = dict(scanner.listed_prefixes)
        hints: trio.CancelScope = await nursery.start(_run_change_hints, tuple(watched), hint_send)
        task_status.started(snapshot)
        while True:
            with trio.move_on_after(rescan_interval):
                await hint_receive.receive()
            latest = await trio.to_thread.run_sync(scanner.scan)
            if scanner.listed_prefixes != watched:
                # A PREFIX appeared, vanished or was replaced (new inode): inotify watches inodes,
                # so re-arm it on what can be listed now.
                watched = dict(scanner.listed_prefixes)
                hints.cancel()
                hints = await nursery.start(_run_change_hints, tuple(watched), hint_send)
                # A change between that scan and the new watches has no event: scan once more.
                with contextlib.suppress(trio.WouldBlock):
                    hint_send.send_nowait(None)
            if latest != snapshot:
                _log_news(snapshot, latest)
                publish(latest)
                snapshot = latest


async def _run_change_hints(
    paths: tuple[Path, ...],
    hints: trio.MemorySendChannel[None],
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a wake-up on `hints` whenever inotify sees a spec-looking change under `paths`.

    The inotify descriptor sits in Trio's own epoll set: an idle watcher holds no thread and
    never wakes (watchfiles' thread woke every step to poll its stop event: most of the idle
    CPU). A burst of events is grouped until `_HINT_QUIET` passes without one (at most
    `_HINT_DEBOUNCE`), so an in-place write is scanned once it is complete, not half-written.

    Returns quietly when there is nothing to watch or watching fails (logged): the periodic
    rescan still covers everything. Reports the cancel scope that stops it.
    """
    with trio.CancelScope() as scope:
        task_status.started(scope)
        if not paths:
            return
        try:
            watch = _Inotify.open(paths)
        except OSError as exc:
            # ENOSPC (the watch limit), EMFILE, a path gone meanwhile: inotify is only a hint,
            # carry on by timer alone.
            log.warning(
                "specdir.inotify_unavailable", paths=sorted(map(str, paths)), error=str(exc)
            )
            return
        with watch:
            while True:
                await trio.lowlevel.wait_readable(watch.fd)
                if not watch.read_wanted():
                    continue
                deadline = trio.current_time() + _HINT_DEBOUNCE
                while (left := deadline - trio.current_time()) > 0:
                    with trio.move_on_after(min(_HINT_QUIET, left)) as quiet:
                        await trio.lowlevel.wait_readable(watch.fd)
                    if quiet.cancelled_caught:
                        break
                    watch.read_wanted()
                with contextlib.suppress(trio.WouldBlock):
                    # Full means a wake-up is already pending; it covers this change too.
                    hints.send_nowait(None)


# inotify(7), through libc: the constants of <sys/inotify.h> (the same on every Linux ABI).
_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_WATCH_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)  # fmt: skip
# About the directory itself, or "events were lost": always worth a rescan.
_ALWAYS_WANTED = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_Q_OVERFLOW | _IN_IGNORED
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_SIZE = 64 * 1024


class _Inotify:
    """One inotify descriptor watching some directories (not recursively); non-blocking."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, paths: Sequence[Path]) -> _Inotify:
        """Watch `paths`; OSError when inotify is unavailable or no path can be watched. A
        path that cannot be watched while others can is logged and left to the rescan."""
        libc = _libc()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        failures = [
            _errno_error(f"inotify_add_watch {path}")  # errno is read right after the call
            for path in paths
            if libc.inotify_add_watch(fd, os.fsencode(path), _WATCH_MASK) < 0
        ]
        if len(failures) == len(paths):
            os.close(fd)
            raise failures[0]
        for failure in failures:
            log.warning("specdir.inotify_unavailable", error=str(failure))
        return cls(fd)

    def __enter__(self) -> _Inotify:
        return self

    def __exit__(self, *_exc: object) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)

    def read_wanted(self) -> bool:
        """Drain the pending events; whether any of them may change a snapshot."""
        wanted = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return wanted
            wanted = wanted or _any_wanted(data)


def _any_wanted(data: bytes) -> bool:
    """Whether a buffer of inotify events holds one about a spec-looking name or the folder."""
    offset = 0
    found = False
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        raw = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
        offset += _EVENT.size + length
        if mask & _ALWAYS_WANTED or spec_service_name(os.fsdecode(raw)) is not None:
            found = True
    return found


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _log_news(before: SpecSnapshot | None, after: SpecSnapshot) -> None:
    """Log each spec error and problem once, when it first appears (never once per scan)."""
    old_errors: set[object] = set()
    if before is not None:
        old_errors = {_error_key(e.error) for e in before.entries.values()}
        old_errors |= {_error_key(p) for p in before.problems}
        if isinstance(before.self_spec, SpecError):
            old_errors.add(_error_key(before.self_spec))
    for entry in after.entries.values():
        if entry.error is not None and _error_key(entry.error) not in old_errors:
            log.warning(
                "spec.invalid",
                service=entry.service,
                file=entry.error.file,
                line=entry.error.line,
                error=entry.error.message,
            )
    if isinstance(after.self_spec, SpecError) and _error_key(after.self_spec) not in old_errors:
        log.warning(
            "spec.invalid",
            service=SELF_SERVICE,
            file=after.self_spec.file,
            line=after.self_spec.line,
            error=after.self_spec.message,
        )
    for problem in after.problems:
        if _error_key(problem) not in old_errors:
            log.warning("specdir.problem", file=problem.file, error=problem.message)

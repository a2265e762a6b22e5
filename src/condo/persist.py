"""The state file: reading it once at startup, writing it atomically, coalescing writes.

This module owns every byte of the state file and nothing of its meaning: it reads and writes
one JSON object; what the object says is the caller's business.

Invariants:

- The state file on disk is always a complete, valid document: a write goes to a temp file in
  the same directory, is fsynced, renamed over the old one, and the directory is fsynced. A
  failed write (read-only directory, disk full) leaves the last good file untouched and no temp
  file behind.
- A corrupt file is never silently overwritten: it is renamed aside to `<path>.corrupt-<unix
  time>` (logged as `state.corrupt`), so an operator can still look at it. The caller moves a
  file aside the same way when it is readable but not its own (`move_aside`).
- `StateWriter` never builds a backlog: only the newest state is written, and a slow or failing
  disk never blocks the caller.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from condo.errors import StateFileError

log = structlog.get_logger(__name__)


def read_state_file(path: Path) -> object | None:
    """Return the parsed JSON object in `path`, or None when there is nothing usable.

    None when the file does not exist. A file that cannot be read, is not valid UTF-8 JSON or
    whose top level is not an object is renamed aside to `<path>.corrupt-<unix time>` (warning
    `state.corrupt` naming both paths) and None is returned: the caller then adopts containers
    from the engine's labels. Blocking file I/O: call it from a thread in async code.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        move_aside(path, f"cannot read it ({exc.strerror or exc})")
        return None
    try:
        # NaN and Infinity are not JSON: a file holding them is damaged, not a state to act on.
        value: object = json.loads(data, parse_constant=_not_a_number)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        move_aside(path, f"not valid JSON ({exc})")
        return None
    if not isinstance(value, dict):
        move_aside(path, f"the top level is a {type(value).__name__}, not an object")
        return None
    return value


def _not_a_number(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def move_aside(path: Path, reason: str, *, kind: str = "corrupt") -> None:
    """Rename `path` to `<path>.<kind>-<unix time>` and log `state.<kind>` with the reason."""
    stamp = int(time.time())
    aside = path.with_name(f"{path.name}.{kind}-{stamp}")
    n = 0
    while aside.exists():  # two such files in one second: never clobber the first one
        n += 1
        aside = path.with_name(f"{path.name}.{kind}-{stamp}-{n}")
    event = f"state.{kind}"
    try:
        os.rename(path, aside)
    except OSError as exc:
        # Cannot move it (read-only directory...): say so; the next write will fail the same
        # way and surface as a StateFileError, so nothing is lost silently.
        log.warning(event, path=str(path), moved_to=None, reason=reason, move_error=str(exc))
        return
    log.warning(event, path=str(path), moved_to=str(aside), reason=reason)


def encode_state(data: object) -> bytes:
    """The exact bytes `write_state_file` writes for `data`.

    Raises TypeError/ValueError for data that is not plain JSON (NaN included): that is a bug of
    the caller, not a disk problem.
    """
    return (json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_state_file(path: Path, data: object) -> None:
    """Replace `path` atomically with `data` as JSON (blocking; call it from a thread).

    Raises StateFileError on any OSError; the previous file is then left as it was and the temp
    file is removed. The new file is created with mode 0600: specs may carry secrets in `Env`.
    """
    write_state_bytes(path, encode_state(data))


def write_state_bytes(path: Path, payload: bytes) -> None:
    """`write_state_file` for an already encoded payload (see `encode_state`)."""
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StateFileError(f"cannot write the state file {path}: {exc}") from exc
    try:
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except OSError as exc:
        # Anything before the rename failed: the old file was never touched; drop the temp.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:  # the rename did happen (fsync of the dir is all that's left)
            pass
        except OSError as cleanup_exc:  # a leftover temp is worth a line, not a second error
            log.warning("state.temp_left", path=tmp_name, error=str(cleanup_exc))
        raise StateFileError(f"cannot write the state file {path}: {exc}") from exc
    try:
        _fsync_directory(directory)
    except OSError as exc:
        # The new file is in place but the rename may not survive a crash; the writer retries.
        raise StateFileError(f"cannot sync the state directory {directory}: {exc}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateWriter:
    """Writes the newest state to disk, coalescing changes; never blocks the caller.

    Usage::

        writer = StateWriter(path, snapshot=lambda: encode(store))
        await nursery.start(writer.run)
        ...
        writer.mark_dirty()        # after every change: sync, O(1), never blocks
        ...
        await writer.flush()       # write-ahead (under the caller's own cancel scope)
        ...
        await writer.close(limit)  # at shutdown, after run() was cancelled: the last write

    Semantics:

    - Latest value, no backlog. `mark_dirty()` only bumps a version number and wakes the writer.
      When the writer is free it calls `snapshot()` once, in the Trio thread (so it sees one
      consistent state), encodes it there, and writes the bytes in `trio.to_thread`. Any number
      of marks during a write lead to exactly one more write, of the state as it is then.
    - Errors never vanish nor block. A failed write (`StateFileError`) is kept in `last_error`
      (for `/healthz` "degraded") and logged once per distinct message; the writer retries every
      `retry_delay` seconds, with the newest snapshot, until a write succeeds, which clears
      `last_error` and logs `state.write_recovered`.
    - `flush()` waits until every mark made before the call is covered by a successful write.
      It waits on a `trio.Event` that is swapped after each successful write (no polling); with
      a failing disk it waits until the disk recovers, so give it a cancel scope at shutdown.
      Without a running `run()` task it waits forever.
    - `close(limit)` is the one final write: the newest state, shielded and bounded, whether or
      not `run()` ever wrote. After `hand_over()` (a self-deploy's successor owns the file now)
      nothing is written any more, not even by `close`. Between `hold()` and `release()` (a
      self-deploy under way: a successor may already have read the file and be writing its
      own) `run()` writes nothing; `close` still writes (a stop-then-start hand-over stops this
      condo with SIGTERM, and its last word must be on disk before the successor starts).
    - `snapshot()` must return plain JSON data, or the file's bytes already encoded (exactly
      what `encode_state` gives); anything else is a bug and crashes `run()`.
    """

    def __init__(
        self, path: Path, snapshot: Callable[[], object], *, retry_delay: float = 1.0
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._retry_delay = retry_delay
        self._version = 0  # bumped by every mark_dirty()
        self._on_disk = 0  # the version covered by the last successful write
        self._dirty = trio.Event()  # set by mark_dirty(); replaced by run() before each write
        self._written = trio.Event()  # set, then replaced, after each successful write
        self._last_error: StateFileError | None = None
        self._handed_over = False
        self._held = False
        self._released = trio.Event()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def last_error(self) -> StateFileError | None:
        """The error of the last write attempt, or None once a write succeeded."""
        return self._last_error

    @property
    def pending(self) -> bool:
        """True while some mark is not yet covered by a successful write."""
        return self._on_disk != self._version

    @property
    def handed_over(self) -> bool:
        return self._handed_over

    def hand_over(self) -> None:
        """Write nothing from now on: the file belongs to a successor (a write in flight ends)."""
        self._handed_over = True
        self._dirty.set()  # run() wakes, sees it and parks

    def hold(self) -> None:
        """Write nothing more from `run()` until `release()` (a write in flight ends)."""
        self._held = True

    def release(self) -> None:
        """Writing resumes, with the newest state."""
        self._held = False
        self._released.set()
        self._released = trio.Event()

    def mark_dirty(self) -> None:
        """Note that the state changed; the writer will write the newest state soon."""
        self._version += 1
        self._dirty.set()

    async def flush(self) -> None:
        """Wait until the state as of this call is on disk."""
        target = self._version
        while self._on_disk < target:
            await self._written.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """The writer task: runs until cancelled (a write in flight finishes first)."""
        task_status.started()
        while True:
            if self._handed_over:
                await trio.sleep_forever()
            if self._held:
                await self._released.wait()
                continue
            if self._on_disk == self._version:
                await self._dirty.wait()
                continue
            # Swap before snapshotting: a mark from now on wakes the next round.
            self._dirty = trio.Event()
            if not await self._write():
                await trio.sleep(self._retry_delay)

    async def close(self, limit: float) -> None:
        """The last write, at shutdown: the newest state, within `limit` seconds, even while
        the caller is being cancelled; a failure is logged (`state.final_write_failed`)."""
        if self._handed_over:
            log.info("state.handed_over", path=str(self._path))  # the successor's file now
            return
        with trio.move_on_after(limit, shield=True):
            if not await self._write():
                log.error("state.final_write_failed", error=str(self._last_error))

    async def _write(self) -> bool:
        """Write the newest state once; False (and `last_error`) when the write failed."""
        version = self._version
        data = self._snapshot()
        payload = data if isinstance(data, bytes) else encode_state(data)
        try:
            await trio.to_thread.run_sync(write_state_bytes, self._path, payload)
        except StateFileError as exc:
            self._failed(exc)
            return False
        self._on_disk = version
        if self._last_error is not None:
            log.info("state.write_recovered", path=str(self._path))
            self._last_error = None
        self._written.set()
        self._written = trio.Event()
        return True

    def _failed(self, exc: StateFileError) -> None:
        if self._last_error is None or str(self._last_error) != str(exc):
            log.warning(
                "state.write_failed",
                path=str(self._path),
                error=str(exc),
                retry_in=self._retry_delay,
            )
        self._last_error = exc

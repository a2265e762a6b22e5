"""condo.persist: atomic state-file writes, corrupt files moved aside, coalescing StateWriter.

Real files in tmp_path. Failures the root user cannot provoke with permissions (ENOSPC, a rename
that fails) are injected by patching the os call, which exercises the real cleanup path.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import structlog
import trio

from condo import persist
from condo.errors import StateFileError
from condo.persist import StateWriter, read_state_file, write_state_file

STATE = {"web": {"state": "Stable", "image": "condo-test/busybox:1"}, "db": {"state": "Init"}}


def _pending(writer: StateWriter) -> bool:
    return writer.pending  # read through a call: mypy would narrow the property across awaits


def _last_error(writer: StateWriter) -> StateFileError | None:
    return writer.last_error


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# --- read / write ------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "condo-state.json"
    write_state_file(path, STATE)
    assert read_state_file(path) == STATE
    assert path.read_text().endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o600
    assert _leftovers(tmp_path, path.name) == []


def test_overwrite_replaces_whole_content(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state_file(path, {"a": "x" * 10_000})
    write_state_file(path, {"b": 1})
    assert read_state_file(path) == {"b": 1}


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert read_state_file(tmp_path / "nope.json") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "state.json"
    write_state_file(path, {"generation": 1})
    before = path.read_bytes()

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(StateFileError, match="No space left on device"):
        write_state_file(path, {"generation": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []


def test_write_into_missing_directory_raises_state_file_error(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot write the state file"):
        write_state_file(tmp_path / "no-such-dir" / "state.json", {})


def test_non_json_data_is_a_bug_not_a_disk_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state_file(path, {"ok": True})
    with pytest.raises(TypeError):
        write_state_file(path, {"bad": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        write_state_file(path, {"bad": float("nan")})
    assert read_state_file(path) == {"ok": True}
    assert _leftovers(tmp_path, path.name) == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"web": ["Stab', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'["Init"]', "the top level is a list"),
        (b"null", "the top level is a NoneType"),
    ],
)
def test_corrupt_file_is_moved_aside(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        assert read_state_file(path) is None
    assert not path.exists()
    (aside,) = tmp_path.iterdir()
    assert aside.name.startswith("state.json.corrupt-")
    assert aside.read_bytes() == content
    assert logs == [
        {
            "event": "state.corrupt",
            "log_level": "warning",
            "path": str(path),
            "moved_to": str(aside),
            "reason": logs[0]["reason"],
        }
    ]
    assert logs[0]["reason"].startswith(reason)


def test_unreadable_state_file_is_moved_aside(tmp_path: Path) -> None:
    # A directory where the file should be: reading fails with EISDIR (root ignores chmod 000).
    path = tmp_path / "state.json"
    path.mkdir()
    with structlog.testing.capture_logs() as logs:
        assert read_state_file(path) is None
    (aside,) = tmp_path.iterdir()
    assert aside.is_dir()
    assert logs[0]["event"] == "state.corrupt"
    assert logs[0]["moved_to"] == str(aside)
    assert "Is a directory" in logs[0]["reason"]


def test_two_corrupt_files_in_one_second_are_both_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)
    path = tmp_path / "state.json"
    path.write_text("first")
    read_state_file(path)
    path.write_text("second")
    read_state_file(path)
    assert (tmp_path / "state.json.corrupt-1700000000").read_text() == "first"
    assert (tmp_path / "state.json.corrupt-1700000000-1").read_text() == "second"


# --- StateWriter --------------------------------------------------------------------------------


class CountingSnapshot:
    """The supervisor's side: a mutable state and a snapshot function that counts its calls."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {"n": 0}
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return dict(self.state)


async def test_writer_coalesces_many_marks_into_few_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    source = CountingSnapshot()
    writes: list[bytes] = []
    real_write = persist.write_state_bytes

    def counting_write(p: Path, payload: bytes) -> None:
        writes.append(payload)
        real_write(p, payload)

    monkeypatch.setattr(persist, "write_state_bytes", counting_write)
    writer = StateWriter(path, source)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for n in range(1, 1001):
                source.state["n"] = n
                writer.mark_dirty()
            assert _pending(writer)
            await writer.flush()
            assert not _pending(writer)
            assert read_state_file(path) == {"n": 1000}
            # All marks came before the writer ran: one snapshot, one write.
            assert len(writes) == 1
            assert source.calls == 1
            # Nothing marked: flush returns at once and nothing is written again.
            await writer.flush()
            await trio.testing.wait_all_tasks_blocked()
            assert len(writes) == 1
            nursery.cancel_scope.cancel()


async def test_marks_during_a_write_give_exactly_one_more_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    source = CountingSnapshot()
    in_write = trio.Event()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()
    written: list[object] = []
    real_write = persist.write_state_bytes

    def slow_write(p: Path, payload: bytes) -> None:
        # Runs in a worker thread: signal the test, then wait until it has marked more changes.
        trio.from_thread.run_sync(in_write.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)
        written.append(json.loads(payload))
        real_write(p, payload)

    monkeypatch.setattr(persist, "write_state_bytes", slow_write)
    writer = StateWriter(path, source)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.mark_dirty()
            await in_write.wait()
            for n in range(1, 51):
                source.state["n"] = n
                writer.mark_dirty()
            monkeypatch.setattr(persist, "write_state_bytes", real_write)  # next write is quick
            release.set()
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert written == [{"n": 0}]  # the slow one saw the state of its own snapshot
    assert read_state_file(path) == {"n": 50}  # ...then exactly the newest one followed
    assert source.calls == 2


async def test_writer_exposes_error_retries_then_clears_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    write_state_file(path, {"n": -1})
    source = CountingSnapshot()
    failures = 0
    third_failure = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def disk_full(*_args: object) -> None:
        # Runs in the writer's worker thread.
        nonlocal failures
        failures += 1
        if failures == 3:
            trio.from_thread.run_sync(third_failure.set, trio_token=token)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = StateWriter(path, source, retry_delay=0.01)
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            assert writer.last_error is None
            monkeypatch.setattr(os, "replace", disk_full)
            source.state["n"] = 1
            writer.mark_dirty()
            flushed = trio.Event()

            async def flush_then_set() -> None:
                await writer.flush()
                flushed.set()

            nursery.start_soon(flush_then_set)
            await third_failure.wait()  # the writer keeps retrying on its own, without new marks
            assert isinstance(_last_error(writer), StateFileError)
            assert "No space left on device" in str(_last_error(writer))
            assert not flushed.is_set()  # flush waits for a *successful* write
            assert read_state_file(path) == {"n": -1}  # the last good file is untouched
            source.state["n"] = 2  # changed meanwhile: the retries go on with the newest state
            writer.mark_dirty()
            monkeypatch.undo()
            await flushed.wait()
            await writer.flush()
            assert _last_error(writer) is None
            assert read_state_file(path) == {"n": 2}
            nursery.cancel_scope.cancel()
    events = [entry["event"] for entry in logs]
    # One warning for the distinct error (not one per retry), one line for the recovery.
    assert events == ["state.write_failed", "state.write_recovered"]
    assert _leftovers(tmp_path, path.name) == []


async def test_idle_writer_takes_no_snapshot_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    source = CountingSnapshot()
    writer = StateWriter(path, source)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            # Idle: the writer parks on its event; nothing is written and no snapshot is taken.
            await trio.testing.wait_all_tasks_blocked()
            assert source.calls == 0
            assert not path.exists()
            writer.mark_dirty()
            await writer.flush()
            assert read_state_file(path) == {"n": 0}
            nursery.cancel_scope.cancel()


async def test_a_held_writer_writes_nothing_until_released_but_close_still_writes(
    tmp_path: Path,
) -> None:
    """While a self-deploy is under way (hold), a successor may be reading and writing the file:
    this condo's changes wait; release writes the newest; close writes even while held (the
    stop-then-start hand-over's SIGTERM), and after hand_over nothing is written at all."""
    path = tmp_path / "state.json"
    source = CountingSnapshot()
    writer = StateWriter(path, source)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.mark_dirty()
            await writer.flush()
            assert read_state_file(path) == {"n": 0}
            writer.hold()
            path.write_text('{"successor": true}')
            source.state["n"] = 1
            writer.mark_dirty()
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.1)
            assert read_state_file(path) == {"successor": True}
            writer.release()
            await writer.flush()
            assert read_state_file(path) == {"n": 1}
            writer.hold()
            source.state["n"] = 2
            writer.mark_dirty()
            nursery.cancel_scope.cancel()
    await writer.close(5)
    assert read_state_file(path) == {"n": 2}
    writer.hand_over()
    path.write_text('{"successor": true}')
    await writer.close(5)
    assert read_state_file(path) == {"successor": True}

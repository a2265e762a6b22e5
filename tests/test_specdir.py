"""condo.specdir: snapshots of the spec directories, on real files in tmp_path.

The scanner tests are synchronous; the watcher tests run the real task in a real Trio run with
the real clock (inotify and threads are involved, so no MockClock), each under a time cap.
Failures root cannot provoke with permissions (EACCES) are injected by wrapping `os.open` for
one path only, which exercises the real error path.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog
import trio

import condo.specdir
from condo.errors import SpecError
from condo.spec import MAX_SPEC_BYTES, SelfSpec, ServiceSpec, parse_spec
from condo.specdir import (
    SpecEntry,
    SpecScanner,
    SpecSnapshot,
    run_spec_watcher,
    spec_service_name,
)

WEB = b'{:spec {:Image "condo-test/busybox:1"}}\n'
WEB_2 = b'{:spec {:Image "condo-test/busybox:2"}}\n'
WEB_COMMENTED = b'; the web front\n{:spec {:Image "condo-test/busybox:1"}} ; same thing\n'
DB = b'{:spec {:Image "condo-test/healthy:1"} :deploy [:After 2]}\n'
SELF = b'{:Image "condo-test/busybox:1"}\n'


def scan(*prefixes: Path) -> SpecSnapshot:
    return SpecScanner(prefixes).scan()


def valid(snapshot: SpecSnapshot, name: str) -> ServiceSpec:
    spec = snapshot.entries[name].spec
    assert spec is not None, snapshot.entries[name].error
    return spec


def error_of(snapshot: SpecSnapshot, name: str) -> SpecError:
    entry = snapshot.entries[name]
    assert entry.spec is None
    assert entry.error is not None
    return entry.error


def folders(tmp_path: Path, *names: str) -> list[Path]:
    """New empty folders under `tmp_path`, one per name: PREFIXes for one scan."""
    made = [tmp_path / name for name in names]
    for folder in made:
        folder.mkdir()
    return made


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    directory = tmp_path / "specs"
    directory.mkdir()
    return directory


@pytest.fixture
def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every parse_spec call the scanner makes (file names)."""
    calls: list[str] = []

    def counting(data: bytes, file: str) -> ServiceSpec:
        calls.append(file)
        return parse_spec(data, file)

    monkeypatch.setattr(condo.specdir, "parse_spec", counting)
    return calls


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "service"),
    [
        ("web.edn", "web"),
        ("a.b.edn", "a.b"),
        ("self.edn", "self"),
        ("web server.edn", "web server"),  # a spec file; its name is rejected later, visibly
        (".web.edn", None),  # dot-files
        (".edn", None),
        (".web.edn.swp", None),  # vim
        (".#web.edn", None),  # emacs lock
        ("#web.edn#", None),  # emacs autosave
        ("web.edn~", None),  # backup
        ("4913", None),  # vim's write probe
        ("web.edn.ctmpl", None),  # consul-template source
        ("web.EDN", None),
        ("web.edn.tmp", None),
        ("edn", None),
    ],
)
def test_spec_service_name(filename: str, service: str | None) -> None:
    assert spec_service_name(filename) == service


def test_ignored_names_give_no_entries(specs: Path) -> None:
    for name in (".web.edn.swp", "web.edn~", "#web.edn#", ".#web.edn", "4913", "web.ctmpl"):
        (specs / name).write_bytes(WEB)
    (specs / "folder").mkdir()
    snapshot = scan(specs)
    assert snapshot == SpecSnapshot(entries={}, self_spec=None, problems=())


# --- add / change / remove ----------------------------------------------------------------------


def test_add_change_remove(specs: Path) -> None:
    scanner = SpecScanner([specs])
    assert scanner.scan().entries == {}

    (specs / "web.edn").write_bytes(WEB)
    first = scanner.scan()
    assert list(first.entries) == ["web"]
    entry = first.entries["web"]
    assert entry.path == specs / "web.edn"
    assert valid(first, "web").image == "condo-test/busybox:1"

    (specs / "db.edn").write_bytes(DB)
    (specs / "web.edn").write_bytes(WEB_2)
    second = scanner.scan()
    assert list(second.entries) == ["db", "web"]
    assert valid(second, "web").image == "condo-test/busybox:2"
    assert valid(second, "db").deploy.strategy == "After"
    assert second != first

    (specs / "web.edn").unlink()
    third = scanner.scan()
    assert list(third.entries) == ["db"]
    assert third.problems == ()


def test_unchanged_directory_gives_equal_snapshot_without_reparsing(
    specs: Path, count_parses: list[str]
) -> None:
    (specs / "web.edn").write_bytes(WEB)
    (specs / "bad.edn").write_bytes(b"{:spec")
    (specs / "dir.edn").mkdir()
    scanner = SpecScanner([specs])
    first = scanner.scan()
    second = scanner.scan()
    assert second == first
    assert second.entries["web"].spec is first.entries["web"].spec
    assert sorted(count_parses) == [str(specs / "bad.edn"), str(specs / "web.edn")]


def test_unchanged_files_keep_their_very_entries_when_another_changes(specs: Path) -> None:
    """Identity, not just equality: comparing snapshots, and offering each service its spec,
    then costs nothing for the files that did not change (no spec compared by value)."""
    (specs / "web.edn").write_bytes(WEB)
    (specs / "bad.edn").write_bytes(b"{:spec")
    (specs / "db.edn").write_bytes(DB)
    scanner = SpecScanner([specs])
    first = scanner.scan()
    (specs / "db.edn").write_bytes(WEB_2)
    second = scanner.scan()
    assert second.entries["web"] is first.entries["web"]
    assert second.entries["bad"] is first.entries["bad"]
    assert second.entries["db"] is not first.entries["db"]
    assert valid(second, "db").image == "condo-test/busybox:2"


def test_touch_without_content_change_gives_same_entry(
    specs: Path, count_parses: list[str]
) -> None:
    path = specs / "web.edn"
    path.write_bytes(WEB)
    scanner = SpecScanner([specs])
    first = scanner.scan()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # new stat key, same bytes
    second = scanner.scan()
    assert second == first
    assert second.entries["web"].spec is first.entries["web"].spec
    assert count_parses == [str(path)]


def test_comment_only_edit_gives_equal_spec(specs: Path) -> None:
    path = specs / "web.edn"
    path.write_bytes(WEB)
    scanner = SpecScanner([specs])
    first = scanner.scan()
    path.write_bytes(WEB_COMMENTED)
    second = scanner.scan()
    assert valid(second, "web") == valid(first, "web")
    assert second == first


def test_fresh_files_are_reread_old_ones_are_trusted(
    specs: Path, monkeypatch: pytest.MonkeyPatch, count_parses: list[str]
) -> None:
    """A file changed within the racy window is re-read each scan (its stat key could repeat
    after a same-size rewrite on a coarse clock); once old, the stat key alone is trusted."""
    path = specs / "web.edn"
    path.write_bytes(WEB)
    opened: list[str] = []
    real_open = os.open

    def spying_open(file: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if os.fspath(file) == str(path):
            opened.append(os.fspath(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spying_open)
    scanner = SpecScanner([specs])
    scanner.scan()
    scanner.scan()
    assert len(opened) == 2  # just written: not trusted, re-read...
    assert len(count_parses) == 1  # ...but the same bytes are not parsed again

    monkeypatch.setattr(condo.specdir, "_RACY_WINDOW_NS", -(10**18))  # every file counts as old
    scanner.scan()  # read once more; this read is trusted
    scanner.scan()
    scanner.scan()
    assert len(opened) == 3
    assert len(count_parses) == 1


# --- invalid files are error entries, never removals --------------------------------------------


def test_syntax_error_is_an_error_entry_with_line(specs: Path) -> None:
    (specs / "web.edn").write_bytes(
        b'{:spec {:Image "condo-test/busybox:1"}\n :deploy [:After 1}\n'
    )
    error = error_of(scan(specs), "web")
    assert error.file == str(specs / "web.edn")
    assert error.line is not None
    assert error.message


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: os.mkfifo(p), "is a named pipe"),
        (lambda p: p.symlink_to(p), "Too many levels of symbolic links"),
        (lambda p: p.symlink_to(p.parent / "nowhere.txt"), "symbolic link to nothing"),
        (lambda p: p.write_bytes(b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 50), ""),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b" " * (MAX_SPEC_BYTES + 1)), "larger than"),
    ],
    ids=["folder", "fifo", "symlink-loop", "dangling-symlink", "binary", "empty", "huge"],
)
async def test_unusable_file_is_an_error_entry(
    specs: Path, make: Callable[[Path], object], message: str
) -> None:
    path = specs / "web.edn"
    make(path)
    with trio.fail_after(5):  # a FIFO read would block forever: the scanner must not open it so
        snapshot = await trio.to_thread.run_sync(scan, specs, abandon_on_cancel=True)
    error = error_of(snapshot, "web")
    assert error.file == str(path)
    assert message in error.message
    assert snapshot.problems == ()


def test_unreadable_file_is_an_error_entry(specs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod 000 does not stop reads: inject EACCES for this one path.
    path = specs / "web.edn"
    path.write_bytes(WEB)
    (specs / "db.edn").write_bytes(DB)
    real_open = os.open

    def denying_open(file: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    snapshot = scan(specs)
    assert "Permission denied" in error_of(snapshot, "web").message
    assert valid(snapshot, "db").image == "condo-test/healthy:1"


def test_file_replaced_by_folder_is_an_error_not_a_removal(specs: Path) -> None:
    path = specs / "web.edn"
    path.write_bytes(WEB)
    scanner = SpecScanner([specs])
    assert valid(scanner.scan(), "web").image == "condo-test/busybox:1"
    path.unlink()
    path.mkdir()
    assert "is a directory" in error_of(scanner.scan(), "web").message


def test_partial_write_is_an_error_then_valid_when_complete(specs: Path) -> None:
    path = specs / "web.edn"
    scanner = SpecScanner([specs])
    path.write_bytes(WEB[:20])
    partial = scanner.scan()
    assert error_of(partial, "web").file == str(path)
    with path.open("ab") as f:
        f.write(WEB[20:])
    complete = scanner.scan()
    assert valid(complete, "web") == parse_spec(WEB, "x")


def test_same_error_gives_equal_snapshots(specs: Path) -> None:
    # Errors are exceptions (identity equality); snapshots must still compare by value, or a
    # broken file would be re-published on every rescan.
    (specs / "fifo.edn").symlink_to(specs / "fifo.edn")
    (specs / "bad.edn").write_bytes(b"{:spec")
    scanner = SpecScanner([specs, specs.parent / "missing"])
    assert scanner.scan() == scanner.scan()


def test_invalid_service_name_is_an_error_entry(specs: Path) -> None:
    (specs / "web server.edn").write_bytes(WEB)
    (specs / "_x.edn").write_bytes(WEB)
    (specs / "web.edn").write_bytes(WEB)
    snapshot = scan(specs)
    assert "cannot prefix a Docker container name" in error_of(snapshot, "web server").message
    assert error_of(snapshot, "_x").file == str(specs / "_x.edn")
    assert valid(snapshot, "web").image == "condo-test/busybox:1"


def test_entry_needs_exactly_one_of_spec_and_error(specs: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SpecEntry(service="web", path=specs / "web.edn", spec=None, error=None)
    spec = parse_spec(WEB, "web.edn")
    with pytest.raises(ValueError, match="exactly one"):
        SpecEntry(service="web", path=specs, spec=spec, error=SpecError("web.edn", "boom"))


# --- several PREFIXes ---------------------------------------------------------------------------


def test_clash_first_prefix_wins_and_is_reported(tmp_path: Path) -> None:
    first, second = folders(tmp_path, "a", "b")
    (first / "web.edn").write_bytes(WEB)
    (second / "web.edn").write_bytes(WEB_2)
    (second / "db.edn").write_bytes(DB)
    snapshot = scan(first, second)
    assert list(snapshot.entries) == ["db", "web"]  # one snapshot for both directories
    assert snapshot.entries["web"].path == first / "web.edn"
    assert valid(snapshot, "web").image == "condo-test/busybox:1"
    (problem,) = snapshot.problems
    assert problem.file == str(second / "web.edn")
    assert str(first / "web.edn") in problem.message


def test_clash_winner_is_first_prefix_even_when_invalid(tmp_path: Path) -> None:
    first, second = folders(tmp_path, "a", "b")
    (first / "web.edn").write_bytes(b"{:spec")
    (second / "web.edn").write_bytes(WEB)
    snapshot = scan(first, second)
    assert error_of(snapshot, "web").file == str(first / "web.edn")
    assert len(snapshot.problems) == 1


def test_same_prefix_twice_is_one_prefix(specs: Path) -> None:
    (specs / "web.edn").write_bytes(WEB)
    snapshot = scan(specs, Path(f"{specs}/"), specs / ".." / specs.name)
    assert list(snapshot.entries) == ["web"]
    assert snapshot.problems == ()


def test_missing_prefix_keeps_its_entries_and_reports(tmp_path: Path) -> None:
    mounted, other = folders(tmp_path, "volume", "other")
    (mounted / "web.edn").write_bytes(WEB)
    (mounted / "self.edn").write_bytes(SELF)
    (other / "db.edn").write_bytes(DB)
    scanner = SpecScanner([mounted, other])
    before = scanner.scan()
    assert before.problems == ()

    mounted.rename(tmp_path / "unmounted")  # the volume goes away
    (other / "db.edn").write_bytes(WEB_2)  # ...while the other PREFIX keeps being watched
    during = scanner.scan()
    assert during.entries["web"] == before.entries["web"]
    assert during.self_spec == before.self_spec
    assert valid(during, "db").image == "condo-test/busybox:2"
    (problem,) = during.problems
    assert problem.file == str(mounted)
    assert "No such file or directory" in problem.message
    assert scanner.scan() == during  # stable while it stays missing

    (tmp_path / "unmounted").rename(mounted)
    after = scanner.scan()
    assert after.problems == ()
    assert after.entries["web"] == before.entries["web"]


def test_unlistable_prefix_keeps_its_entries(specs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (specs / "web.edn").write_bytes(WEB)
    scanner = SpecScanner([specs])
    before = scanner.scan()
    real_scandir = os.scandir

    def denying_scandir(path: str | os.PathLike[str]) -> object:
        if os.fspath(path) == str(specs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denying_scandir)
    during = scanner.scan()
    assert during.entries == before.entries
    assert "Permission denied" in during.problems[0].message


def test_missing_prefix_at_start_is_a_problem_only(tmp_path: Path) -> None:
    snapshot = scan(tmp_path / "never")
    assert snapshot.entries == {}
    assert [p.file for p in snapshot.problems] == [str(tmp_path / "never")]


def test_empty_directory_removes_everything(specs: Path) -> None:
    (specs / "web.edn").write_bytes(WEB)
    (specs / "self.edn").write_bytes(SELF)
    scanner = SpecScanner([specs])
    assert list(scanner.scan().entries) == ["web"]
    for path in specs.iterdir():
        path.unlink()
    assert scanner.scan() == SpecSnapshot(entries={}, self_spec=None, problems=())


# --- self.edn -----------------------------------------------------------------------------------


def test_self_spec_is_separate(specs: Path) -> None:
    (specs / "self.edn").write_bytes(SELF)
    (specs / "web.edn").write_bytes(WEB)
    snapshot = scan(specs)
    assert list(snapshot.entries) == ["web"]
    assert isinstance(snapshot.self_spec, SelfSpec)
    assert snapshot.self_spec.container["Image"] == "condo-test/busybox:1"


def test_invalid_self_spec_is_an_error(specs: Path) -> None:
    (specs / "self.edn").write_bytes(WEB)  # a service spec, with the :spec wrapper
    snapshot = scan(specs)
    assert isinstance(snapshot.self_spec, SpecError)
    assert snapshot.self_spec.file == str(specs / "self.edn")
    assert snapshot.entries == {}


def test_self_spec_clash(tmp_path: Path) -> None:
    first, second = folders(tmp_path, "a", "b")
    (first / "self.edn").write_bytes(SELF)
    (second / "self.edn").write_bytes(b'{:Image "other:1"}')
    snapshot = scan(first, second)
    assert isinstance(snapshot.self_spec, SelfSpec)
    assert snapshot.self_spec.container["Image"] == "condo-test/busybox:1"
    assert [p.file for p in snapshot.problems] == [str(second / "self.edn")]


# --- the watcher task ---------------------------------------------------------------------------


class Published:
    """The consumer side: records every published snapshot; `wait_for` blocks on an Event."""

    def __init__(self) -> None:
        self.snapshots: list[SpecSnapshot] = []
        self._changed = trio.Event()

    def __call__(self, snapshot: SpecSnapshot) -> None:
        self.snapshots.append(snapshot)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[SpecSnapshot], bool]) -> SpecSnapshot:
        while not (self.snapshots and predicate(self.snapshots[-1])):
            await self._changed.wait()
        return self.snapshots[-1]


def watcher(
    prefixes: list[Path], published: Published, rescan_interval: float
) -> Callable[..., Awaitable[object]]:
    return functools.partial(run_spec_watcher, prefixes, published, rescan_interval=rescan_interval)


def _image(name: str) -> Callable[[SpecSnapshot], str | None]:
    def image(snapshot: SpecSnapshot) -> str | None:
        entry = snapshot.entries.get(name)
        return None if entry is None or entry.spec is None else entry.spec.image

    return image


async def test_watcher_starts_with_first_snapshot_and_publishes_a_write(specs: Path) -> None:
    (specs / "web.edn").write_bytes(WEB)
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # A long interval: only the inotify hint can make the write show up within 1 s.
            first = await nursery.start(watcher([specs], published, 60.0))
            assert published.snapshots == [first]
            assert _image("web")(first) == "condo-test/busybox:1"

            written_at = trio.current_time()
            (specs / "web.edn").write_bytes(WEB_2)
            with trio.fail_after(1):
                await published.wait_for(lambda s: _image("web")(s) == "condo-test/busybox:2")
            latency = trio.current_time() - written_at
            assert latency < 1

            (specs / "db.edn").write_bytes(DB)
            with trio.fail_after(1):
                await published.wait_for(lambda s: "db" in s.entries)
            (specs / "web.edn").unlink()
            with trio.fail_after(1):
                await published.wait_for(lambda s: list(s.entries) == ["db"])

            # An atomic write (temp file renamed over the spec) is seen too.
            (specs / ".db.edn.tmp").write_bytes(WEB_2)
            os.replace(specs / ".db.edn.tmp", specs / "db.edn")
            with trio.fail_after(1):
                await published.wait_for(lambda s: _image("db")(s) == "condo-test/busybox:2")
            nursery.cancel_scope.cancel()


async def test_watcher_does_not_republish_an_unchanged_rescan(specs: Path) -> None:
    (specs / "web.edn").write_bytes(WEB)
    (specs / "bad.edn").write_bytes(b"{:spec")
    published = Published()
    scans = 0
    real_scan = SpecScanner.scan

    def counting_scan(self: SpecScanner) -> SpecSnapshot:
        nonlocal scans
        scans += 1
        return real_scan(self)

    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(SpecScanner, "scan", counting_scan)
                await nursery.start(watcher([specs], published, 0.01))
                os.utime(specs / "web.edn")  # an inotify event, no content change
                await trio.sleep(0.3)
            assert scans >= 10  # it did rescan, many times...
            assert len(published.snapshots) == 1  # ...and published only the first snapshot
            nursery.cancel_scope.cancel()
    # The broken file is logged once, not once per rescan.
    invalid = [entry for entry in logs if entry["event"] == "spec.invalid"]
    assert [entry["service"] for entry in invalid] == ["bad"]


async def test_watcher_cancels_promptly(specs: Path) -> None:
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 60.0))
            await trio.sleep(0.05)  # let the inotify thread settle into its wait
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 1


async def test_watcher_keeps_going_on_timer_when_prefix_is_missing(tmp_path: Path) -> None:
    specs = tmp_path / "later"
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(watcher([specs], published, 0.05))
            assert first.entries == {}
            assert [p.file for p in first.problems] == [str(specs)]
            specs.mkdir()
            (specs / "web.edn").write_bytes(WEB)
            with trio.fail_after(2):
                appeared = await published.wait_for(lambda s: "web" in s.entries)
            assert appeared.problems == ()
            # Once the directory exists, inotify is re-armed on it and catches later writes.
            (specs / "web.edn").write_bytes(WEB_2)
            with trio.fail_after(1):
                await published.wait_for(lambda s: _image("web")(s) == "condo-test/busybox:2")
            nursery.cancel_scope.cancel()


async def test_watcher_publishes_an_error_state_not_a_removal(specs: Path) -> None:
    (specs / "web.edn").write_bytes(WEB)
    published = Published()
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 60.0))
            (specs / "web.edn").write_bytes(b"\x00\x01binary junk")
            with trio.fail_after(1):
                broken = await published.wait_for(lambda s: s.entries["web"].error is not None)
            assert broken.entries["web"].path == specs / "web.edn"
            (specs / "web.edn").write_bytes(WEB)
            with trio.fail_after(1):
                await published.wait_for(lambda s: s.entries["web"].spec is not None)
            nursery.cancel_scope.cancel()
    assert [entry["event"] for entry in logs] == ["spec.invalid"]
    assert logs[0]["file"] == str(specs / "web.edn")


async def test_watcher_runs_on_timer_alone_when_inotify_fails(
    specs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify(_paths: object) -> object:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(condo.specdir._Inotify, "open", no_inotify)
    published = Published()
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 0.05))
            (specs / "web.edn").write_bytes(WEB)
            with trio.fail_after(2):
                await published.wait_for(lambda s: "web" in s.entries)
            (specs / "web.edn").write_bytes(WEB_2)
            with trio.fail_after(2):
                await published.wait_for(lambda s: _image("web")(s) == "condo-test/busybox:2")
            nursery.cancel_scope.cancel()
    failures = [entry for entry in logs if entry["event"] == "specdir.inotify_unavailable"]
    assert len(failures) == 1  # logged once, not once per rescan
    assert "inotify watch limit reached" in failures[0]["error"]


class _Steps(trio.abc.Instrument):
    """Counts the scheduler steps of every task but the ones named in `ignore`."""

    def __init__(self, ignore: set[str]) -> None:
        self.ignore = ignore
        self.steps: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name not in self.ignore:
            self.steps.append(task.name)


async def test_idle_watcher_holds_no_thread_and_never_wakes(
    specs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle cost: between rescans a watcher with nothing changing runs nothing at all (watchfiles
    kept a worker thread polling its stop event every 10 ms and woke its task every 2 s), yet a
    write still wakes it at once."""
    (specs / "web.edn").write_bytes(WEB)
    in_flight = 0
    real_run_sync = trio.to_thread.run_sync

    async def counting_run_sync(fn: Callable[..., object], *args: object, **kw: object) -> object:
        nonlocal in_flight
        in_flight += 1
        try:
            return await real_run_sync(fn, *args, **kw)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    published = Published()
    me = trio.lowlevel.current_task().name
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 60.0))
            await trio.sleep(0.1)  # the first scan's thread has reported back
            steps = _Steps({me})
            trio.lowlevel.add_instrument(steps)
            try:
                await trio.sleep(2.5)  # longer than watchfiles' 2 s round trip
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert in_flight == 0  # no thread held while idle
            assert steps.steps == []  # and no task of the watcher woke up
            (specs / "web.edn").write_bytes(WEB_2)
            with trio.fail_after(1):
                await published.wait_for(lambda s: _image("web")(s) == "condo-test/busybox:2")
            nursery.cancel_scope.cancel()


async def test_idle_rescan_reads_and_parses_nothing(
    specs: Path, monkeypatch: pytest.MonkeyPatch, count_parses: list[str]
) -> None:
    """The periodic rescan of an unchanged directory only stats: no file is opened, nothing
    parsed, nothing published (it is what an idle condo does every rescan interval)."""
    for index in range(20):
        (specs / f"s{index:02d}.edn").write_bytes(WEB)
    monkeypatch.setattr(condo.specdir, "_RACY_WINDOW_NS", -(10**18))  # every file counts as old
    opened: list[str] = []
    real_open = os.open

    def spying_open(file: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        opened.append(os.fspath(file))
        return real_open(file, flags, *args, **kwargs)

    scans = 0
    real_scan = SpecScanner.scan

    def counting_scan(self: SpecScanner) -> SpecSnapshot:
        nonlocal scans
        scans += 1
        return real_scan(self)

    monkeypatch.setattr(SpecScanner, "scan", counting_scan)
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 0.01))
            assert len(opened) == 0  # os.open not spied yet: the first scan read every file
            assert len(count_parses) == 20
            monkeypatch.setattr(os, "open", spying_open)
            first = scans
            while scans < first + 10:
                await trio.sleep(0.01)
            assert opened == []
            assert len(count_parses) == 20
            assert len(published.snapshots) == 1
            nursery.cancel_scope.cancel()


async def test_a_change_inotify_missed_is_seen_by_the_rescan(
    specs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify runs but does not report this write (written through another mount, or the
    event was lost): the periodic rescan still publishes it."""
    (specs / "web.edn").write_bytes(WEB)
    monkeypatch.setattr(condo.specdir._Inotify, "read_wanted", lambda _self: False)
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([specs], published, 0.2))
            (specs / "web.edn").write_bytes(WEB_2)
            with trio.fail_after(2):
                await published.wait_for(lambda s: _image("web")(s) == "condo-test/busybox:2")
            nursery.cancel_scope.cancel()


def _event(mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
    # struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len] (NUL-padded).
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


@pytest.mark.parametrize(
    ("events", "wanted"),
    [
        ([_event(0x80, b"web.edn")], True),  # IN_MOVED_TO of a spec
        ([_event(0x8, b".web.edn.swp"), _event(0x100, b"notes.txt")], False),  # not specs
        ([_event(0x8, b"4913"), _event(0x200, b"db.edn")], True),  # a spec among others
        ([_event(0x4000)], True),  # IN_Q_OVERFLOW: events were lost, rescan everything
        ([_event(0x400)], True),  # IN_DELETE_SELF: the PREFIX itself went away
    ],
)
def test_inotify_events_that_wake_a_scan(events: list[bytes], wanted: bool) -> None:
    assert condo.specdir._any_wanted(b"".join(events)) is wanted


async def test_a_prefix_inotify_cannot_watch_leaves_the_others_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = folders(tmp_path, "first", "second")
    real = condo.specdir._libc()

    class OneWatchFails:
        inotify_init1 = real.inotify_init1

        @staticmethod
        def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
            if path == os.fsencode(first):
                ctypes.set_errno(errno.ENOSPC)
                return -1
            return int(real.inotify_add_watch(fd, path, mask))

    monkeypatch.setattr(condo.specdir, "_libc", OneWatchFails)
    published = Published()
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher([first, second], published, 60.0))
            (second / "web.edn").write_bytes(WEB)
            with trio.fail_after(1):
                await published.wait_for(lambda s: "web" in s.entries)
            nursery.cancel_scope.cancel()
    failures = [entry for entry in logs if entry["event"] == "specdir.inotify_unavailable"]
    assert len(failures) == 1
    assert str(first) in failures[0]["error"]

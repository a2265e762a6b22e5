"""Red team of issue 12: the spec watcher (condo.specdir) when its PREFIX is replaced by another
directory (a deploy tool that renames a fresh folder into place): inotify watches inodes, so the
watch is armed again on the new one, and a spec written before that watch exists must be seen
without waiting for the periodic rescan."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import condo.specdir
from tests.test_specdir import DB, WEB, Published, watcher


async def test_a_spec_written_while_inotify_is_armed_again_on_a_new_prefix_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs, fresh = tmp_path / "specs", tmp_path / "fresh"
    specs.mkdir()
    fresh.mkdir()
    (specs / "web.edn").write_bytes(WEB)
    real_open = condo.specdir._Inotify.open
    opened: list[Sequence[Path]] = []

    def open_after_a_write(paths: Sequence[Path]) -> condo.specdir._Inotify:
        opened.append(paths)
        if len(opened) == 2:
            # The new PREFIX is being watched: a spec lands after the scan that found the new
            # folder and before its watch exists (no event will ever tell of it).
            (specs / "db.edn").write_bytes(DB)
        return real_open(paths)

    monkeypatch.setattr(condo.specdir._Inotify, "open", open_after_a_write)
    published = Published()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # A long interval: only inotify (or the watcher itself) can show it within 2 s.
            await nursery.start(watcher([specs], published, 60.0))
            os.rename(specs, tmp_path / "old")
            os.rename(fresh, specs)
            with trio.fail_after(2):
                await published.wait_for(lambda s: list(s.entries) == [])  # the new, empty one
                await published.wait_for(lambda s: list(s.entries) == ["db"])
            assert len(opened) == 2
            nursery.cancel_scope.cancel()

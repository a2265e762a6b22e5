"""The README's screenshot scenario (tests/browser/screenshots.py) still plays from start to end:
three hosts all Stable, then a failing deploy and a host gone, then one service's view; every
picture is a real PNG of the whole page."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.browser.dashboard import VIEWPORT, BrowserThread
from tests.browser.screenshots import take_screenshots

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.consul, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


async def test_the_screenshot_scenario_plays(tmp_path: Path, browser_thread: BrowserThread) -> None:
    out = tmp_path / "doc"
    out.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # take_screenshots caps itself (SCENE_LIMIT) and checks each state it shows on the page.
    shots = await take_screenshots(out, browser_thread, work)
    for shot in (shots.healthy, shots.failing, shots.service):
        width, height = png_size(shot)
        assert width == VIEWPORT["width"]
        assert height >= 400
    assert len({shot.read_bytes() for shot in (shots.healthy, shots.failing, shots.service)}) == 3

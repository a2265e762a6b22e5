"""The fleet view with twenty real hosts (issue 17's "the fleet view with 20 real hosts"): twenty
`condo run` processes on the real engine and the real Consul, one small service each, in Debian's
Chromium. The fleet row counts every host, the service's view lists every host on one page, one
host stopped is counted unreachable and named, and nothing is beyond the 1400 px window.

Slow (marker `slow`): twenty condos start on a shared machine; the test is capped by
`trio.fail_after(CAP)`, each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from pathlib import Path

import pytest
import trio

from condo.docker import DockerClient
from tests.browser.dashboard import (
    ONE,
    OpenDashboard,
    css_string,
    expose_consul,
    free_port,
    serve_condo,
    spec,
    stop_condo,
)
from tests.integration.harness import CondoUnderTest, condo_files
from tests.integration.test_consul_session import consul_area

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.consul, pytest.mark.slow]

CAP = 240
HOSTS = 20

BEYOND = """() => document.documentElement.scrollWidth - document.documentElement.clientWidth"""


async def test_the_fleet_view_with_twenty_real_hosts(
    condo: CondoUnderTest,
    docker: DockerClient,
    tmp_path: Path,
    nursery: trio.Nursery,
    open_dashboard: OpenDashboard,
) -> None:
    started = time.monotonic()
    async with consul_area() as area, contextlib.AsyncExitStack() as stack:
        others: list[CondoUnderTest] = []
        for i in range(HOSTS - 1):
            (tmp_path / f"other{i}").mkdir()
            others.append(
                await stack.enter_async_context(condo_files(tmp_path / f"other{i}", docker))
            )
        exposing = expose_consul(area.prefix)
        try:
            with trio.fail_after(CAP):
                for one in (condo, *others):
                    one.write("web", spec(ONE))
                url = await serve_condo(nursery, condo, free_port(), *exposing)
                async with trio.open_nursery() as starting:
                    for one in others:
                        starting.start_soon(serve_condo, nursery, one, free_port(), *exposing)
                up = time.monotonic() - started
                page = await open_dashboard(url)
                web = page.row("web")
                await page.expect_text(web.locator(".fleet .counts"), f"Stable {HOSTS}")
                await page.expect_text(page.page.locator("#summary"), f"{HOSTS} hosts")
                await page.expect_text(web.locator(".odd"), f"all {HOSTS} Stable on one image")
                print(f"\n{HOSTS} condos up in {up:.0f} s, all Stable on the page after "
                      f"{time.monotonic() - started:.0f} s")  # fmt: skip

                leaving = others[7]
                await stop_condo(leaving, graceful=True)
                counts = f"Stable {HOSTS - 1} unreachable 1"
                await page.expect_text(web.locator(".fleet .counts"), counts)
                gone = web.locator(f".odd-host[data-host={css_string(leaving.host)}]")
                await page.expect_text(gone, re.compile(r"unreachable last seen \d+s ago"))
                assert await page.evaluate(BEYOND) == 0

                await page.thread.call(web.locator("th.name button.link").click)
                rows = page.page.locator("#rows tr")
                await page.expect_count(rows, HOSTS)
                assert await page.thread.call(rows.first.get_attribute, "data-host") == leaving.host
                assert await page.evaluate(BEYOND) == 0
        finally:
            with trio.move_on_after(60, shield=True):
                async with trio.open_nursery() as stopping:
                    for one in (condo, *others):
                        stopping.start_soon(functools.partial(stop_condo, one, graceful=True))

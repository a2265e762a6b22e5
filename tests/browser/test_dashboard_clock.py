"""The dashboard's times in a real browser against a real `condo run` on the real engine: ages
count by condo's clock, not the browser's (a browser an hour ahead still shows a container up
seconds, not an hour), and a retry that is due reads "retrying", never "retry in now" (condo is
paused with SIGSTOP past the retry's moment, so the page keeps showing the due TryAgain).

Capped by `trio.fail_after(CAP)`, each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import trio
from playwright.sync_api import expect

from tests.browser.dashboard import UI_LIMIT, OpenDashboard, free_port, serve_condo, spec
from tests.integration.harness import CondoUnderTest

pytestmark = [pytest.mark.browser, pytest.mark.docker]

CAP = 90
AHEAD = 3 * 3600  # s: the browser's clock is three hours ahead of condo's


async def test_ages_count_by_condos_clock_not_the_browsers(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        condo.write("web", spec("condo-test/busybox:1"))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard("about:blank")
        # The clock runs on from three hours ahead (Playwright's fake timers, time flowing).
        await page.thread.call(lambda: page.page.clock.install(time=time.time() + AHEAD))
        await page.thread.call(page.page.goto, url)
        assert await page.evaluate("() => Date.now() / 1000") > time.time() + AHEAD - 60
        await page.expect_state("web", "Stable")
        age = page.cell("web").locator(".line.container .age")
        await page.expect(lambda: expect(age).to_have_text(re.compile(r"^\d+s$"), timeout=UI_LIMIT))


async def test_a_due_retry_reads_retrying(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        condo.write("api", spec("condo-test/unhealthy:1", ":health-timeout 1"))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_state("api", "TryAgain")
        retry = page.cell("api").locator(".line.retry")
        await page.expect_text(retry, re.compile(r"^retry in \d+s$"))
        # condo stops in its tracks (the feed stays open, silent) while the retry falls due.
        assert condo.process is not None
        condo.process.send_signal(signal.SIGSTOP)
        try:
            await page.expect(lambda: expect(retry).to_have_text("retrying", timeout=UI_LIMIT))
            await page.expect_state("api", "TryAgain")
        finally:
            condo.process.send_signal(signal.SIGCONT)
        # Awake again, condo retries: the row moves on.
        await page.expect(
            lambda: expect(page.cell("api")).not_to_have_text(
                re.compile("retrying"), timeout=UI_LIMIT
            )
        )

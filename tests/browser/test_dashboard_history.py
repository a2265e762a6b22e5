"""The dashboard's safe-deploy bits in a real browser against a real `condo run` on the real
engine: a container on probation shows its countdown; a bad deploy reverted under
`:on-failure :revert` shows a `reverted` chip and line; the timeline column shows the service's
deploy history from the feed, and a reload shows it again (it comes from condo, not the page);
the revert's problem chip filters by it; the service's own view (URL hash) shows the history
again after a reload.

Capped by `trio.fail_after(CAP)`, each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import re

import pytest
import trio
from playwright.sync_api import Locator, expect

from tests.browser.dashboard import UI_LIMIT, Dashboard, OpenDashboard, free_port, serve_condo
from tests.integration.harness import CondoUnderTest

pytestmark = [pytest.mark.browser, pytest.mark.docker]

CAP = 90

# The registry's copy (pulled when a test removed the local one): it has a digest, which the
# revert pins.
GOOD = "localhost:5000/condo-test/healthy:1"
PINNED = r"localhost:5000/condo-test/healthy@sha256:"
# A probation of its own, so that the page has a few seconds of countdown to show; it must end
# before the bad spec comes, or GOOD would not be a last good spec to revert to.
GOOD_SPEC = f"""{{:spec {{:Image "{GOOD}" :Labels {{"condo-test" "1"}}}}
 :pull :missing :stop-timeout 1 :probation 3}}"""
BAD = "condo-test/busybox:2"
# Healthy at its first check (0.1 s), dies 2 s after it started: after turning Stable, during
# its probation (as in tests/integration/test_revert.py).
DIES_SOON = f"""{{:spec {{:Image "{BAD}" :Labels {{"condo-test" "1"}}
        :Cmd ["sh" "-c" "sleep 2; exit 7"]
        :Healthcheck {{:Test ["CMD" "true"] :Interval 100000000}}}}
 :pull :never :stop-timeout 1 :probation 5 :on-failure :revert}}"""
OUTCOMES = ["stable", "reverted", "replaced"]  # newest first: GOOD again, BAD, the first GOOD


def outcomes(page: Dashboard) -> Locator:
    return page.row("web").locator(".timeline .deploy-entry")


async def expect_history(page: Dashboard) -> None:
    """The timeline shows web's deploys, newest first, with their images, outcomes and times."""
    entries = outcomes(page)
    # A list: exactly these badges, in this order.
    badges = entries.locator(".outcome")
    await page.expect(lambda: expect(badges).to_have_text(OUTCOMES, timeout=UI_LIMIT))
    await page.expect_text(entries.nth(0), re.compile(rf"stable {PINNED}[0-9a-f]{{12}}…"))
    await page.expect_text(entries.nth(0), re.compile(r"started \d\d:\d\d:\d\d · stable \d\d:"))
    await page.expect_text(entries.nth(1), f"reverted {BAD}")
    await page.expect_text(entries.nth(1), re.compile(r"· ended \d\d:\d\d:\d\d"))
    await page.expect_text(entries.nth(1).locator(".deploy-error"), "during its 5 s probation")
    await page.expect_text(entries.nth(2), f"replaced {GOOD}")


async def test_a_reverted_deploy_and_the_history_show_and_survive_a_reload(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_conn("live")

        condo.write("web", GOOD_SPEC)
        await page.expect_state("web", "Stable")
        probation = page.cell("web").locator(".line.probation")
        await page.expect_text(
            probation, re.compile(r"probation until \d\d:\d\d:\d\d \(\d+s left\)")
        )
        # The countdown runs in the page; the line goes once the probation is over.
        countdown = probation.locator(".countdown")
        before = await page.text(countdown)
        await page.expect(lambda: expect(countdown).not_to_have_text(before, timeout=UI_LIMIT))
        await page.expect_count(probation, 0)

        condo.write("web", DIES_SOON)
        cell = page.cell("web")
        await page.expect_text(cell.locator(".cell-head .chip-reverted"), "reverted")
        line = cell.locator(".line.reverted")
        await page.expect_text(
            line,
            re.compile(rf"reverted from {BAD} → back to {PINNED}[0-9a-f]{{12}}…: .*\(exit 7\)"),
        )
        await page.expect_text(line, re.compile(r"\(\d+s ago\)"))
        # The pinned digest is shown short, whole on hover.
        title = await page.thread.call(line.locator("code.image").nth(1).get_attribute, "title")
        assert title is not None and re.fullmatch(rf"{PINNED}[0-9a-f]{{64}}", title), title
        await page.expect_state("web", "Stable")
        # The held-off spec is not shown as on its way: only the image that serves.
        image = cell.locator(".line.image")
        await page.expect_text(image, re.compile(rf"^{PINNED}[0-9a-f]{{12}}…$"))
        await expect_history(page)

        # A reload starts a new page: the history comes from condo again, the revert too.
        await page.thread.call(page.page.reload)
        await page.expect_conn("live")
        await page.expect_text(page.cell("web").locator(".chip-reverted"), "reverted")
        await expect_history(page)
        # The page-built transitions start over with the new page (none seen yet): what the
        # timeline shows came from condo.
        transitions = page.row("web").locator(".timeline .events")
        await page.expect_count(transitions, 0)

        # The revert is a problem: its chip counts it and filters by it.
        chip = page.page.locator("#problems button[data-kind=reverted]")
        await page.expect_text(chip, "1 reverted")
        await page.thread.call(chip.click)
        rows = page.page.locator("#rows tr")
        await page.expect_count(rows, 1)
        await page.expect_text(page.row("web"), "reverted")

        # The service's own view shows its whole history, and again after a reload.
        await page.thread.call(page.row("web").locator("th.name button.link").click)
        side = page.page.locator("#side .deploy-entry .outcome")
        await page.expect(lambda: expect(side).to_have_text(OUTCOMES, timeout=UI_LIMIT))
        await page.thread.call(page.page.reload)
        await page.expect_conn("live")
        await page.expect_text(page.page.locator("#crumbs"), "service web")
        await page.expect(lambda: expect(side).to_have_text(OUTCOMES, timeout=UI_LIMIT))

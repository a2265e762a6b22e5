"""The dashboard at fleet scale, in Debian's Chromium against real condos on the real Consul.

Covered: four real condos on one prefix: the fleet view (a row per service: its states counted
across hosts, the images running and wanted, the odd hosts named: another image, a failing
deploy, a spec error, an unreachable host), the problem chips and the "problems" filter, a
service's per-host view and a host's own view, the browser's back button and a reload (the view is
in the URL's hash), nothing that needs attention beyond the 1400 px window. Then 100 simulated
hosts x 20 services (condo's own Publisher, tests/browser/fleet.py) beside a real condo: the first
render and one update timed with the Performance API (printed, not asserted), the feed's bytes
when one host changes (one host's worth, not the fleet's), the service view paginated.

Each test is capped by `trio.fail_after(CAP)`, and each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Locator, WebSocket, expect

from condo.docker import DockerClient
from tests.browser.dashboard import (
    ONE,
    TWO,
    UI_LIMIT,
    Dashboard,
    OpenDashboard,
    css_string,
    expose_consul,
    free_port,
    serve_condo,
    spec,
    stop_condo,
)
from tests.browser.fleet import sim_deploying, simulated_hosts
from tests.integration.harness import CondoUnderTest, condo_files
from tests.integration.test_consul_session import consul_area

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.consul]

CAP = 120

BROKEN = '{:spec {:Image "condo-test/busybox:1"\n        :Labels {"condo.mine" "x"}}}\n'
UNHEALTHY = spec("condo-test/unhealthy:1", ":health-timeout 2")

# Whatever needs attention, on the page: each must be inside the 1400 px window.
ATTENTION = ".row-bad, .odd-host.bad, .line.error, .line.spec-error, .chip-problem, .line.retry"
OUTSIDE = f"""() => {{
    const width = document.documentElement.clientWidth;
    const outside = [...document.querySelectorAll({ATTENTION!r})]
        .filter((node) => node.getBoundingClientRect().right > width + 0.5)
        .map((node) => node.className);
    return {{outside, scroll: document.documentElement.scrollWidth - width}};
}}"""


async def click(page: Dashboard, locator: Locator) -> None:
    await page.thread.call(locator.click)


async def expect_rows(page: Dashboard, names: list[str]) -> None:
    """The view shows exactly the rows of `names`, in that order."""
    rows = page.page.locator("#rows tr")
    await page.expect_count(rows, len(names))
    for i, name in enumerate(names):
        await page.expect(functools.partial(_row_is, rows.nth(i), name))


def _row_is(row: Locator, name: str) -> None:
    expect(row).to_have_attribute("data-service", name, timeout=UI_LIMIT)


async def expect_hash(page: Dashboard, pattern: str) -> None:
    await page.expect(lambda: expect(page.page).to_have_url(re.compile(pattern), timeout=UI_LIMIT))


async def assert_nothing_beyond_the_window(page: Dashboard) -> None:
    found = await page.evaluate(OUTSIDE)
    assert found == {"outside": [], "scroll": 0}, found


async def test_a_fleet_of_real_hosts_problems_first_drill_down_and_back(
    condo: CondoUnderTest,
    docker: DockerClient,
    tmp_path: Path,
    nursery: trio.Nursery,
    open_dashboard: OpenDashboard,
) -> None:
    async with consul_area() as area, contextlib.AsyncExitStack() as stack:
        others = []
        for i in range(3):
            (tmp_path / f"other{i}").mkdir()
            others.append(
                await stack.enter_async_context(condo_files(tmp_path / f"other{i}", docker))
            )
        exposing = expose_consul(area.prefix)
        try:
            with trio.fail_after(CAP):
                await _fleet(condo, others, exposing, nursery, open_dashboard)
        finally:
            # Every condo ends before the area goes (else they would publish into it again).
            with trio.move_on_after(20, shield=True):
                for one in (condo, *others):
                    await stop_condo(one, graceful=True)


async def _fleet(
    condo: CondoUnderTest,
    others: list[CondoUnderTest],
    exposing: tuple[str, ...],
    nursery: trio.Nursery,
    open_dashboard: OpenDashboard,
) -> None:
    broken, drifting, leaving = others
    for one in (condo, broken, leaving):
        one.write("web", spec(ONE))
    drifting.write("web", spec(TWO))  # another image than the rest
    condo.write("only-here", spec(ONE))
    broken.write("worker", BROKEN)  # a spec error on one host
    drifting.write("api", UNHEALTHY)  # a failing deploy on one host
    url = await serve_condo(nursery, condo, free_port(), *exposing)
    for one in others:
        await serve_condo(nursery, one, free_port(), *exposing)
    page = await open_dashboard(url)

    # The fleet view: a row per service, counts across the four hosts, the odd one named.
    web = page.row("web")
    await page.expect_text(web.locator(".fleet .counts"), "Stable 4")
    await page.expect_text(web.locator(".line.running"), f"{ONE} \u00d73 · {TWO} \u00d71")
    drift = web.locator(f".odd-host[data-host={css_string(drifting.host)}]")
    await page.expect_text(drift, f"{drifting.host} Stable on {TWO}")
    # A service on one host shows that host's cell, named.
    await page.expect_text(page.cell("worker").locator(".spec-error"), "worker.edn:2")
    await page.expect_text(page.cell("worker").locator(".on-host"), f"on {broken.host}")
    await page.expect_state("api", "TryAgain")
    await page.expect_text(
        page.cell("api").locator(".line.retry"), re.compile(r"retry in \d+s|retrying")
    )
    await page.expect_text(page.page.locator("#summary"), "4 hosts")
    # The chips count every problem; "problems only" keeps the rows with one.
    await page.expect_text(page.chip("spec"), "1 spec error")
    await page.expect_text(page.chip("failed"), "1 failed deploy")
    await assert_nothing_beyond_the_window(page)
    await click(page, page.chip("any"))
    await expect_hash(page, r"#/\?problems=any$")
    await expect_rows(page, ["api", "worker"])

    # A host goes away: it is unreachable, counted, named, and its row is a problem now.
    await stop_condo(leaving, graceful=True)
    await page.expect_text(web.locator(".fleet .counts"), "Stable 3 unreachable 1")
    gone = web.locator(f".odd-host[data-host={css_string(leaving.host)}]")
    await page.expect_text(gone, re.compile(r"unreachable last seen \d+s ago"))
    await page.expect_text(page.chip("unreachable"), "1 unreachable host")
    newest = web.locator(".timeline .event").first
    await page.expect_text(newest.locator(".ev-host"), leaving.host)
    await page.expect_text(newest.locator(".why"), "host unreachable")
    await expect_rows(page, ["api", "web", "worker"])
    await click(page, page.chip("unreachable"))  # one kind alone
    await expect_rows(page, ["web"])
    await assert_nothing_beyond_the_window(page)

    # Drill down: the service, a row per host (problems first), then one host's services.
    await click(page, page.chip("unreachable"))  # off again
    await expect_hash(page, r"#/$")
    await click(page, web.locator("th.name button.link"))
    await expect_hash(page, r"#/service/web$")
    hosts = page.page.locator("#rows tr")
    await page.expect_count(hosts, 4)
    assert await page.thread.call(hosts.first.get_attribute, "data-host") == leaving.host
    await page.expect_state("web", "unreachable", host=leaving.host)
    await page.expect_text(page.cell("web", drifting.host), TWO)
    await page.expect_text(page.page.locator("#side"), "deploys on")
    await click(
        page, page.page.locator(f"#rows tr[data-host={css_string(drifting.host)}] .go-host")
    )
    await expect_hash(page, rf"#/host/{re.escape(drifting.host)}$")
    await expect_rows(page, ["api", "web"])
    await page.expect_text(page.page.locator("#crumbs"), drifting.host)
    await page.expect_state("api", "TryAgain", host=drifting.host)

    # Back, back: the service, then the fleet; a reload keeps the view it is on.
    await page.thread.call(page.page.go_back)
    await expect_hash(page, r"#/service/web$")
    await page.expect_count(hosts, 4)
    await page.thread.call(page.page.reload)
    await page.expect_conn("live")
    await page.expect_text(page.page.locator("#crumbs"), "service web")
    await page.expect_count(hosts, 4)
    await page.thread.call(page.page.go_back)
    await expect_hash(page, r"#/$")
    await page.expect_text(web.locator(".fleet .counts"), "Stable 3 unreachable 1")
    await assert_nothing_beyond_the_window(page)


SIM_HOSTS = 100
SIM_SERVICES = [f"m{i:02d}" for i in range(20)]


async def test_a_hundred_simulated_hosts_render_fast_and_a_change_costs_one_host(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    async with consul_area() as area:
        try:
            with trio.fail_after(CAP):
                await _hundred(condo, area.prefix, nursery, open_dashboard)
        finally:
            with trio.move_on_after(15, shield=True):
                await stop_condo(condo, graceful=True)


async def _hundred(
    condo: CondoUnderTest, prefix: str, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    condo.write("m00", spec(ONE))
    born = time.time() - 60
    stem = f"sim-{condo.host[-6:]}-"
    async with simulated_hosts(prefix, stem, SIM_HOSTS, SIM_SERVICES, ONE, born) as stores:
        url = await serve_condo(nursery, condo, free_port(), *expose_consul(prefix))
        # Every frame the page gets, and its size (Playwright's websocket events).
        frames: list[str] = []

        def record(ws: WebSocket) -> None:
            ws.on("framereceived", lambda payload: frames.append(str(payload)))

        page = await open_dashboard("about:blank")
        await page.thread.call(lambda: page.page.on("websocket", record))
        await page.thread.call(page.page.goto, url)
        m00 = page.row("m00")
        await page.expect_text(m00.locator(".fleet .counts"), f"Stable {SIM_HOSTS + 1}")
        rows = page.page.locator("#rows tr")
        await page.expect_count(rows, len(SIM_SERVICES))
        await page.expect_text(page.page.locator("#summary"), f"{SIM_HOSTS + 1} hosts")
        first_fleet = await page.evaluate(
            "() => performance.getEntriesByName('condo:first-fleet')[0].startTime"
        )
        fulls = [f for f in frames if f.startswith('{"read_at"') and '"type":"global"' in f]
        assert len(fulls) == 1, [f[:80] for f in frames]

        # One simulated host starts a deploy: the page shows it, from one small message.
        before = len(frames)
        renders = await page.evaluate("() => performance.getEntriesByName('condo:render').length")
        moving = stores[41]
        moving.set_state("m07", sim_deploying("m07", ONE, TWO, time.time()))
        odd = page.row("m07").locator(f".odd-host[data-host={css_string(moving.host)}]")
        await page.expect_text(odd, f"deploying {TWO}")
        await page.expect_text(page.row("m07").locator(".counts"), "Stable 99 Wait 1")
        update = await page.evaluate(
            f"() => performance.getEntriesByName('condo:render').slice({renders})"
            ".map((m) => m.duration)"
        )
        deltas = [f for f in frames[before:] if '"type":"global_delta"' in f]
        assert deltas, [f[:80] for f in frames[before:]]
        hosts_in = [sorted(re.findall(r'"(sim-[^"]+)":\{"last_seen"', f)) for f in deltas]
        assert [moving.host] in hosts_in, hosts_in
        biggest = max(len(f) for f in deltas)
        # One host's worth (20 services), not the fleet's (100 hosts x 20).
        assert biggest * 30 < len(fulls[0]), (biggest, len(fulls[0]))
        print(
            f"\n{SIM_HOSTS} simulated hosts x {len(SIM_SERVICES)} services + 1 real: "
            f"first render with every host {first_fleet:.0f} ms after navigation; "
            f"the update's renders {', '.join(f'{d:.1f}' for d in update)} ms; "
            f"first global {len(fulls[0])} bytes, the update's delta {biggest} bytes"
        )

        # The service view of 101 hosts: paginated, the moving host first.
        await click(page, page.row("m07").locator("th.name button.link"))
        await page.expect_text(page.page.locator("#pager"), f"rows 1\u201325 of {SIM_HOSTS}")
        shown = page.page.locator("#rows tr")
        await page.expect_count(shown, 25)
        assert await page.thread.call(shown.first.get_attribute, "data-host") == moving.host
        await click(page, page.page.locator("#pager button", has_text="next"))
        await expect_hash(page, r"#/service/m07\?page=2$")
        await page.expect_text(page.page.locator("#pager"), f"rows 26\u201350 of {SIM_HOSTS}")

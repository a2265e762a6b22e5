"""The dashboard's problem chips for what is not a service's own state, in a real browser against
a real `condo run`: the proxy that cannot run (`/v1/state`'s top-level `proxy` error: a
`:proxy` listener on a port something else holds) and a stale picture (condo's way to Consul
cut: the other hosts' rows are as of the last read, an unreachable host's too). Each gets its
chip and its banner, and the chip filters the rows it concerns. An unreachable host that ran
nothing (no row of any service) is named under the fleet, so that its chip leads somewhere.
(Spec errors, failed deploys and unreachable hosts: test_dashboard_fleet.py; reverted:
test_dashboard_history.py.)

Each test is capped by `trio.fail_after(CAP)`, each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import trio
from playwright.sync_api import expect

from bench.common.proxy import open_tcp_proxy
from tests.browser.dashboard import (
    ONE,
    UI_LIMIT,
    Dashboard,
    OpenDashboard,
    css_string,
    expose_consul,
    free_port,
    serve_condo,
    spec,
)
from tests.browser.fleet import fleet_beside, sim_store, simulated_hosts
from tests.integration.harness import CondoUnderTest

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.consul]

CAP = 90


async def expect_only_rows(page: Dashboard, names: list[str]) -> None:
    rows = page.page.locator("#rows tr")
    await page.expect_count(rows, len(names))
    for name in names:
        await page.expect_count(page.row(name), 1)


async def test_a_proxy_that_cannot_run_is_a_problem_chip_and_a_banner(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with socket.socket() as taken, trio.fail_after(CAP):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        condo.write("front", spec(ONE, f':proxy [{{:listen "127.0.0.1:{port}" :port 80}}]'))
        condo.write("plain", spec(ONE))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_state("plain", "Stable")
        await page.expect_text(page.chip("proxy"), "proxy error")
        banner = page.page.locator("#proxy-banner")
        await page.expect_text(banner, re.compile(r"The proxy cannot run: .*cannot bind socket"))
        await page.thread.call(page.chip("proxy").click)
        await expect_only_rows(page, ["front"])
        await page.expect(
            lambda: expect(page.row("front")).to_have_class(re.compile("row-bad"), timeout=UI_LIMIT)
        )


async def test_a_stale_picture_is_a_problem_chip_and_dates_the_other_hosts(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            async with simulated_hosts(
                fleet.layout.prefix, f"sim-{condo.host[-6:]}-", 1, ["remote"], ONE, time.time()
            ):
                # A host that went before: unreachable, as of the last read too.
                lost = sim_store(f"sim-{condo.host[-6:]}-lost", {"lost": ONE}, time.time())
                await fleet.start(lost)
                await fleet.stop(lost.host)
                condo.write("local", spec(ONE))
                async with open_tcp_proxy("127.0.0.1", 8500) as consul:
                    exposing = expose_consul(fleet.layout.prefix)
                    endpoint = ("--consul-endpoint", f"http://{consul.address}")
                    url = await serve_condo(nursery, condo, free_port(), *exposing, *endpoint)
                    page = await open_dashboard(url)
                    await page.expect_state("remote", "Stable")
                    await page.expect_state("local", "Stable")
                    await page.expect_state("lost", "unreachable")
                    await page.expect_count(page.chip("stale"), 0)
                # The way to Consul is cut: condo's picture goes stale.
                await page.expect_text(page.chip("stale"), "stale picture")
                banner = page.page.locator("#stale-banner")
                await page.expect_text(banner, re.compile(r"Last read \d+s ago"))
                await page.thread.call(page.chip("stale").click)
                await expect_only_rows(page, ["lost", "remote"])
                for row in ("lost", "remote"):
                    note = page.row(row).locator(".stale-note")
                    await page.expect_text(
                        note, re.compile(r"as of \d+s ago \(Consul cannot be read\)")
                    )


async def test_an_unreachable_host_that_ran_nothing_is_named_under_the_fleet(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            condo.write("local", spec(ONE))
            host = f"sim-{condo.host[-6:]}-idle"
            store = sim_store(host, {"old": ONE}, time.time())
            await fleet.start(store)
            store.drop("old")  # it runs nothing now; its record says so
            record = fleet.layout.record_key(host)
            while True:
                entry = await fleet.client.read_key(record)
                said = entry.value if entry is not None else None
                if said is not None and b'"old"' not in said:
                    break
                await trio.sleep(0.05)
            await fleet.stop(host)
            exposing = expose_consul(fleet.layout.prefix)
            url = await serve_condo(nursery, condo, free_port(), *exposing)
            page = await open_dashboard(url)
            await page.expect_state("local", "Stable")
            await page.expect_text(page.chip("unreachable"), "1 unreachable host")
            await page.thread.call(page.chip("unreachable").click)
            idle = page.page.locator(f"#idle-hosts .idle-host[data-host={css_string(host)}]")
            await page.expect_text(idle, re.compile(rf"{host} last seen \d+s ago"))
            await page.thread.call(idle.locator("button.link").click)
            await page.expect_text(page.page.locator("#crumbs"), f"host {host}")

"""The dashboard's fleet against hostile names and a changing fleet, in Debian's Chromium against
a real `condo run` on the real Consul, other hosts simulated by condo's own Publisher
(tests/browser/fleet.py).

Covered: host names any condo accepts (`__proto__`, markup, 200 characters without a space)
arriving in a `global_delta` count as hosts like any other, no view grows beyond the 1400 px
window, and a tampered address shows text or the fleet; a page that applied many deltas (hosts
deploying, going unreachable, coming back, gone, and a reconnect in the middle) shows what a
page loaded afresh shows; a condo that comes back without Consul leaves no other host on the
page; a burst of messages is drawn once, not once per message.

Each test is capped by `trio.fail_after(CAP)`, and each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import trio
from playwright.sync_api import WebSocket, expect

from condo.store import Store
from tests.browser.dashboard import (
    ONE,
    TWO,
    UI_LIMIT,
    Dashboard,
    OpenDashboard,
    expose_consul,
    free_port,
    serve_condo,
    spec,
    stop_condo,
)
from tests.browser.fleet import SimFleet, fleet_beside, sim_deploying, sim_stable, sim_store
from tests.integration.harness import CondoUnderTest

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.consul]

CAP = 120

# How far the page reaches beyond the window, and which elements do.
BEYOND = """() => {
    const width = document.documentElement.clientWidth;
    const wide = [...document.querySelectorAll("body *")]
        .filter((node) => node.getBoundingClientRect().right > width + 0.5)
        .map((node) => node.tagName + "." + node.className);
    return {scroll: document.documentElement.scrollWidth - width, wide};
}"""

# What the page shows of the fleet in its current view, ages and clock times left out (two
# pages differ by the seconds between them), and the transitions too (a page sees those itself).
SHOWN = r"""() => {
    const text = (id) => {
        const node = document.getElementById(id).cloneNode(true);
        for (const own of node.querySelectorAll(".timeline, .age, .countdown, time")) own.remove();
        return node.hidden ? "" : node.innerText.replace(/\s+/g, " ").trim();
    };
    return ["summary", "problems", "crumbs", "head-row", "rows", "pager", "empty", "stale-banner"]
        .map((id) => id + ": " + text(id)).join("\n");
}"""


# A long task: the page's thread does nothing else for 2.5 s.
BUSY = "() => { const end = performance.now() + 2500; while (performance.now() < end); }"


async def go(page: Dashboard, hash_: str) -> None:
    await page.evaluate(f"() => {{ location.hash = {hash_!r}; }}")


async def test_hostile_host_names_are_hosts_like_any_other_within_the_window(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    long_service = "s" + "x" * 120
    long_host = "h" + "y" * 200
    markup = '<img src=x onerror="window.pwned=1">'
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            born = time.time() - 60
            condo.write("web", spec(ONE))
            condo.write(long_service, spec(ONE))
            first = f"sim-{condo.host[-6:]}-1"
            await fleet.start(sim_store(first, {"web": ONE}, born))
            exposing = expose_consul(fleet.layout.prefix)
            url = await serve_condo(nursery, condo, free_port(), *exposing)
            page = await open_dashboard(url)
            web = page.row("web").locator(".fleet .counts")
            await page.expect_text(web, "Stable 2")
            # These come after the page's first picture: in global_delta messages.
            proto = sim_store("__proto__", {"web": ONE}, born)
            proto.set_state("web", sim_deploying("web", ONE, TWO, time.time()))
            for store in [
                proto,
                sim_store(long_host, {"web": ONE, long_service: ONE}, born),
                sim_store(markup, {"web": TWO}, born),
            ]:
                await fleet.start(store)
            await page.expect_text(web, "Stable 4 Wait 1")
            await page.expect_text(page.page.locator("#summary"), "5 hosts")
            odd = page.row("web").locator(".odd-host[data-host='__proto__']")
            await page.expect_text(odd, f"deploying {TWO}")
            await go(page, "#/host/__proto__")
            await page.expect_state("web", "Wait", "__proto__")
            for hash_ in [f"#/service/{long_service}", f"#/host/{long_host}", "#/"]:
                await go(page, hash_)
                await page.expect(
                    lambda: expect(page.page.locator("#rows tr").first).to_be_visible(
                        timeout=UI_LIMIT
                    )
                )
                beyond = await page.evaluate(BEYOND)
                assert beyond == {"scroll": 0, "wide": []}, (hash_, beyond)
            await go(page, f"#/host/{markup}")
            await page.expect_state("web", "Stable", markup)
            # Addresses typed or tampered with: text, or the fleet, never an error.
            empty, rows = page.page.locator("#empty"), page.page.locator("#rows tr")
            for hash_, says in [
                ("#/host/<script>window.pwned=2</script>", "No host <script>"),
                ("#/service/nope", "No host runs nope."),
            ]:
                await go(page, hash_)
                await page.expect_text(empty, says)
            for hash_ in ["#/?page=-1", "#/?page=1e9", "#/service/%E0%A4%A", "#/host/"]:
                await go(page, hash_)
                await page.expect_count(rows, 2)
                await page.expect_text(web, "Stable 4 Wait 1")
            assert await page.evaluate("() => window.pwned === undefined")


async def test_a_page_that_applied_every_change_shows_what_a_fresh_page_shows(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    chance = random.Random(17)
    names = ["api", "db", "web"]
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            condo.write("web", spec(ONE))
            port = free_port()
            exposing = expose_consul(fleet.layout.prefix)
            url = await serve_condo(nursery, condo, port, *exposing)
            stem = f"sim-{condo.host[-6:]}-"
            stores = {
                f"{stem}{i}": sim_store(f"{stem}{i}", dict.fromkeys(names, ONE), time.time())
                for i in range(6)
            }
            for store in list(stores.values())[:3]:
                await fleet.start(store)
            page = await open_dashboard(url)
            await page.expect_text(page.row("web").locator(".fleet .counts"), "Stable 4")
            for step in range(30):
                if step == 15:  # condo restarts in the middle: the page reconnects
                    await stop_condo(condo)
                    await serve_condo(nursery, condo, port, *exposing)
                await _change(chance, fleet, stores, names)
            await _settled(fleet, stores)
            fresh = await open_dashboard(url)
            views = ["#/", "#/?problems=any", "#/?problems=unreachable"]
            views += [f"#/service/{name}" for name in names]
            views += [f"#/host/{host}" for host in sorted(stores)]
            for view in views:
                await go(page, view)
                await go(fresh, view)
                # Either page may be a read of Consul behind: they must agree soon after.
                with trio.move_on_after(UI_LIMIT / 1000):
                    while (shown := await page.evaluate(SHOWN)) != await fresh.evaluate(SHOWN):
                        await trio.sleep(0.2)
                assert shown == await fresh.evaluate(SHOWN), view


async def _change(
    chance: random.Random, fleet: SimFleet, stores: dict[str, Store], names: list[str]
) -> None:
    """One random change of the simulated fleet: a deploy, a host stopped (unreachable), a host
    started (new, or back), a stopped host forgotten (gone)."""
    host = chance.choice(sorted(stores))
    store = stores[host]
    running = host in fleet.running
    move = chance.choice(["deploy", "deploy", "settle", "stop", "start", "forget"])
    if running and move == "deploy":
        name = chance.choice(names)
        store.set_state(name, sim_deploying(name, ONE, TWO, time.time()))
    elif running and move == "settle":
        name = chance.choice(names)
        store.set_state(name, sim_stable(name, chance.choice([ONE, TWO]), time.time()))
    elif running and move == "stop":
        await fleet.stop(host)
    elif not running and move == "forget":
        await fleet.forget(host)
    elif not running:
        await fleet.start(store)
    await trio.sleep(chance.uniform(0, 0.2))


async def _settled(fleet: SimFleet, stores: dict[str, Store]) -> None:
    """Wait until Consul says of every running host what its store says."""
    layout, client = fleet.layout, fleet.client
    wanted = ("state", "image")
    for host in fleet.running:
        for name, view in stores[host].view()["services"].items():
            while True:
                entry = await client.read_key(layout.key(name, host))
                said = entry.value if entry is not None else None
                service = json.loads(said)["state"] if said is not None else {}
                if [service.get(k) for k in wanted] == [view.get(k) for k in wanted]:
                    break
                await trio.sleep(0.05)


async def test_a_condo_back_without_consul_leaves_no_other_host_on_the_page(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            condo.write("web", spec(ONE))
            await fleet.start(sim_store(f"sim-{condo.host[-6:]}-1", {"remote": ONE}, 0))
            port = free_port()
            exposing = expose_consul(fleet.layout.prefix)
            await serve_condo(nursery, condo, port, *exposing)
            page = await open_dashboard(f"http://127.0.0.1:{port}")
            await page.expect_state("remote", "Stable")
            await page.expect_text(page.page.locator("#summary"), "2 services · 2 hosts")
            await stop_condo(condo, graceful=True)
            await serve_condo(nursery, condo, port)  # without --expose consul
            await page.expect_conn("live")
            alone = re.compile(r"^1 service\b")  # no "· 2 hosts"
            summary = page.page.locator("#summary")
            await page.expect(lambda: expect(summary).to_have_text(alone, timeout=UI_LIMIT))
            await page.expect_count(page.row("remote"), 0)


async def test_a_burst_of_messages_is_drawn_once_not_once_per_message(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    async with fleet_beside(condo) as fleet:
        with trio.fail_after(CAP):
            condo.write("web", spec(ONE))
            stores = [
                sim_store(f"sim-{condo.host[-6:]}-{i}", {"web": ONE}, time.time()) for i in range(8)
            ]
            for store in stores:
                await fleet.start(store)
            exposing = expose_consul(fleet.layout.prefix)
            url = await serve_condo(nursery, condo, free_port(), *exposing)
            deltas: list[int] = []  # the size of every global_delta the page got

            def count(payload: str | bytes) -> None:
                if '"type":"global_delta"' in str(payload):
                    deltas.append(len(payload))

            def record(ws: WebSocket) -> None:
                ws.on("framereceived", count)

            page = await open_dashboard("about:blank")
            await page.thread.call(lambda: page.page.on("websocket", record))
            await page.thread.call(page.page.goto, url)
            counts = page.row("web").locator(".fleet .counts")
            await page.expect_text(counts, "Stable 9")
            renders = "() => performance.getEntriesByName('condo:render').length"
            before, sent = await page.evaluate(renders), len(deltas)
            # The page's thread is busy (a long task) while the fleet changes host by host:
            # the messages wait for it, then come in a burst.
            async with trio.open_nursery() as busy:
                busy.start_soon(page.evaluate, BUSY)
                await trio.sleep(0.3)
                for store in stores:
                    store.set_state("web", sim_deploying("web", ONE, TWO, time.time()))
                    await trio.sleep(0.2)
            await page.expect_text(counts, "Stable 1 Wait 8")
            drawn = await page.evaluate(renders) - before
            burst = len(deltas) - sent
            print(f"\n{burst} global_delta messages in the burst, drawn in {drawn} renders")
            assert burst >= 4, burst
            assert drawn * 2 <= burst, (drawn, burst)

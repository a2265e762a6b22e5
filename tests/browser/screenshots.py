"""The README's three dashboard screenshots, taken from a real system: three condos (three hosts
on one engine, sharing a Consul prefix) with a handful of services, watched by the page while
they deploy. `doc/dashboard-healthy.png`: the fleet view, everything Stable after a rolling
update. Then a failing deploy (an unhealthy image, a container that exits, a broken spec file, a
deploy that dies in its probation and is reverted) and a host that goes away, for
`doc/dashboard-failing.png`; and one service's view of its hosts, `doc/dashboard-service.png`.

    .venv/bin/python -m tests.browser.screenshots [OUT_DIR]      # default: doc/

Needs what the browser tests need (scripts/test-env --with-browser). tests/browser/
test_screenshots.py runs the same scenario into a temporary folder, so this keeps working.
Every container made here carries the hosts' labels and is removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import trio
from playwright.sync_api import Locator

from condo.docker import DockerClient, open_docker
from tests.browser.dashboard import (
    BrowserThread,
    Dashboard,
    expose_consul,
    free_port,
    serve_condo,
    spec,
    stop_condo,
)
from tests.integration.harness import REPO, CondoUnderTest, remove_host_containers
from tests.integration.test_consul_session import consul_area

SCENE_LIMIT = 240.0  # s: the whole scenario, both screenshots
# Healthy at its first check, dies 2 s after it started: during its probation.
DIES_IN_PROBATION = """{:spec {:Image "condo-test/busybox:2" :Labels {"condo-test" "1"}
        :Cmd ["sh" "-c" "sleep 2; exit 7"]
        :Healthcheck {:Test ["CMD" "true"] :Interval 100000000}}
 :stop-timeout 1 :probation 5 :on-failure :revert}"""


@attrs.frozen
class Shots:
    healthy: Path
    failing: Path
    service: Path


@contextlib.asynccontextmanager
async def demo_host(root: Path, docker: DockerClient, name: str) -> AsyncIterator[CondoUnderTest]:
    """A condo's files under `root/name`; its host name is `name-<random>` (unique on the
    engine, so that the clean-up by host label touches nothing else)."""
    folder = root / name
    specs = folder / "specs"
    specs.mkdir(parents=True)
    host = f"{name}-{uuid.uuid4().hex[:4]}"
    under_test = CondoUnderTest(
        specs=specs, state_path=folder / "state.json", host=host, docker=docker
    )
    try:
        yield under_test
    finally:
        with trio.move_on_after(60, shield=True):
            await stop_condo(under_test, graceful=True)
            await remove_host_containers(docker, host)


async def take_screenshots(out: Path, thread: BrowserThread, work: Path) -> Shots:
    """Play the scenario (files under `work`) and write the three PNGs into `out`."""
    shots = Shots(
        healthy=out / "dashboard-healthy.png",
        failing=out / "dashboard-failing.png",
        service=out / "dashboard-service.png",
    )
    with trio.fail_after(SCENE_LIMIT):
        async with (
            open_docker() as docker,
            consul_area() as area,
            demo_host(work, docker, "node-a") as a,
            demo_host(work, docker, "node-b") as b,
            demo_host(work, docker, "node-c") as c,
            trio.open_nursery() as nursery,
        ):
            exposing = expose_consul(area.prefix)
            for host in (a, b, c):
                host.write("web", spec("condo-test/http:1", ":deploy [:After 2]"))
            url = await serve_condo(nursery, a, free_port(), *exposing)
            await serve_condo(nursery, b, free_port(), *exposing)
            await serve_condo(nursery, c, free_port(), *exposing)
            page = await Dashboard.open(thread, url)
            try:
                await _healthy(page, a, b, c)
                await page.screenshot(shots.healthy)
                await _failing(page, a, b, c)
                await page.screenshot(shots.failing)
                await page.thread.call(page.row("api").locator("th.name button.link").click)
                await page.expect_text(page.page.locator("#crumbs"), "service api")
                await page.expect_state("api", "unreachable", c.host)
                await page.screenshot(shots.service)
            finally:
                with trio.move_on_after(10, shield=True):
                    await page.close()
            assert page.errors == [], page.errors
            # Every condo ends before the Consul area goes.
            with trio.move_on_after(30, shield=True):
                for host in (a, b, c):
                    await stop_condo(host, graceful=True)
            nursery.cancel_scope.cancel()
    return shots


def web_odd_hosts(page: Dashboard) -> Locator:
    return page.row("web").locator(".odd-host")


async def expect_counts(page: Dashboard, service: str, text: str) -> None:
    """The fleet row of `service` counts its states across hosts as `text` ("Stable 3")."""
    await page.expect_text(page.row(service).locator(".fleet .counts"), text)


async def _healthy(
    page: Dashboard, a: CondoUnderTest, b: CondoUnderTest, c: CondoUnderTest
) -> None:
    await expect_counts(page, "web", "Stable 3")
    # Services added while the page watches, so that their timelines have something to say.
    for host in (a, b, c):
        host.write("api", spec("condo-test/healthy:1"))
    for host in (a, b):
        host.write("cache", spec("condo-test/busybox:1", ":stop-timeout 1 :on-failure :revert"))
    a.write("worker", spec("condo-test/busybox:2", ":stop-timeout 1"))
    for host in (b, c):
        host.write("scheduler", spec("condo-test/healthy:2"))
    await expect_counts(page, "api", "Stable 3")
    await expect_counts(page, "cache", "Stable 2")
    await expect_counts(page, "scheduler", "Stable 2")
    await page.expect_state("worker", "Stable")
    # A rolling update of `web`, one host after the other.
    running = page.row("web").locator(".line.running")
    for done, host in enumerate((a, b), start=1):
        host.write("web", spec("condo-test/http:2", ":deploy [:After 2]"))
        await page.expect_text(running, f"condo-test/http:2 \u00d7{done}")
    c.write("web", spec("condo-test/http:2", ":deploy [:After 2]"))
    await page.expect_text(running, re.compile(r"^running condo-test/http:2$"))
    await expect_counts(page, "web", "Stable 3")
    await page.expect_count(web_odd_hosts(page), 0)
    await page.expect_conn("live")


async def _failing(
    page: Dashboard, a: CondoUnderTest, b: CondoUnderTest, c: CondoUnderTest
) -> None:
    # An unhealthy image next to the stable one: TryAgainNext, the old container serves on.
    a.write("api", spec("condo-test/unhealthy:1", ":deploy [:After 0] :health-timeout 2"))
    # A container that exits at once: TryAgain with nothing running.
    b.write("scheduler", spec("condo-test/exits:1"))
    # A typo in a spec file: the error with file:line, the service keeps its last good spec.
    a.write(
        "worker",
        '{:spec {:Image "condo-test/busybox:2"\n        :Labels {"condo-test" 1}}}\n',
    )
    # A deploy that turns healthy and dies in its probation, under :on-failure :revert: back on
    # the last good image, pinned, and this condo's history says so.
    a.write("cache", DIES_IN_PROBATION)
    # A host goes away: its condo stops (its containers run on), its session ends.
    await stop_condo(c, graceful=True)
    await expect_counts(page, "api", "TryAgainNext 1")
    await expect_counts(page, "api", "unreachable 1")
    await expect_counts(page, "scheduler", "TryAgain 1")
    await page.expect_text(page.cell("worker").locator(".spec-error"), "worker.edn:2")
    cache = page.row("cache")
    await page.expect_text(cache.locator(".odd-host"), "reverted from condo-test/busybox:2")
    await page.expect_text(cache.locator(".timeline .deploy-entry").first, "stable")
    await page.expect_text(page.page.locator("#problems"), "1 reverted")
    await page.expect_text(page.page.locator("#problems"), "1 unreachable host")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else REPO / "doc"
    out.mkdir(parents=True, exist_ok=True)
    thread = BrowserThread()
    thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="condo-screenshots-") as work:
            shots = trio.run(take_screenshots, out, thread, Path(work))
    finally:
        thread.close()
    print(f"wrote {shots.healthy}, {shots.failing} and {shots.service}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The README's two dashboard screenshots, taken from a real system: two condos (two hosts on one
engine, sharing a Consul prefix) with a handful of services, watched by the page while they
deploy. `doc/dashboard-healthy.png`: everything Stable after a rolling update. Then a failing
deploy (an unhealthy image, a container that exits, a broken spec file, a deploy that dies in its
probation and is reverted) for
`doc/dashboard-failing.png`.

    .venv/bin/python -m tests.browser.screenshots [OUT_DIR]      # default: doc/

Needs what the browser tests need (scripts/test-env --with-browser). tests/browser/
test_screenshots.py runs the same scenario into a temporary folder, so this keeps working.
Every container made here carries the hosts' labels and is removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import trio

from condo.docker import DockerClient, open_docker
from tests.browser.dashboard import (
    BrowserThread,
    Dashboard,
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
    """Play the scenario (files under `work`) and write the two PNGs into `out`."""
    shots = Shots(healthy=out / "dashboard-healthy.png", failing=out / "dashboard-failing.png")
    with trio.fail_after(SCENE_LIMIT):
        async with (
            open_docker() as docker,
            consul_area() as area,
            demo_host(work, docker, "node-a") as a,
            demo_host(work, docker, "node-b") as b,
            trio.open_nursery() as nursery,
        ):
            exposing = ("--expose", "consul", "--consul-prefix", area.prefix)
            a.write("web", spec("condo-test/http:1", ":deploy [:After 2]"))
            b.write("web", spec("condo-test/http:1", ":deploy [:After 2]"))
            url = await serve_condo(nursery, a, free_port(), *exposing)
            await serve_condo(nursery, b, free_port(), *exposing)
            page = await Dashboard.open(thread, url)
            try:
                await _healthy(page, a, b)
                await page.screenshot(shots.healthy)
                await _failing(page, a, b)
                await page.screenshot(shots.failing)
            finally:
                with trio.move_on_after(10, shield=True):
                    await page.close()
            assert page.errors == [], page.errors
            # Both condos end before the Consul area goes.
            with trio.move_on_after(30, shield=True):
                await stop_condo(a, graceful=True)
                await stop_condo(b, graceful=True)
            nursery.cancel_scope.cancel()
    return shots


async def _healthy(page: Dashboard, a: CondoUnderTest, b: CondoUnderTest) -> None:
    await page.expect_state("web", "Stable", a.host)
    await page.expect_state("web", "Stable", b.host)
    # Services added while the page watches, so that their timelines have something to say.
    for host in (a, b):
        host.write("api", spec("condo-test/healthy:1"))
        host.write("cache", spec("condo-test/busybox:1"))
    a.write("worker", spec("condo-test/busybox:2", ":stop-timeout 1"))
    b.write("scheduler", spec("condo-test/healthy:2"))
    for name, hosts in {
        "api": (a, b),
        "cache": (a, b),
        "worker": (a,),
        "scheduler": (b,),
    }.items():
        for host in hosts:
            await page.expect_state(name, "Stable", host.host)
    # A rolling update of `web`, one host after the other.
    for host in (a, b):
        host.write("web", spec("condo-test/http:2", ":deploy [:After 2]"))
        await page.expect_text(page.cell("web", host.host), "condo-test/http:2")
        await page.expect_state("web", "Stable", host.host)
    await page.expect_conn("live")


async def _failing(page: Dashboard, a: CondoUnderTest, b: CondoUnderTest) -> None:
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
    # the last good image, pinned, and the history says so.
    b.write("cache", DIES_IN_PROBATION)
    await page.expect_state("api", "TryAgainNext", a.host)
    await page.expect_state("scheduler", "TryAgain", b.host)
    await page.expect_text(page.cell("worker", a.host).locator(".spec-error"), "worker.edn:2")
    await page.expect_text(page.cell("api", a.host).locator(".line.retry"), "retry in")
    await page.expect_text(page.cell("cache", b.host).locator(".chip-reverted"), "reverted")
    await page.expect_state("cache", "Stable", b.host)
    # The history column is this condo's (a's): with two hosts it says whose.
    await page.expect_text(page.row("cache").locator(".timeline .whose"), f"deploys on {a.host}")


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
    print(f"wrote {shots.healthy} and {shots.failing}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

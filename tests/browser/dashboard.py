"""Driving the dashboard: Debian's Chromium through Playwright, against a real `condo run`.

`BrowserThread` owns Playwright's *sync* API on one dedicated thread. Playwright's async API runs
only on asyncio (and condo's tests are Trio), while its sync objects belong to the thread that
made them; so every Playwright call is submitted to a one-worker executor (always the same
thread) and awaited from Trio with `trio.to_thread.run_sync(future.result)`, which keeps Trio's
loop free. Playwright's own timeouts bound every call (`UI_LIMIT`), so a call abandoned by a
cancelled test still ends.

`Dashboard` is one page (in a fresh browser context: no cookies or storage from other tests)
with the selectors the page promises: `tr[data-service=NAME]`, `td[data-host=HOST]`, the state
badge `.badge.state`, `#conn` (live / connecting / disconnected / token needed), `#token-form`,
the problem chips `#problems button[data-kind=KIND]`.

`serve_condo` runs `condo run` as a child process (tests/integration/harness.py) with its API on
a fixed loopback port, so that a restarted condo comes back at the same address; with
`expose_consul(prefix)` among its arguments, it joins the fleet on that Consul prefix.

Chromium starts with the flags that keep it off the network (ENVIRONMENT.md "Browser") and, as
Playwright does for every launch, with a fresh temporary --user-data-dir.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import trio
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from tests.integration.harness import CondoUnderTest

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"  # Debian's; never `playwright install` (it downloads a browser)
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 800}
UI_LIMIT = 30_000  # ms: the longest a single Playwright wait may take
SERVE_LIMIT = 30.0  # s: from spawning condo to its API answering

ONE = "condo-test/busybox:1"  # the test images' (scripts/test-env): one image, then another
TWO = "condo-test/busybox:2"


class BrowserThread:
    """Chromium, driven by Playwright's sync API on its own thread (see the module docstring)."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="playwright"
        )
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None

    def start(self) -> None:
        """Launch Chromium (blocking: call it outside Trio, e.g. from a session fixture)."""
        self._executor.submit(self._launch).result(timeout=120)

    def _launch(self) -> None:
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )

    def close(self) -> None:
        """Close Chromium and Playwright, then the thread (blocking)."""
        self._executor.submit(self._shut).result(timeout=60)
        self._executor.shutdown(wait=True)

    def _shut(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    @property
    def browser(self) -> Browser:
        """The browser; only to be touched inside `call`."""
        assert self._browser is not None, "BrowserThread.start() first"
        return self._browser

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the browser's thread; await its result without blocking Trio."""
        future = self._executor.submit(fn, *args)
        # abandon_on_cancel: a cancelled test stops waiting; Playwright's timeouts end the call.
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)


def css_string(text: str) -> str:
    """`text` as a quoted CSS string (for attribute selectors on names from specs)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\a ") + '"'


@attrs.define
class Dashboard:
    """One dashboard page; every method runs its Playwright work on the browser's thread."""

    thread: BrowserThread
    context: BrowserContext
    page: Page
    console: list[str] = attrs.Factory(list)  # "type: text" of every console message
    errors: list[str] = attrs.Factory(list)  # uncaught exceptions in the page

    @classmethod
    async def open(cls, thread: BrowserThread, url: str) -> Dashboard:
        def open_page() -> Dashboard:
            context = thread.browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
            context.set_default_timeout(UI_LIMIT)
            page = context.new_page()
            dashboard = cls(thread=thread, context=context, page=page)
            # Plain functions: Playwright tags its handlers with attributes.
            page.on("console", lambda m: dashboard.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda error: dashboard.errors.append(str(error)))
            page.goto(url)
            return dashboard

        return await thread.call(open_page)

    async def close(self) -> None:
        await self.thread.call(self.context.close)

    # --- locators (pure: building one touches nothing) ----------------------------------------

    def row(self, service: str) -> Locator:
        return self.page.locator(f"tr[data-service={css_string(service)}]")

    def cell(self, service: str, host: str | None = None) -> Locator:
        selector = "td.cell" if host is None else f"td[data-host={css_string(host)}]"
        return self.row(service).locator(selector)

    def state(self, service: str, host: str | None = None) -> Locator:
        return self.cell(service, host).locator(".badge.state")

    def chip(self, kind: str) -> Locator:
        """The problem chip of `kind` (`#problems button[data-kind=KIND]`)."""
        return self.page.locator(f"#problems button[data-kind={css_string(kind)}]")

    # --- waiting for what the page shows -------------------------------------------------------

    async def expect(self, check: Callable[[], None]) -> None:
        """Run a Playwright `expect(...)` check (it retries until UI_LIMIT) on the thread."""
        await self.thread.call(check)

    async def expect_state(self, service: str, state: str, host: str | None = None) -> None:
        locator = self.state(service, host)
        await self.expect(lambda: expect(locator).to_have_text(state, timeout=UI_LIMIT))

    async def expect_count(self, locator: Locator, count: int) -> None:
        await self.expect(lambda: expect(locator).to_have_count(count, timeout=UI_LIMIT))

    async def expect_text(self, locator: Locator, pattern: str | re.Pattern[str]) -> None:
        await self.expect(lambda: expect(locator).to_contain_text(pattern, timeout=UI_LIMIT))

    async def expect_conn(self, pattern: str | re.Pattern[str]) -> None:
        await self.expect_text(self.page.locator("#conn"), pattern)

    async def evaluate(self, script: str) -> Any:
        return await self.thread.call(self.page.evaluate, script)

    async def text(self, locator: Locator) -> str:
        return await self.thread.call(locator.inner_text)

    async def fill(self, selector: str, value: str) -> None:
        await self.thread.call(self.page.fill, selector, value)

    async def press(self, selector: str, key: str) -> None:
        await self.thread.call(self.page.press, selector, key)

    async def screenshot(self, path: Path) -> None:
        await self.thread.call(lambda: self.page.screenshot(path=str(path), full_page=True))

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]


# What the `open_dashboard` fixture (conftest.py) gives a test: `await open_dashboard(url)`.
OpenDashboard = Callable[[str], Awaitable[Dashboard]]


# --- condo as a child process with its API on a fixed port -----------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now (condo binds it with SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def serve_condo(nursery: trio.Nursery, condo: CondoUnderTest, port: int, *extra: str) -> str:
    """`condo run` on the real engine, its API on 127.0.0.1:`port`; returns the base URL once
    `/healthz` answers (the page's first request would otherwise race the bind)."""
    process = await condo.spawn(nursery, *extra, server=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(SERVE_LIMIT):
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                assert process.returncode is None, f"condo exited: {log_tail(condo)}"
                try:
                    response = await client.get(f"{url}/healthz")
                except httpx.TransportError:  # not listening yet
                    await trio.sleep(0.1)
                    continue
                assert response.status_code == 200, response.text
                return url


async def stop_condo(condo: CondoUnderTest, *, graceful: bool = False) -> None:
    """kill -9 (or SIGTERM) the child condo, if it runs, and wait for it to be gone; its
    workloads keep running either way."""
    process = condo.process
    if process is None or process.returncode is not None:
        return
    if graceful:
        process.send_signal(signal.SIGTERM)
    else:
        condo.kill9()
    with trio.fail_after(15):
        await process.wait()


def log_tail(condo: CondoUnderTest, lines: int = 30) -> str:
    log = condo.state_path.parent / f"condo-{condo.host}.log"
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def expose_consul(prefix: str) -> tuple[str, ...]:
    """`serve_condo`'s arguments for a condo that publishes to, and shows, the fleet on `prefix`."""
    return ("--expose", "consul", "--consul-prefix", prefix)


def spec(image: str, *extra: str) -> str:
    """A service spec on a local test image; its containers carry `condo-test=1`."""
    body = " ".join([f'{{:spec {{:Image "{image}" :Labels {{"condo-test" "1"}}}}', *extra])
    return body + "}"

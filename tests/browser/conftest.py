"""Fixtures for the dashboard's browser tests: one Chromium per session, a fresh browser context
per page, a condo (files + unique host) per test whose containers are removed at teardown.

Chromium is Debian's (/usr/bin/chromium, installed by `scripts/test-env --with-browser`); when it
is missing the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from condo.docker import DockerClient, open_docker
from tests.browser.dashboard import CHROMIUM, BrowserThread, Dashboard, OpenDashboard
from tests.integration.harness import CondoUnderTest, condo_files


@pytest.fixture(scope="session")
def browser_thread() -> Iterator[BrowserThread]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/test-env --with-browser"
    thread = BrowserThread()
    thread.start()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture
async def docker() -> AsyncIterator[DockerClient]:
    async with open_docker() as client:
        yield client


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


@pytest.fixture
async def open_dashboard(
    browser_thread: BrowserThread,
) -> AsyncIterator[OpenDashboard]:
    """`await open_dashboard(url)` → a Dashboard; every page is closed after the test, and none
    may have thrown an uncaught error or broken its Content-Security-Policy."""
    pages: list[Dashboard] = []

    async def open_page(url: str) -> Dashboard:
        page = await Dashboard.open(browser_thread, url)
        pages.append(page)
        return page

    yield open_page
    with trio.move_on_after(30, shield=True):
        for page in pages:
            # The page may already be gone with its context if the test failed half-way.
            with contextlib.suppress(Exception):
                await page.close()
    for page in pages:
        assert page.errors == [], f"uncaught errors in the page: {page.errors}"
        assert page.csp_violations() == [], page.csp_violations()

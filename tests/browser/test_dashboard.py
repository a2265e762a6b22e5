"""The dashboard in a real browser (Debian's Chromium via Playwright) against a real `condo run`
child process on the real engine.

Covered: a new spec's row goes Wait → Stable live (no reload) and the timeline records it; a
broken spec shows its error with file:line while the service keeps running; the filter box; a
failing deploy shows the error, the retry countdown and the stable container that still serves;
a WaitNext candidate; kill -9 and restart of condo: "disconnected", then live again by itself;
markup in a file name, a label, an env value and an image is shown as text and runs nothing;
token mode: the page asks for the token (kept in memory only), refuses a wrong one, then works.
Several hosts (Consul): tests/browser/test_dashboard_fleet.py.

Each test is capped by `trio.fail_after(CAP)`, and each Playwright wait by UI_LIMIT.
"""

from __future__ import annotations

import re

import pytest
import trio
from playwright.sync_api import expect

from tests.browser.dashboard import (
    UI_LIMIT,
    OpenDashboard,
    free_port,
    serve_condo,
    spec,
    stop_condo,
)
from tests.integration.harness import CondoUnderTest

pytestmark = [pytest.mark.browser, pytest.mark.docker]

CAP = 120

HEALTHY = "condo-test/healthy:{}"
BUSYBOX = "condo-test/busybox:{}"


async def test_a_new_spec_goes_wait_then_stable_without_reload(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_conn("live")
        await page.expect_text(page.page.locator("#host"), condo.host)
        await page.expect_text(page.page.locator("#engine"), re.compile(r"ok · API \d"))
        await page.expect_text(page.page.locator("#version"), re.compile(r"\d+\.\d+"))
        await page.expect_text(page.page.locator("#empty"), "No services yet")
        # A reload would lose this: the page must change by itself.
        await page.evaluate("() => { window.__sameDocument = true; }")

        condo.write("web", spec(HEALTHY.format(1)))
        await page.expect_state("web", "Wait")
        await page.expect_state("web", "Stable")
        cell = page.cell("web")
        await page.expect_text(cell, HEALTHY.format(1))
        await page.expect_text(cell, re.compile(r"web_\w+ up \d+s"))
        timeline = page.row("web").locator(".timeline")
        await page.expect_text(timeline, re.compile(r"Init → Wait deploying condo-test/healthy:1"))
        await page.expect_text(timeline, re.compile(r"Wait → Stable web_\w+ is up and stable"))
        assert await page.evaluate("() => window.__sameDocument") is True
        summary = await page.text(page.page.locator("#summary"))
        assert summary.split() == ["1", "service", "1", "Stable"]


async def test_a_broken_spec_shows_its_error_with_file_and_line(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        condo.write("web", spec(HEALTHY.format(1)))
        condo.write("worker", spec(BUSYBOX.format(1)))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_state("web", "Stable")
        await page.expect_state("worker", "Stable")

        condo.write(
            "web",
            '{:spec {:Image "condo-test/healthy:1"\n        :Labels {"condo.mine" "x"}}}\n',
        )
        error = page.cell("web").locator(".spec-error")
        await page.expect_text(error, "web.edn:2")
        await page.expect_text(error, "uses the reserved prefix 'condo.'")
        # The full path is one hover away; the service keeps running on its last good spec.
        title = await page.thread.call(error.locator("code.where").get_attribute, "title")
        assert title == str(condo.specs / "web.edn")
        await page.expect_state("web", "Stable")
        await page.expect_text(page.row("web").locator(".timeline"), "spec error web.edn:2")

        # The filter box: by name, by image, by state; nothing matching says so.
        rows = page.page.locator("tr[data-service]")
        await page.fill("#filter", "work")
        await page.expect_count(rows, 1)
        await page.expect_text(rows, "worker")
        await page.fill("#filter", "healthy:1")
        await page.expect_text(rows, "web")
        await page.fill("#filter", "no-such-thing")
        await page.expect_count(rows, 0)
        await page.expect_text(page.page.locator("#empty"), "No service matches the filter")
        await page.fill("#filter", "")
        await page.expect_count(rows, 2)

        condo.write("web", spec(HEALTHY.format(1)))
        await page.expect_count(error, 0)
        await page.expect_text(page.row("web").locator(".timeline"), "spec fixed")


async def test_a_failing_deploy_shows_the_error_and_the_retry_countdown(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        condo.write("api", spec(HEALTHY.format(1), ":deploy [:After 8]"))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)
        await page.expect_state("api", "Stable")
        first = await page.text(page.cell("api").locator("code.cname"))

        # A healthy successor with [:After 8]: WaitNext shows the candidate next to the old one.
        condo.write("api", spec(HEALTHY.format(2), ":deploy [:After 8]"))
        await page.expect_state("api", "WaitNext")
        candidate = page.cell("api").locator(".line.next")
        await page.expect_text(candidate, re.compile(r"(candidate|replacing with) api_\w+"))
        await page.expect_text(candidate, HEALTHY.format(2))
        await page.expect_text(page.cell("api").locator(".line.container"), first)
        await page.expect_state("api", "Stable")

        # An unhealthy successor: TryAgainNext, the error, a countdown; the stable one serves.
        condo.write("api", spec("condo-test/unhealthy:1", ":deploy [:After 0] :health-timeout 2"))
        await page.expect_state("api", "TryAgainNext")
        cell = page.cell("api")
        await page.expect_text(cell.locator(".line.error"), "unhealthy")
        await page.expect_text(
            cell.locator(".line.retry"), re.compile(r"^(retry in \d+s|retrying)$")
        )
        await page.expect_text(cell.locator(".line.image"), HEALTHY.format(2))
        await page.expect_text(cell.locator(".cell-head"), "attempt")
        await page.expect_text(
            page.row("api").locator(".timeline"), re.compile(r"→ TryAgainNext .*unhealthy")
        )
        # The countdown runs in the page, between feed messages.
        countdown = cell.locator(".countdown")
        before = await page.text(countdown)
        await page.expect(lambda: expect(countdown).not_to_have_text(before, timeout=UI_LIMIT))
        assert await page.evaluate("() => document.querySelector('tr.row-bad') !== null")


async def test_a_restarted_condo_is_shown_disconnected_then_live_again(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    port = free_port()
    with trio.fail_after(CAP):
        condo.write("web", spec(HEALTHY.format(1)))
        condo.write("worker", spec(BUSYBOX.format(1)))
        url = await serve_condo(nursery, condo, port)
        page = await open_dashboard(url)
        await page.expect_state("web", "Stable")
        await page.expect_state("worker", "Stable")
        await page.evaluate("() => { window.__sameDocument = true; }")

        await stop_condo(condo)
        await page.expect_conn("disconnected")
        assert await page.evaluate("() => document.body.dataset.conn") == "disconnected"
        # The last picture stays on screen (dimmed) while condo is away.
        rows = page.page.locator("tr[data-service]")
        await page.expect_count(rows, 2)
        await page.expect_text(page.page.locator("#engine"), "condo does not answer")

        condo.write("cache", spec(BUSYBOX.format(2)))  # appears while the page is away
        await serve_condo(nursery, condo, port)
        await page.expect_conn(re.compile(r"^live$"))
        await page.expect_state("web", "Stable")
        await page.expect_state("worker", "Stable")
        await page.expect_state("cache", "Stable")
        await page.expect_count(rows, 3)
        await page.expect_text(page.page.locator("#engine"), "ok")
        assert await page.evaluate("() => window.__sameDocument") is True


PAYLOAD = "<img src=x onerror=window.__pwned=1>"


async def test_markup_from_specs_labels_env_and_errors_is_shown_as_text(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    name_payload = PAYLOAD  # not a valid service name: a spec error entry under that name
    label_payload = "condo.<img src=x onerror=window.__pwned=2>"
    env_payload = "=<img src=x onerror=window.__pwned=3>"  # the engine refuses it, quoting it
    image_payload = "<img/src=x/onerror=window.__pwned=4>"  # no whitespace: a valid spec
    with trio.fail_after(CAP):
        condo.write(name_payload, spec(BUSYBOX.format(1)))
        busybox = BUSYBOX.format(1)
        condo.write("labels", f'{{:spec {{:Image "{busybox}" :Labels {{"{label_payload}" "v"}}}}}}')
        condo.write("env", f'{{:spec {{:Image "{busybox}" :Env ["{env_payload}"]}}}}')
        condo.write("image", spec(image_payload))
        url = await serve_condo(nursery, condo, free_port())
        page = await open_dashboard(url)

        await page.expect_text(page.row(name_payload).locator("th.name"), name_payload)
        await page.expect_text(page.cell(name_payload).locator(".spec-error"), name_payload)
        await page.expect_text(page.cell("labels").locator(".spec-error"), label_payload)
        await page.expect_text(page.cell("env").locator(".line.error"), env_payload)
        await page.expect_text(page.cell("image").locator(".line.image"), image_payload)
        image_error = page.cell("image").locator(".line.error")
        await page.expect_text(image_error, f"pull {image_payload}: 400: invalid reference format")
        # The timeline quotes errors too, as text.
        await page.expect_text(page.row("env").locator(".timeline"), env_payload)

        found = await page.evaluate(
            """() => ({
                pwned: [window.__pwned],
                images: document.querySelectorAll("img").length,
                handlers: document.querySelectorAll("[onerror], [onload]").length,
            })"""
        )
        assert found == {"pwned": [None], "images": 0, "handlers": 0}


TOKEN = "s3cret-dashboard-token"


async def test_token_mode_asks_for_the_token_and_keeps_it_in_memory(
    condo: CondoUnderTest, nursery: trio.Nursery, open_dashboard: OpenDashboard
) -> None:
    with trio.fail_after(CAP):
        condo.write("web", spec(HEALTHY.format(1)))
        url = await serve_condo(nursery, condo, free_port(), "--api-token", TOKEN)
        page = await open_dashboard(url)
        # The page came with a 401 (it is the locked variant, script and styles inlined).
        status = await page.evaluate(
            "() => performance.getEntriesByType('navigation')[0].responseStatus"
        )
        assert status == 401
        form = page.page.locator("#token-form")
        rows = page.page.locator("tr[data-service]")
        await page.expect(lambda: expect(form).to_be_visible(timeout=UI_LIMIT))
        await page.expect_conn("token needed")
        assert await page.thread.call(rows.count) == 0

        await page.fill("#token-input", "not-the-token")
        await page.press("#token-input", "Enter")
        await page.expect_text(page.page.locator("#token-error"), "refused")
        await page.expect(lambda: expect(form).to_be_visible(timeout=UI_LIMIT))

        await page.fill("#token-input", TOKEN)
        await page.press("#token-input", "Enter")
        await page.expect_conn(re.compile(r"^live$"))
        await page.expect(lambda: expect(form).to_be_hidden(timeout=UI_LIMIT))
        await page.expect_state("web", "Stable")
        await page.expect_text(page.page.locator("#engine"), "ok")

        kept = await page.evaluate(
            """() => ({
                local: localStorage.length,
                session: sessionStorage.length,
                cookie: document.cookie,
                url: location.href,
                field: document.getElementById("token-input").value,
            })"""
        )
        assert kept == {"local": 0, "session": 0, "cookie": "", "url": url + "/", "field": ""}
        assert await page.thread.call(page.context.cookies) == []

"""The server side of the dashboard, in process (quart-trio's test client; no browser, no engine):
what the page relies on beyond the API tested in tests/test_web.py.

Covered: the locked page (401 to a browser when a token is needed: the page itself, its script
and styles inlined and allowed by hash, nothing else; API clients still get the JSON 401), the
feed's `global` messages (after the first snapshot, on each new picture, latest value), the
version in /healthz, and the page's code never turning data into HTML.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from quart import typing as quart_typing

import condo
from condo.fsm import Box, Phase, ServiceState
from condo.metrics import Metrics
from condo.spec import ServiceSpec
from condo.store import Store
from condo.web import LocalSource, WebContext, build_app
from condo.web.assets import STATIC_ROOT, StaticFiles, locked_page
from condo.web.health import EngineHealth
from condo.web.lifecycle import Closing
from tests.fakes import FakeHosts

HOST = "h1"
TOKEN = "page-token"
CAP = 30
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


async def ping() -> str:
    return "1.41"


@contextlib.asynccontextmanager
async def served(
    *, token: str | None = None, hosts: FakeHosts | None = None
) -> AsyncIterator[tuple[Store, quart_typing.TestClientProtocol]]:
    store = Store(HOST)
    context = WebContext(
        store=store,
        local=LocalSource(store),
        global_source=hosts,
        health=EngineHealth(ping),
        state_file_error=lambda: None,
        metrics=Metrics(),
        closing=Closing(),
        static=StaticFiles.scan(),
        api_token=token,
    )
    app = build_app(context)
    async with app.test_app() as test_app:
        yield store, test_app.test_client()


def stable(image: str) -> ServiceState:
    desired = ServiceSpec(container={"Image": image})
    current = Box(id="c1", name="web_c1", spec=desired, created_at=1.0, healthcheck=True)
    return ServiceState(phase=Phase.Stable, desired=desired, current=current)


def view_of(state: ServiceState) -> Mapping[str, Any]:
    store = Store("x")
    store.set_state("web", state)
    view: Mapping[str, Any] = store.view()["services"]["web"]
    return view


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# --- the locked page ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ui"])
async def test_a_browser_without_the_token_gets_the_page_with_a_401(path: str) -> None:
    async with served(token=TOKEN) as (_, client):
        with trio.fail_after(CAP):
            response = await client.get(path, headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "text/html; charset=utf-8"
    page = await response.get_data(as_text=True)
    assert "condo dashboard" in page
    assert 'id="token-form"' in page
    assert TOKEN not in page
    # No file is loaded from /ui/ (it would be refused without the token): all of it is inline.
    assert 'src="/ui/' not in page
    assert 'href="/ui/dashboard.css"' not in page
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    assert scripts == [(STATIC_ROOT / "app.js").read_text()]
    assert styles == [(STATIC_ROOT / "dashboard.css").read_text()]
    # Exactly those are allowed: by their hashes, no 'unsafe-inline', nothing from elsewhere.
    directives = [
        d.strip().split(" ", 1) for d in response.headers["Content-Security-Policy"].split(";")
    ]
    policy = dict(directives)
    assert policy["script-src"] == csp_hash(scripts[0])
    assert policy["style-src"] == csp_hash(styles[0])
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["form-action"] == "'none'"


@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/", None),
        ("/", "*/*"),
        ("/", "application/json"),
        ("/ui/app.js", BROWSER_ACCEPT),
        ("/ui/dashboard.css", BROWSER_ACCEPT),
        ("/v1/state", BROWSER_ACCEPT),
        ("/openapi.json", BROWSER_ACCEPT),
    ],
)
async def test_anything_else_without_the_token_is_the_json_401(
    path: str, accept: str | None
) -> None:
    headers = {} if accept is None else {"Accept": accept}
    async with served(token=TOKEN) as (_, client):
        with trio.fail_after(CAP):
            response = await client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.content_type == "application/json"
    assert "error" in json.loads(await response.get_data())


async def test_with_the_token_or_without_one_configured_the_page_is_the_plain_200() -> None:
    async with served(token=TOKEN) as (_, client):
        with trio.fail_after(CAP):
            locked = await client.get(
                "/", headers={"Accept": BROWSER_ACCEPT, "Authorization": f"Bearer {TOKEN}"}
            )
    async with served() as (_, client):
        with trio.fail_after(CAP):
            open_page = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
            style = await client.get("/ui/dashboard.css")
    for response in (locked, open_page):
        assert response.status_code == 200
        page = await response.get_data(as_text=True)
        assert '<script src="/ui/app.js" defer></script>' in page
        assert '<link rel="stylesheet" href="/ui/dashboard.css">' in page
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert style.status_code == 200
    assert style.content_type == "text/css; charset=utf-8"


def test_a_file_that_would_end_its_inline_element_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<head><script src="/ui/app.js" defer></script></head>')
    (tmp_path / "app.js").write_text('const s = "</SCRIPT>";')
    with pytest.raises(ValueError, match="cannot be inlined"):
        locked_page(StaticFiles.scan(tmp_path))
    (tmp_path / "app.js").unlink()
    with pytest.raises(ValueError, match="not a static file"):
        locked_page(StaticFiles.scan(tmp_path))
    (tmp_path / "index.html").unlink()
    assert locked_page(StaticFiles.scan(tmp_path)) is None


# --- /healthz ----------------------------------------------------------------------------------


async def test_healthz_says_which_condo_answers() -> None:
    async with served(token=TOKEN) as (_, client):
        with trio.fail_after(CAP):
            response = await client.get("/healthz")
    data = json.loads(await response.get_data())
    assert (data["host"], data["version"]) == (HOST, condo.__version__)


# --- the feed's global messages ----------------------------------------------------------------


async def test_the_feed_sends_every_host_after_the_first_snapshot() -> None:
    hosts = FakeHosts({HOST: {}, "h2": {"web": view_of(stable("img:1"))}})
    async with served(hosts=hosts) as (store, client):
        with trio.fail_after(CAP):
            async with client.websocket("/v1/feed", query_string={"global": "delta"}) as ws:
                first = json.loads(await ws.receive())
                second = json.loads(await ws.receive())
                hosts.set({HOST: {}, "h2": {"web": view_of(stable("img:2"))}})
                third = json.loads(await ws.receive())
                store.set_state("db", stable("pg:1"))
                fourth = json.loads(await ws.receive())
    assert first == {"type": "snapshot", "version": 0, "state": {"host": HOST, "services": {}}}
    assert second == {
        "type": "global",
        "token": 1,
        "stale": False,
        "read_at": None,
        "hosts": {
            HOST: {"services": {}, "live": True, "last_seen": None},
            "h2": {"services": {"web": view_of(stable("img:1"))}, "live": True, "last_seen": None},
        },
    }
    # Then (asked for with ?global=delta) only what changed: h2, not this host (the same body).
    assert third["type"] == "global_delta"
    assert third["token"] == 2
    assert list(third["hosts"]) == ["h2"] and third["gone"] == []
    assert third["hosts"]["h2"]["services"]["web"]["current"]["image"] == "img:2"
    assert fourth["type"] == "snapshot"
    assert fourth["state"]["services"]["db"]["state"] == "Stable"


async def test_without_consul_the_feed_sends_snapshots_only() -> None:
    async with served() as (store, client):
        with trio.fail_after(CAP):
            async with client.websocket("/v1/feed") as ws:
                first = json.loads(await ws.receive())
                store.set_state("web", stable("img:1"))
                second = json.loads(await ws.receive())
    assert [first["type"], second["type"]] == ["snapshot", "snapshot"]


async def test_a_slow_reader_gets_the_latest_picture_not_a_backlog() -> None:
    hosts = FakeHosts({"h2": {}})
    async with served(hosts=hosts) as (_, client):
        with trio.fail_after(CAP):
            async with client.websocket("/v1/feed") as ws:
                assert json.loads(await ws.receive())["type"] == "snapshot"
                assert json.loads(await ws.receive())["token"] == 1
                # Five pictures without a checkpoint between them: the sender sees only the last.
                for n in range(5):
                    hosts.set({"h2": {"web": view_of(stable(f"img:{n}"))}})
                tokens: list[int] = []
                while not tokens or tokens[-1] != 6:
                    tokens.append(json.loads(await ws.receive())["token"])
    assert tokens == [6]


# --- the page's code ---------------------------------------------------------------------------


def test_the_page_never_turns_data_into_html() -> None:
    code = (STATIC_ROOT / "app.js").read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "DOMParser",
        "createContextualFragment",
        "localStorage",
        "sessionStorage",
        "document.cookie",
    ):
        assert sink not in code, sink
    assert "createElement" in code
    assert "createTextNode" in code
    page = (STATIC_ROOT / "index.html").read_text()
    assert "http://" not in page
    assert "https://" not in page  # no CDN, no web font: works offline
    assert "@import" not in (STATIC_ROOT / "dashboard.css").read_text()
    assert "url(" not in (STATIC_ROOT / "dashboard.css").read_text()

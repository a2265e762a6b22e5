"""The HTTP API in process: quart-trio's test client against a Store filled by hand (no engine).

Covers every route and error code, the Host and Origin checks, the token (HTTP and websocket),
the caps on waits and feeds, the feed (first message,
updates, latest-value, a slow consumer next to a fast one), wait_for (at once, on a change, on
timeout, bad parameters, several hosts), shutdown (every waiter answered at once), /healthz
(caching, failures, degraded), /metrics, the OpenAPI document against the url_map, and the
static page (including path traversal attempts). Time is Trio's MockClock: exact virtual times.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from quart import typing as quart_typing
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError
from quart_trio import QuartTrio

from condo.errors import DockerUnavailable, SpecError
from condo.fsm import Box, Failure, Phase, Reverted, ServiceState
from condo.metrics import Metrics, ServiceMetrics
from condo.spec import ServiceSpec
from condo.store import Store
from condo.waiting import HostRecord, evaluate, hosts_document, read_hosts_document
from condo.web import LocalSource, WebContext, build_app
from condo.web.assets import StaticFiles
from condo.web.health import EngineHealth
from condo.web.hosts import AllowedHosts
from condo.web.lifecycle import Closing
from condo.web.openapi import NOT_BLANK, openapi_document
from condo.web.serve import closing_connections
from tests.fakes import FakeHosts

HOST = "h1"
TOKEN = "s3cret-token"
CAP = 30  # seconds (virtual, mostly) per test

# --- values ---------------------------------------------------------------------------------


def spec(image: str) -> ServiceSpec:
    return ServiceSpec(container={"Image": image})


def box(image: str, cid: str = "c1", *, stable_at: float | None = None) -> Box:
    return Box(
        id=cid,
        name=f"web_{cid}",
        spec=spec(image),
        created_at=1000.0,
        healthcheck=True,
        stable_at=stable_at,
    )


def stable(image: str, cid: str = "c1") -> ServiceState:
    return ServiceState(
        phase=Phase.Stable, desired=spec(image), current=box(image, cid, stable_at=1001.0)
    )


def waiting(image: str, cid: str = "c2") -> ServiceState:
    return ServiceState(phase=Phase.Wait, desired=spec(image), current=box(image, cid))


def service_view(services: Mapping[str, ServiceState], host_store: Store | None = None) -> Any:
    store = host_store or Store("x")
    for name, state in services.items():
        store.set_state(name, state)
    return store.view()["services"]


# --- fakes ----------------------------------------------------------------------------------


class FakeEngine:
    """The engine's ping, scripted: answers, fails, or hangs; counts the pings."""

    def __init__(self) -> None:
        self.pings = 0
        self.failure: Exception | None = None
        self.hang = False

    async def ping(self) -> str:
        self.pings += 1
        await trio.sleep(0.01)
        if self.hang:
            await trio.sleep_forever()
        if self.failure is not None:
            raise self.failure
        return "1.41"


@attrs.define
class Web:
    """One app under test, with the handles a test pokes."""

    store: Store
    context: WebContext
    app: QuartTrio
    client: quart_typing.TestClientProtocol
    engine: FakeEngine
    file_error: list[BaseException]


MakeWeb = Callable[..., contextlib.AbstractAsyncContextManager[Web]]


@pytest.fixture
def make_web() -> MakeWeb:
    """`async with make_web(token=..., global_source=...) as web:` (tests own the clock)."""

    @contextlib.asynccontextmanager
    async def make(
        *,
        token: str | None = None,
        global_source: FakeHosts | None = None,
        allowed: tuple[str, ...] = (),
        max_waits: int = 10_000,
        max_feeds: int = 100,
    ) -> AsyncIterator[Web]:
        store = Store(HOST)
        engine = FakeEngine()
        file_error: list[BaseException] = []
        metrics = Metrics()
        service_metrics = ServiceMetrics(metrics, store)
        service_metrics.sync()
        store.subscribe(service_metrics.on_change)
        context = WebContext(
            store=store,
            local=LocalSource(store),
            global_source=global_source,
            host_directory=global_source,
            health=EngineHealth(engine.ping),
            state_file_error=lambda: file_error[-1] if file_error else None,
            metrics=metrics,
            closing=Closing(),
            static=StaticFiles.scan(),
            api_token=token,
            allowed_hosts=AllowedHosts.of(("0.0.0.0",), allowed),
            max_waits=max_waits,
            max_feeds=max_feeds,
        )
        app = build_app(context)
        async with app.test_app() as test_app:
            yield Web(store, context, app, test_app.test_client(), engine, file_error)

    return make


@pytest.fixture
async def web(make_web: MakeWeb) -> AsyncIterator[Web]:
    async with make_web() as made:
        yield made


@pytest.fixture
async def locked(make_web: MakeWeb) -> AsyncIterator[Web]:
    async with make_web(token=TOKEN) as made:
        yield made


async def body(response: Any) -> Any:
    return json.loads(await response.get_data())


def assert_json_error(response: Any, status: int) -> None:
    assert response.status_code == status
    assert response.content_type == "application/json"


async def json_error(
    web: Web,
    path: str,
    status: int,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> Any:
    """Ask `path` (within the test's cap); the answer, checked to be a JSON error with `status`."""
    with trio.fail_after(CAP):
        response = await getattr(web.client, method.lower())(path, headers=dict(headers or {}))
    assert_json_error(response, status)
    return response


# --- /v1/state and errors -------------------------------------------------------------------


async def test_state_is_the_store_view(autojump_clock: trio.testing.MockClock, web: Web) -> None:
    web.store.set_state("web", stable("img:1"))
    web.store.set_state("db", waiting("pg:2"))
    web.store.set_spec_error("broken", SpecError("/s/broken.edn", "no :spec", line=3), "/s/b")
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/state")
    assert response.status_code == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    data = await body(response)
    assert data == web.store.view()
    assert data["host"] == HOST
    assert set(data["services"]) == {"web", "db", "broken"}
    service = data["services"]["web"]
    for key in ("state", "current", "next", "retry_at", "error", "spec_error"):
        assert key in service
    assert service["state"] == "Stable"
    assert set(service["current"]) >= {"id", "name", "image", "created_at", "stable_at"}
    assert data["services"]["broken"]["spec_error"] == {
        "file": "/s/broken.edn",
        "line": 3,
        "message": "no :spec",
    }


@pytest.mark.parametrize(
    "path", ["/nope", "/v1/state/extra", "/v1//state", "/V1/STATE", "/ui/x/", "/%00"]
)
async def test_unknown_routes_are_json_404(
    autojump_clock: trio.testing.MockClock, web: Web, path: str
) -> None:
    response = await json_error(web, path, 404)
    assert "error" in await body(response)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_methods_are_json_405(
    autojump_clock: trio.testing.MockClock, web: Web, method: str
) -> None:
    response = await json_error(web, "/v1/state", 405, method=method)
    assert "GET" in response.headers["Allow"]
    assert (await body(response))["allowed"] == ["GET", "HEAD", "OPTIONS"]


async def test_the_feed_over_plain_http_is_a_json_400(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    response = await json_error(web, "/v1/feed", 400)
    assert "websocket" in (await body(response))["error"]


async def test_huge_bodies_are_refused_with_413(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        big = 65 * 1024
        response = await web.client.get(
            "/v1/state", data=b"x" * big, headers={"Content-Length": str(big)}
        )
        small = await web.client.get(
            "/v1/state", data=b"x" * 100, headers={"Content-Length": "100"}
        )
    assert_json_error(response, 413)
    assert small.status_code == 200


async def test_a_bug_in_a_route_is_a_json_500(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    # Not a DockerError: nothing expects it, so it reaches the app's last-resort handler.
    web.engine.failure = RuntimeError("a bug")
    response = await json_error(web, "/healthz", 500)
    assert "internal error" in (await body(response))["error"]
    assert "a bug" not in await response.get_data(as_text=True)


# --- token -------------------------------------------------------------------------------------

PROTECTED = [
    "/v1/state",
    "/v1/global_state",
    "/v1/wait_for?name=a&image=b&timeout=0",
    "/metrics",
    "/openapi.json",
    "/",
    "/ui",
    "/ui/app.js",
    "/no-such-route",
]


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", TOKEN],
)
async def test_every_route_but_healthz_needs_the_token(
    autojump_clock: trio.testing.MockClock, locked: Web, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await json_error(locked, path, 401, headers=headers)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in await response.get_data(as_text=True)


@pytest.mark.parametrize("path", PROTECTED[:-1])
async def test_the_right_token_opens_every_route(
    autojump_clock: trio.testing.MockClock, locked: Web, path: str
) -> None:
    with trio.fail_after(CAP):
        response = await locked.client.get(path, headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code != 401


async def test_healthz_needs_no_token(autojump_clock: trio.testing.MockClock, locked: Web) -> None:
    with trio.fail_after(CAP):
        response = await locked.client.get("/healthz")
    assert response.status_code == 200


async def test_without_a_token_configured_nothing_is_checked(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/state", headers={"Authorization": "Bearer any"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("query", "headers"),
    [(None, {}), ({"token": "wrong"}, {}), (None, {"Authorization": "Bearer wrong"})],
)
async def test_the_websocket_refuses_a_missing_or_wrong_token(
    autojump_clock: trio.testing.MockClock,
    locked: Web,
    query: dict[str, str] | None,
    headers: dict[str, str],
) -> None:
    errors: list[WebsocketResponseError] = []
    with trio.fail_after(CAP):
        try:
            async with locked.client.websocket(
                "/v1/feed", query_string=query, headers=headers
            ) as ws:
                await ws.receive()
        except* WebsocketResponseError as group:
            errors.extend(e for e in group.exceptions if isinstance(e, WebsocketResponseError))
    (error,) = errors
    assert error.response.status_code == 401
    assert "error" in json.loads(await error.response.get_data())


@pytest.mark.parametrize(
    ("query", "headers"),
    [({"token": TOKEN}, {}), (None, {"Authorization": f"Bearer {TOKEN}"})],
)
async def test_the_websocket_takes_the_token_as_query_or_header(
    autojump_clock: trio.testing.MockClock,
    locked: Web,
    query: dict[str, str] | None,
    headers: dict[str, str],
) -> None:
    with trio.fail_after(CAP):
        async with locked.client.websocket("/v1/feed", query_string=query, headers=headers) as ws:
            first = json.loads(await ws.receive())
    assert first["type"] == "snapshot"


async def test_an_empty_token_opens_nothing(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    # The CLI refuses --api-token "" (test_cli.py); the app holds the line on its own too.
    errors: list[WebsocketResponseError] = []
    with trio.fail_after(CAP):
        async with make_web(token="") as web:
            try:
                async with web.client.websocket("/v1/feed", query_string={"token": ""}) as ws:
                    await ws.receive()
            except* WebsocketResponseError as group:
                errors.extend(e for e in group.exceptions if isinstance(e, WebsocketResponseError))
            refused = await web.client.get("/v1/state", headers={"Authorization": "Bearer "})
    (error,) = errors
    assert error.response.status_code == 401
    assert_json_error(refused, 401)


# --- Host and Origin ---------------------------------------------------------------------------


async def websocket_refusal(web: Web, headers: dict[str, str]) -> Any:
    """The HTTP answer that refused a websocket handshake with `headers`."""
    errors: list[WebsocketResponseError] = []
    try:
        async with web.client.websocket("/v1/feed", headers=headers) as ws:
            await ws.receive()
    except* WebsocketResponseError as group:
        errors.extend(e for e in group.exceptions if isinstance(e, WebsocketResponseError))
    (error,) = errors
    return error.response


@pytest.mark.parametrize("path", [*PROTECTED, "/healthz"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:4280", "127.0.0.1.evil.example"])
async def test_every_route_refuses_a_foreign_host(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, path: str, host: str
) -> None:
    with trio.fail_after(CAP):
        async with make_web(token=TOKEN) as web:
            # Even with the right token: a rebound name is a browser tricked into asking.
            headers = {"Host": host, "Authorization": f"Bearer {TOKEN}"}
            response = await web.client.get(path, headers=headers)
    assert_json_error(response, 403)
    message = (await body(response))["error"]
    assert repr(host) in message
    assert "--allowed-host" in message


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:4280",
        "127.0.0.1:4280",
        "[::1]:80",
        "[::1]",
        "condo.internal:8080",
        "[fd00::5]:4280",
    ],
)
async def test_loopback_and_allowed_names_are_answered_on_any_port(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, host: str
) -> None:
    with trio.fail_after(CAP):
        async with make_web(allowed=("condo.internal", "fd00::5")) as web:
            response = await web.client.get("/v1/state", headers={"Host": host})
            async with web.client.websocket("/v1/feed", headers={"Host": host}) as ws:
                first = json.loads(await ws.receive())
    assert response.status_code == 200
    assert first["type"] == "snapshot"


async def test_the_websocket_refuses_a_foreign_host(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        response = await websocket_refusal(web, {"Host": "rebound.example:4280"})
    assert_json_error(response, 403)


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://evil.example:4280",
        "http://localhost:3000",  # another local server is another site
        "https://localhost:4281",
        "null",
        "file://",
        "ws://localhost:4280/x",
    ],
)
async def test_the_websocket_refuses_a_foreign_origin(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, origin: str
) -> None:
    with trio.fail_after(CAP):
        async with make_web(token=TOKEN) as web:
            # Even with the token: a page elsewhere must not ride on a token it was given.
            headers = {"Host": "localhost:4280", "Origin": origin}
            refused = await websocket_refusal(web, headers | {"Authorization": f"Bearer {TOKEN}"})
    assert_json_error(refused, 403)
    assert "Origin" in (await body(refused))["error"]


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("localhost:4280", "http://localhost:4280"),  # the dashboard, served by condo itself
        ("127.0.0.1:4280", "http://127.0.0.1:4280"),
        ("[::1]:4280", "http://[::1]:4280"),
        ("localhost", "http://localhost"),
        ("localhost", "http://localhost:80"),
        ("condo.internal", "https://Condo.Internal"),  # behind a TLS proxy
        ("localhost:4280", None),  # the CLI and scripts send none
    ],
)
async def test_the_websocket_accepts_its_own_origin(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, host: str, origin: str | None
) -> None:
    headers = {"Host": host} if origin is None else {"Host": host, "Origin": origin}
    with trio.fail_after(CAP):
        async with (
            make_web(allowed=("condo.internal",)) as web,
            web.client.websocket("/v1/feed", headers=headers) as ws,
        ):
            first = json.loads(await ws.receive())
    assert first["type"] == "snapshot"


# --- caps on waits and feeds -------------------------------------------------------------------


async def test_waits_beyond_the_cap_get_503_at_once(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    statuses: list[int] = []

    async def long_poll(web: Web) -> None:
        response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=600")
        statuses.append(response.status_code)

    with trio.fail_after(CAP):
        async with make_web(max_waits=3) as web, trio.open_nursery() as nursery:
            web.store.set_state("web", stable("img:1"))
            for _ in range(3):
                nursery.start_soon(long_poll, web)
            await trio.sleep(1)
            asked_at = trio.current_time()
            refused = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=600")
            refused_at = trio.current_time()
            assert web.context.metrics.value("condo_web_open_waits") == 3
            web.store.set_state("web", stable("img:2", "c2"))
            await trio.sleep(1)
            # Their slots are free again.
            again = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=600")
    assert refused_at == asked_at
    assert_json_error(refused, 503)
    assert await body(refused) == {
        "error": "too many open waits (at most 3; see --max-waits)",
        "status": "unavailable",
    }
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"
    assert statuses == [200, 200, 200]
    assert again.status_code == 200


async def test_feeds_beyond_the_cap_get_503_at_once(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    with trio.fail_after(CAP):
        async with make_web(max_feeds=2) as web:
            async with (
                web.client.websocket("/v1/feed") as one,
                web.client.websocket("/v1/feed") as two,
            ):
                await one.receive()
                await two.receive()
                asked_at = trio.current_time()
                refused = await websocket_refusal(web, {})
                refused_at = trio.current_time()
            # Both left: their slots are free again.
            await trio.sleep(1)
            async with web.client.websocket("/v1/feed") as three:
                first = json.loads(await three.receive())
    assert refused_at == asked_at
    assert_json_error(refused, 503)
    assert (await body(refused))["error"] == "too many open feeds (at most 2; see --max-feeds)"
    assert first["type"] == "snapshot"


# --- feed --------------------------------------------------------------------------------------


async def test_feed_sends_the_snapshot_then_every_change(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", waiting("img:1"))
    with trio.fail_after(CAP):
        async with web.client.websocket("/v1/feed") as ws:
            first = json.loads(await ws.receive())
            assert first == {"type": "snapshot", "version": 1, "state": web.store.view()}
            web.store.set_state("web", stable("img:1"))
            second = json.loads(await ws.receive())
            assert second["version"] == 2
            assert second["state"]["services"]["web"]["state"] == "Stable"
            web.store.drop("web")
            third = json.loads(await ws.receive())
            assert third == {"type": "snapshot", "version": 3, "state": web.store.view()}
            assert third["state"]["services"] == {}


async def test_feed_ignores_what_the_client_sends(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        async with web.client.websocket("/v1/feed") as ws:
            await ws.receive()
            for _ in range(50):  # more than the server's inbound queue holds
                await ws.send("hello")
            web.store.set_state("web", waiting("img:1"))
            update = json.loads(await ws.receive())
    assert update["version"] == 1


async def test_a_slow_feed_consumer_blocks_neither_condo_nor_a_fast_one(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    changes = 300
    with trio.fail_after(CAP):
        async with (
            web.client.websocket("/v1/feed") as slow,
            web.client.websocket("/v1/feed") as fast,
        ):
            assert json.loads(await slow.receive())["version"] == 0
            assert json.loads(await fast.receive())["version"] == 0
            fast_versions: list[int] = []
            for n in range(1, changes + 1):
                # The store's writers never wait for readers: set_state is synchronous.
                web.store.set_state("web", waiting(f"img:{n}"))
                # The fast one reads every version as it comes (the slow one reads nothing).
                message = json.loads(await fast.receive())
                fast_versions.append(message["version"])
            assert fast_versions == list(range(1, changes + 1))
            # Now the slow one catches up: a few buffered messages, then the latest state,
            # never a backlog of every version.
            slow_versions: list[int] = []
            while not slow_versions or slow_versions[-1] != changes:
                slow_versions.append(json.loads(await slow.receive())["version"])
            assert len(slow_versions) < 30
            assert slow_versions == sorted(slow_versions)


async def test_feed_skips_versions_it_was_too_slow_for(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        async with web.client.websocket("/v1/feed") as ws:
            await ws.receive()
            for n in range(1, 101):
                web.store.set_state("web", waiting(f"img:{n}"))  # no checkpoint in between
            latest = json.loads(await ws.receive())
    assert latest["version"] == 100
    assert latest["state"]["services"]["web"]["image"] == "img:100"


# --- wait_for ----------------------------------------------------------------------------------


async def test_wait_for_answers_at_once_when_done(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", stable("img:1"))
    start = trio.current_time()
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:1&timeout=0")
    assert response.status_code == 200
    assert await body(response) == {"status": "ok", "hosts": [HOST]}
    assert trio.current_time() == start


async def test_wait_for_answers_right_after_the_change(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", waiting("img:2"))
    answered_at: list[float] = []
    responses: list[Any] = []

    async def ask() -> None:
        responses.append(await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=30"))
        answered_at.append(trio.current_time())

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(7)
            assert not responses  # still waiting
            changed_at = trio.current_time()
            web.store.set_state("web", stable("img:2", "c2"))
    assert responses[0].status_code == 200
    # Woken by the change itself, not by a poll: no virtual time passes in between.
    assert answered_at[0] - changed_at < 0.1
    assert answered_at[0] == changed_at


async def test_wait_for_times_out_with_the_pending_hosts(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", waiting("img:2"))
    start = trio.current_time()
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=12.5")
    assert trio.current_time() - start == 12.5
    assert response.status_code == 500
    data = await body(response)
    assert data["status"] == "timeout"
    assert data["hosts"] == [HOST]
    assert data["pending"][HOST]["state"] == "Wait"
    assert data["pending"][HOST]["image"] == "img:2"


async def test_wait_for_a_service_that_runs_nowhere_times_out(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    start = trio.current_time()
    with trio.fail_after(CAP + 60):
        response = await web.client.get("/v1/wait_for?name=ghost&image=x:1")  # default 60 s
    assert trio.current_time() - start == 60
    assert response.status_code == 500
    data = await body(response)
    assert data == {
        "status": "timeout",
        "hosts": [],
        "pending": {},
        "error": "no host runs ghost",
    }


async def test_wait_for_stable_on_another_image_is_pending(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", stable("img:1"))
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=1")
    assert response.status_code == 500
    assert (await body(response))["pending"][HOST]["image"] == "img:1"


async def test_wait_for_fails_at_once_when_the_image_was_reverted(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", waiting("img:2"))
    answered_at: list[float] = []
    responses: list[Any] = []

    async def ask() -> None:
        responses.append(await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=300"))
        answered_at.append(trio.current_time())

    reverted = Reverted(
        from_image="img:2", to_image="img:1", reason="it died", at=1002.0, spec_hash="h"
    )
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(5)
            assert not responses
            web.store.set_state("web", attrs.evolve(stable("img:1"), reverted=reverted))
            changed_at = trio.current_time()
    assert answered_at == [changed_at]
    assert responses[0].status_code == 500
    data = await body(responses[0])
    assert data["status"] == "failed" and data["hosts"] == [HOST]
    assert data["failed"][HOST]["reason"] == "reverted to img:1: it died"
    assert data["failed"][HOST]["state"] == "Stable"
    assert data["failed"][HOST]["image"] == "img:1"


async def test_wait_for_a_container_on_probation_waits_for_its_end(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    on_probation = attrs.evolve(stable("img:2"), on_probation=True, deadline=5.0)
    web.store.set_state("web", on_probation)
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=1")
    data = await body(response)
    assert data["status"] == "timeout"
    assert data["pending"][HOST]["state"] == "Stable"
    assert data["pending"][HOST]["probation_until"] is not None
    web.store.set_state("web", attrs.evolve(on_probation, on_probation=False, deadline=None))
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=1")
    assert await body(response) == {"status": "ok", "hosts": [HOST]}


async def test_wait_for_fails_at_once_on_a_permanent_error_of_the_image(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    missing = Failure(message="pull img:9: no such image", at=1002.0, permanent=True)
    retrying = ServiceState(
        phase=Phase.TryAgain, desired=spec("img:9"), deadline=10.0, error=missing
    )
    web.store.set_state("web", retrying)
    start = trio.current_time()
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for?name=web&image=img:9&timeout=300")
        other = await web.client.get("/v1/wait_for?name=web&image=img:8&timeout=1")
    assert trio.current_time() - start == 1  # only the wait for another image waited
    assert response.status_code == 500
    data = await body(response)
    assert data["status"] == "failed"
    assert data["failed"][HOST]["reason"] == "pull img:9: no such image"
    assert data["failed"][HOST]["error"] == {
        "message": "pull img:9: no such image",
        "at": 1002.0,
        "permanent": True,
    }
    # A permanent error of another image than the waited one is no verdict on it.
    assert (await body(other))["status"] == "timeout"


@pytest.mark.parametrize(
    "query",
    [
        "",
        "name=web",
        "image=img:1",
        "name=&image=img:1",
        "name=web&image=",
        "name=web&image=img:1&timeout=abc",
        "name=web&image=img:1&timeout=-1",
        "name=web&image=img:1&timeout=3600.5",
        "name=web&image=img:1&timeout=nan",
        "name=web&image=img:1&timeout=inf",
        "name=web&image=img:1&timeout=1e999",
        "name=web&image=img:1&timeout=0x10",
        f"name={'n' * 300}&image=img:1",
        f"name=web&image={'i' * 2000}",
    ],
)
async def test_wait_for_refuses_bad_parameters(
    autojump_clock: trio.testing.MockClock, web: Web, query: str
) -> None:
    web.store.set_state("web", stable("img:1"))
    response = await json_error(web, f"/v1/wait_for?{query}", 400)
    assert (await body(response))["error"]


async def test_wait_for_accepts_the_limits(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", stable("img:1"))
    with trio.fail_after(CAP):
        for timeout in ("0", "3600", "0.25", " 5 "):
            response = await web.client.get(f"/v1/wait_for?name=web&image=img:1&timeout={timeout}")
            assert response.status_code == 200, timeout


async def test_wait_for_uses_every_host_when_there_is_a_global_source(
    autojump_clock: trio.testing.MockClock,
    make_web: MakeWeb,
) -> None:
    hosts = FakeHosts(
        {
            "a": service_view({"web": stable("img:2")}),
            "b": service_view({"web": waiting("img:2")}),
            "c": service_view({"other": stable("x:1")}),  # does not run web: does not count
        }
    )
    responses: list[Any] = []
    async with make_web(global_source=hosts) as web:

        async def ask() -> None:
            responses.append(await web.client.get("/v1/wait_for?name=web&image=img:2"))

        with trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(1)
                assert not responses
                hosts.set(
                    {
                        "a": service_view({"web": stable("img:2")}),
                        "b": service_view({"web": stable("img:2")}),
                        "c": service_view({"other": stable("x:1")}),
                    }
                )
        assert responses[0].status_code == 200
        assert await body(responses[0]) == {"status": "ok", "hosts": ["a", "b"]}
        # The local store (empty) played no part.
        assert web.store.entries == {}


async def test_wait_for_timeout_names_the_pending_remote_hosts(
    autojump_clock: trio.testing.MockClock,
    make_web: MakeWeb,
) -> None:
    hosts = FakeHosts(
        {
            "a": service_view({"web": stable("img:2")}),
            "b": service_view({"web": waiting("img:2")}),
        }
    )
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=3")
        data = await body(response)
        assert response.status_code == 500
        assert list(data["pending"]) == ["b"]
        assert data["pending"]["b"]["state"] == "Wait"


async def test_the_fleet_is_asked_for_only_while_a_wait_or_a_feed_is_open(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    """Consul's source reads only while somebody asks (condo.consul.source): the app holds its
    demand for each open wait and each feed, and none otherwise (the waits' task included)."""
    hosts = FakeHosts({"a": service_view({"web": waiting("img:2")})})
    answers: list[int] = []
    async with make_web(global_source=hosts) as web:

        async def wait() -> None:
            response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=600")
            answers.append(response.status_code)

        with trio.fail_after(CAP):
            await trio.sleep(1)
            assert hosts.demand_held == 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(1)
                assert hosts.demand_held > 0
                hosts.set({"a": service_view({"web": stable("img:2")})})
            assert answers == [200]
            await trio.sleep(1)
            assert hosts.demand_held == 0
            async with web.client.websocket("/v1/feed") as ws:
                assert json.loads(await ws.receive())["type"] == "snapshot"
                assert json.loads(await ws.receive())["type"] == "global"
                await trio.sleep(1)
                assert hosts.demand_held > 0
            await trio.sleep(1)
            assert hosts.demand_held == 0


# --- shutdown ----------------------------------------------------------------------------------


async def test_closing_answers_every_waiter_at_once(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    statuses: list[int] = []
    closes: list[int] = []

    async def long_poll() -> None:
        response = await web.client.get("/v1/wait_for?name=web&image=img:9&timeout=600")
        statuses.append(response.status_code)
        assert (await body(response))["error"] == "condo is shutting down"

    async def feed() -> None:
        async with web.client.websocket("/v1/feed") as ws:
            await ws.receive()
            with pytest.raises(WebsocketDisconnectError) as closed:
                await ws.receive()
            closes.append(closed.value.args[0])

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(long_poll)
            for _ in range(5):
                nursery.start_soon(feed)
            await trio.sleep(5)
            assert web.context.metrics.value("condo_web_open_waits") == 20
            assert web.context.metrics.value("condo_web_open_feeds") == 5
            closed_at = trio.current_time()
            web.context.closing.close()
        done_at = trio.current_time()
    assert done_at == closed_at
    assert statuses == [503] * 20
    assert closes == [1001] * 5
    assert web.context.metrics.value("condo_web_open_waits") == 0
    assert web.context.metrics.value("condo_web_open_feeds") == 0
    # After closing, a new waiter is answered at once too.
    with trio.fail_after(CAP):
        late = await web.client.get("/v1/wait_for?name=web&image=img:9&timeout=600")
    assert late.status_code == 503


# --- global_state ------------------------------------------------------------------------------


async def test_global_state_without_consul_is_a_json_400(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    response = await json_error(web, "/v1/global_state", 400)
    assert "--expose consul" in (await body(response))["error"]


async def test_global_state_shows_every_host(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    views = {
        "a": service_view({"web": stable("img:1")}),
        "b": service_view({"web": waiting("img:2")}),
    }
    async with make_web(global_source=FakeHosts(views)) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/v1/global_state")
        assert response.status_code == 200
        assert await body(response) == {
            "hosts": {
                "a": {"services": views["a"], "live": True, "last_seen": None},
                "b": {"services": views["b"], "live": True, "last_seen": None},
            },
            "stale": False,
            "read_at": None,
        }


async def test_global_state_of_one_service_holds_that_service_alone(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    """`?name=` (`condo wait`'s progress, once a second): every host, with that service alone in
    its `services` and `runs`; the verdict read from it is the whole document's."""
    views = {
        "a": service_view({"web": stable("img:1"), "db": stable("pg:1")}),
        "b": service_view({"db": waiting("pg:2")}),
    }
    records = {"c": lapsed(), "a": HostRecord(services=RAN_WEB_1, live=True)}
    async with make_web(global_source=FakeHosts(views, records=records)) as web:
        with trio.fail_after(CAP):
            whole = await body(await web.client.get("/v1/global_state"))
            one = await body(await web.client.get("/v1/global_state?name=web"))
            blank = await web.client.get("/v1/global_state?name=%20")
    assert one["hosts"] == {
        "a": {**whole["hosts"]["a"], "services": {"web": views["a"]["web"]}},
        "b": {**whole["hosts"]["b"], "services": {}},
        "c": whole["hosts"]["c"],
    }
    assert whole["hosts"]["a"]["services"] != one["hosts"]["a"]["services"]
    for doc in (whole, one):
        hosts, recorded = read_hosts_document(doc["hosts"])
        assert evaluate("web", "img:1", hosts, recorded).pending.keys() == {"c"}
    assert blank.status_code == 400


# --- multi-host truth: unreachable hosts, stale pictures, forgetting ---------------------------

RAN_WEB_1 = {"web": {"state": "Stable", "image": "img:1"}}


def lapsed(last_seen: float = 1000.0) -> HostRecord:
    """The record of a host whose session lapsed while it ran web on img:1."""
    return HostRecord(services=RAN_WEB_1, live=False, last_seen=last_seen)


async def test_global_state_shows_unreachable_hosts_and_a_stale_picture(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    views = {"a": service_view({"web": stable("img:2")})}
    records = {"a": HostRecord(services=RAN_WEB_1, live=True), "b": lapsed()}
    hosts = FakeHosts(views, records)
    hosts.stale, hosts.read_at = True, 990.0
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            data = await body(await web.client.get("/v1/global_state"))
        assert data == {
            "hosts": {
                "a": {"services": views["a"], "live": True, "last_seen": None, "runs": RAN_WEB_1},
                "b": {"services": {}, "live": False, "last_seen": 1000.0, "runs": RAN_WEB_1},
            },
            "stale": True,
            "read_at": 990.0,
        }


async def test_wait_for_counts_an_unreachable_host_until_it_is_back(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    """The false success of a cut-off host: every host it can see runs img:2, but b (cut off,
    last seen on img:1) is pending, named with when it was last seen, never done."""
    views = {"a": service_view({"web": stable("img:2")})}
    hosts = FakeHosts(views, {"b": lapsed()})
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=3")
            assert response.status_code == 500
            data = await body(response)
            assert data["hosts"] == ["a", "b"]
            assert data["pending"] == {
                "b": {
                    "state": "unreachable",
                    "since": 1000.0,
                    "image": "img:1",
                    "last_state": "Stable",
                }
            }
            answers: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    answers.append(await web.client.get("/v1/wait_for?name=web&image=img:2"))

                nursery.start_soon(ask)
                await trio.sleep(1)
                assert not answers
                # b is back, on img:2.
                back = {
                    "b": HostRecord(
                        services={"web": {"state": "Stable", "image": "img:2"}}, live=True
                    )
                }
                hosts.set({**views, "b": service_view({"web": stable("img:2")})}, back)
        assert await body(answers[0]) == {"status": "ok", "hosts": ["a", "b"]}


async def test_wait_for_gives_no_verdict_from_a_stale_picture(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    hosts = FakeHosts({"a": service_view({"web": stable("img:2")})})
    hosts.stale, hosts.read_at = True, 990.0
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/v1/wait_for?name=web&image=img:2&timeout=3")
            assert response.status_code == 500
            data = await body(response)
            assert data["status"] == "timeout" and data["stale"] is True
            assert data["read_at"] == 990.0 and "stale" in data["error"]
            answers: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    answers.append(await web.client.get("/v1/wait_for?name=web&image=img:2"))

                nursery.start_soon(ask)
                await trio.sleep(1)
                assert not answers
                hosts.set_stale(False)  # Consul answers again: the same picture is a verdict
        assert await body(answers[0]) == {"status": "ok", "hosts": ["a"]}


@pytest.mark.parametrize(
    ("host", "status"),
    [("b", 200), ("a", 409), ("nobody", 404)],
)
async def test_forget_removes_only_a_host_that_is_not_live(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, host: str, status: int
) -> None:
    hosts = FakeHosts({"a": service_view({"web": stable("img:2")})}, {"b": lapsed()})
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            response = await web.client.delete(f"/v1/hosts/{host}")
        assert response.status_code == status
        assert hosts.forgotten == (["b"] if status == 200 else [])
        data = await body(response)
        if status == 200:
            assert data == {"forgotten": "b"}
        else:
            assert list(data) == ["error"] and host in data["error"]


async def test_forget_needs_a_fresh_picture_and_consul(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    hosts = FakeHosts({}, {"b": lapsed()})
    hosts.stale = True
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            assert (await web.client.delete("/v1/hosts/b")).status_code == 503
    async with make_web() as web:
        with trio.fail_after(CAP):
            assert (await web.client.delete("/v1/hosts/b")).status_code == 400


# --- LocalSource -------------------------------------------------------------------------------


async def test_local_source_pictures_the_store(autojump_clock: trio.testing.MockClock) -> None:
    store = Store(HOST)
    source = LocalSource(store)
    empty = source.picture()
    assert empty.token == 0
    assert empty.hosts == {HOST: {}}
    assert source.picture() is empty  # built once per version
    store.set_state("web", stable("img:1"))
    picture = source.picture()
    assert picture.token == 1
    assert picture.hosts == {HOST: store.view()["services"]}

    woke_at: list[float] = []

    async def wait() -> None:
        await source.wait_beyond(picture.token)
        woke_at.append(trio.current_time())

    start = trio.current_time()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(3)
            assert not woke_at
            store.set_state("web", waiting("img:2"))
    assert woke_at == [start + 3]
    assert source.picture().token == 2
    # A token already behind returns at once.
    with trio.fail_after(CAP):
        await source.wait_beyond(0)


# --- healthz -----------------------------------------------------------------------------------


async def test_healthz_ok(autojump_clock: trio.testing.MockClock, web: Web) -> None:
    with trio.fail_after(CAP):
        response = await web.client.get("/healthz")
    assert response.status_code == 200
    data = await body(response)
    assert data["status"] == "ok"
    assert data["engine"] == {"ok": True, "api_version": "1.41", "error": None}
    assert data["state_file"] == {"ok": True, "error": None}


async def test_healthz_503_when_the_engine_does_not_answer(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.engine.failure = DockerUnavailable("GET /_ping: ConnectError: no socket")
    response = await json_error(web, "/healthz", 503)
    data = await body(response)
    assert data["status"] == "unavailable"
    assert "no socket" in data["error"]


async def test_healthz_503_when_the_engine_hangs(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.engine.hang = True
    start = trio.current_time()
    response = await json_error(web, "/healthz", 503)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert "did not answer" in (await body(response))["error"]


async def test_healthz_degraded_when_the_state_file_fails(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.file_error.append(OSError("disk full"))
    with trio.fail_after(CAP):
        response = await web.client.get("/healthz")
    assert response.status_code == 200
    data = await body(response)
    assert data["status"] == "degraded"
    assert data["state_file"] == {"ok": False, "error": "disk full"}


async def test_healthz_pings_the_engine_at_most_once_per_second(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(web.client.get, "/healthz")
        assert web.engine.pings == 1
        await trio.sleep(0.5)
        await web.client.get("/healthz")
        assert web.engine.pings == 1
        await trio.sleep(0.6)
        await web.client.get("/healthz")
        assert web.engine.pings == 2


# --- metrics -----------------------------------------------------------------------------------

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Read the exposition with prometheus_client's own parser (it fails on malformed lines)."""
    types = {"counter", "gauge", "histogram"}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.type in types, family
        for found in family.samples:
            assert found.name.startswith("condo_"), found.name
            samples.setdefault(found.name, []).append((found.labels, found.value))
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    for found, value in samples.get(name, []):
        if found == labels:
            return value
    return None


async def test_metrics_follow_the_services(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    web.store.set_state("web", ServiceState())
    await trio.sleep(1)
    web.store.set_state("web", waiting("img:1"))  # deploy starts
    await trio.sleep(4)
    web.store.set_state("web", attrs.evolve(waiting("img:1"), phase=Phase.TryAgain, attempt=1))
    await trio.sleep(10)
    web.store.set_state("web", waiting("img:1"))  # a retry
    await trio.sleep(2)
    web.store.set_state("web", stable("img:1"))  # deployed, 16 s after it started
    web.context.metrics.observe_docker_call(DockerCallRecord("GET", "/_ping", "200", 0.003))
    with trio.fail_after(CAP):
        response = await web.client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    samples = parse_metrics(await response.get_data(as_text=True))
    assert sample(samples, "condo_service_state", service="web", state="Stable") == 1
    assert sample(samples, "condo_service_state", service="web", state="Wait") == 0
    transitions = "condo_service_transitions_total"
    assert sample(samples, transitions, service="web", **{"from": "Init", "to": "Wait"}) == 1
    assert sample(samples, transitions, service="web", **{"from": "Wait", "to": "TryAgain"}) == 1
    assert sample(samples, transitions, service="web", **{"from": "TryAgain", "to": "Wait"}) == 1
    assert sample(samples, transitions, service="web", **{"from": "Wait", "to": "Stable"}) == 1
    assert sample(samples, "condo_service_retries_total", service="web") == 1
    assert sample(samples, "condo_deploy_duration_seconds_count", service="web") == 1
    assert sample(samples, "condo_deploy_duration_seconds_sum", service="web") == 16
    assert sample(samples, "condo_deploy_duration_seconds_bucket", service="web", le="10.0") == 0
    assert sample(samples, "condo_deploy_duration_seconds_bucket", service="web", le="20.0") == 1
    call = {"method": "GET", "endpoint": "/_ping", "outcome": "200"}
    assert sample(samples, "condo_docker_call_duration_seconds_count", **call) == 1
    assert sample(samples, "condo_docker_call_duration_seconds_bucket", le="0.005", **call) == 1
    assert sample(samples, "condo_web_open_waits") == 0


@attrs.frozen
class DockerCallRecord:
    method: str
    endpoint: str
    outcome: str
    took: float


# --- openapi -----------------------------------------------------------------------------------


def routes_of(app: QuartTrio) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule of the app; HEAD/OPTIONS come with every GET."""
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                found.add((path, method.lower()))
    return found


def documented(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


@pytest.mark.parametrize("consul", [False, True])
@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_openapi_matches_the_routes(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, token: str | None, consul: bool
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    hosts = FakeHosts({}) if consul else None
    async with make_web(token=token, global_source=hosts) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/openapi.json", headers=headers)
        document = await body(response)
    assert document == openapi_document(token=token is not None, consul=consul)
    assert document["openapi"].startswith("3.")
    assert documented(document) == routes_of(web.app)
    websockets = {rule.rule for rule in web.app.url_map.iter_rules() if rule.websocket}
    marked = {
        path for path, item in document["paths"].items() if item.get("get", {}).get("x-websocket")
    }
    assert websockets == marked == {"/v1/feed"}
    for path, item in document["paths"].items():
        for operation in item.values():
            assert operation["responses"], path
            # A 401 is documented exactly where condo can answer one.
            assert ("401" in operation["responses"]) == (token is not None and path != "/healthz")
    # Every $ref resolves.
    text = json.dumps(document)
    for ref in re.findall(r'"\$ref": "#/components/schemas/([A-Za-z]+)"', text):
        assert ref in document["components"]["schemas"]


def test_openapi_declares_bearer_auth_only_with_a_token() -> None:
    open_document = openapi_document(token=False, consul=False)
    assert "security" not in open_document
    assert "securitySchemes" not in open_document["components"]
    feed_parameters = open_document["paths"]["/v1/feed"]["get"]["parameters"]
    assert [p["name"] for p in feed_parameters] == ["global"]  # no token
    locked = openapi_document(token=True, consul=False)
    assert locked["security"] == [{"bearer": []}]
    assert locked["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert locked["paths"]["/healthz"]["get"]["security"] == []
    [_, token] = locked["paths"]["/v1/feed"]["get"]["parameters"]
    assert (token["name"], token["in"]) == ("token", "query")


@pytest.mark.parametrize("value", ["", "   ", "\x1e", "\u3000\t"])
@pytest.mark.parametrize("parameter", ["name", "image"])
async def test_openapi_refuses_the_blank_names_the_route_refuses(
    autojump_clock: trio.testing.MockClock, web: Web, parameter: str, value: str
) -> None:
    operation = openapi_document(token=False, consul=False)["paths"]["/v1/wait_for"]
    [schema] = [p["schema"] for p in operation["get"]["parameters"] if p["name"] == parameter]
    # The document's rule (minLength, a non-blank pattern) says no to what the route says no to.
    assert len(value) < schema["minLength"] or not re.search(schema["pattern"], value)
    query = {"name": "web", "image": "img:1", "timeout": "0", parameter: value}
    with trio.fail_after(CAP):
        response = await web.client.get("/v1/wait_for", query_string=query)
    assert response.status_code == 400
    assert "400" in operation["get"]["responses"]


def test_the_not_blank_pattern_is_what_strip_keeps() -> None:
    # Every character Python strips (all in the BMP) fails the pattern; every other one passes.
    assert all(ord(c) < 0x10000 for c in map(chr, range(0x110000)) if c.isspace())
    mismatched = [
        hex(code)
        for code in range(0x10000)
        if (re.search(NOT_BLANK, chr(code)) is None) != chr(code).isspace()
    ]
    assert mismatched == []


@pytest.mark.parametrize(("consul", "status"), [(False, 400), (True, 200)])
async def test_openapi_documents_what_global_state_answers(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb, consul: bool, status: int
) -> None:
    async with make_web(global_source=FakeHosts({}) if consul else None) as web:
        with trio.fail_after(CAP):
            response = await web.client.get("/v1/global_state")
    assert response.status_code == status
    document = openapi_document(token=False, consul=consul)
    # With Consul, a blank or too long `name` is a 400 (see the test of `?name=`).
    statuses = {str(status), "403"} | ({"400"} if consul else set())
    assert set(document["paths"]["/v1/global_state"]["get"]["responses"]) == statuses


async def test_healthz_answers_other_methods_405_even_with_a_token(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    # /healthz needs no token: a method it does not take is a 405 (Allow: GET), never a 401.
    async with make_web(token="s3cret") as web:
        with trio.fail_after(CAP):
            traced = await web.client.trace("/healthz")
            posted = await web.client.post("/healthz")
            state = await web.client.post("/v1/state")
    assert (traced.status_code, posted.status_code) == (405, 405)
    assert "GET" in traced.headers["Allow"]
    assert state.status_code == 401  # other routes still say nothing without the token


def test_openapi_check_notices_an_undocumented_route() -> None:
    app = QuartTrio(__name__)

    @app.get("/v1/secret")
    async def secret() -> str:
        return "x"

    document = openapi_document(token=False, consul=False)
    assert ("/v1/secret", "get") in routes_of(app) - documented(document)


def test_openapi_documents_the_host_check_and_the_caps() -> None:
    paths = openapi_document(token=True, consul=True)["paths"]
    assert all("403" in op["responses"] for ops in paths.values() for op in ops.values())
    assert "--max-waits" in paths["/v1/wait_for"]["get"]["responses"]["503"]["description"]
    assert "--max-feeds" in paths["/v1/feed"]["get"]["responses"]["503"]["description"]


# --- static --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ui", "/ui/"])
async def test_the_dashboard_placeholder(
    autojump_clock: trio.testing.MockClock, web: Web, path: str
) -> None:
    with trio.fail_after(CAP):
        response = await web.client.get(path)
        script = await web.client.get("/ui/app.js")
    assert response.status_code == 200
    assert response.content_type == "text/html; charset=utf-8"
    page = await response.get_data(as_text=True)
    assert "condo dashboard" in page
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert '<script src="/ui/app.js"' in page
    assert script.status_code == 200
    assert script.content_type.endswith("javascript; charset=utf-8")
    code = await script.get_data(as_text=True)
    assert "/v1/state" in code
    assert "textContent" in code
    assert "innerHTML" not in code


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../app.py",
        "/ui/%2e%2e/app.py",
        "/ui/..%2fapp.py",
        "/ui/%2e%2e%2f%2e%2e%2fstore.py",
        "/ui//etc/passwd",
        "/ui/%2fetc%2fpasswd",
        "/ui/static/index.html",
        "/ui/index.html/",
        "/ui/nope.js",
        "/ui/%00",
        "/ui/..",
        "/ui/.",
    ],
)
async def test_static_files_cannot_escape_their_folder(
    autojump_clock: trio.testing.MockClock, web: Web, path: str
) -> None:
    await json_error(web, path, 404)


def test_static_scan_lists_plain_files_only(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "app.js").write_text("1")
    (tmp_path / ".secret").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret")
    (tmp_path / "link.txt").symlink_to(outside)
    (tmp_path / "inner-link.html").symlink_to(tmp_path / "index.html")
    files = StaticFiles.scan(tmp_path)
    assert set(files.files) == {"index.html", "js/app.js", "inner-link.html"}
    assert files.files["js/app.js"].content_type.endswith("javascript; charset=utf-8")
    assert files.lookup("link.txt") is None
    assert files.lookup("../" + outside.name) is None


def test_static_files_are_read_at_scan_time(tmp_path: Path) -> None:
    (tmp_path / "a.css").write_text("p {}")
    files = StaticFiles.scan(tmp_path)
    (tmp_path / "a.css").write_text("changed later")
    (tmp_path / "b.css").write_text("added later")
    found = files.lookup("a.css")
    assert found is not None
    assert (found.data, found.content_type) == (b"p {}", "text/css; charset=utf-8")
    assert files.lookup("b.css") is None


# --- a failure record for completeness ---------------------------------------------------------


async def test_state_shows_errors_and_retries(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    state = attrs.evolve(
        waiting("img:1"),
        phase=Phase.TryAgain,
        attempt=2,
        deadline=trio.current_time() + 10,
        error=Failure(message="pull failed", at=1234.5),
    )
    web.store.set_state("web", state)
    with trio.fail_after(CAP):
        data = await body(await web.client.get("/v1/state"))
    service = data["services"]["web"]
    assert service["state"] == "TryAgain"
    assert service["error"] == {"message": "pull failed", "at": 1234.5}
    assert service["retry_at"] is not None
    assert service["attempt"] == 2


# --- the serving glue ----------------------------------------------------------------------------


async def test_answers_given_once_closing_ask_the_client_to_hang_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closing = Closing()
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = closing_connections(app, closing)
    with trio.fail_after(CAP):
        await wrapped({"type": "http"}, receive, send)  # type: ignore[arg-type]
        closing.close()
        await wrapped({"type": "http"}, receive, send)  # type: ignore[arg-type]
        await wrapped({"type": "websocket"}, receive, send)  # type: ignore[arg-type]
    starts = [m["headers"] for m in sent if m["type"] == "http.response.start"]
    assert starts == [
        [(b"x-a", b"1")],
        [(b"x-a", b"1"), (b"connection", b"close")],
        [(b"x-a", b"1")],  # not HTTP: untouched
    ]


# --- /v1/history ------------------------------------------------------------------------------


def with_history(web: Web) -> None:
    """Feed the store's transitions to the app's history, as condo.run wires them."""
    web.store.on_transition(web.context.history.on_transition)


async def test_history_lists_every_service_and_one_by_name(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    with_history(web)
    web.store.set_state("web", waiting("img:1", cid="c1"))
    web.store.set_state("web", stable("img:1", cid="c1"))
    web.store.set_spec_error("broken", SpecError("/s/broken.edn", "no :spec", line=3), "/s/b")
    web.store.set_state("gone", stable("img:9", cid="g1"))
    web.store.set_state("gone", attrs.evolve(ServiceState(), removed=True))
    web.store.drop("gone")
    with trio.fail_after(CAP):
        everything = await body(await web.client.get("/v1/history"))
        one = await body(await web.client.get("/v1/history?name=web"))
        none_yet = await body(await web.client.get("/v1/history?name=broken"))
        removed = await body(await web.client.get("/v1/history?name=gone"))
    # A removed service keeps its history; one without a deploy has an empty list.
    assert list(everything["services"]) == ["broken", "gone", "web"]
    [deploy] = everything["services"]["web"]
    assert deploy["image"] == "img:1" and deploy["outcome"] == "stable"
    assert deploy["container"] == "c1" and deploy["stable_at"] == 1001.0
    assert set(deploy) >= {"digest", "spec_hash", "strategy", "started_at", "ended_at", "error"}
    assert one == {"services": {"web": everything["services"]["web"]}}
    assert none_yet == {"services": {"broken": []}}
    assert [d["outcome"] for d in removed["services"]["gone"]] == ["removed"]


@pytest.mark.parametrize(("query", "status"), [("", 400), ("%20%20", 400), ("x" * 256, 400)])
async def test_history_refuses_a_blank_or_long_name(
    autojump_clock: trio.testing.MockClock, web: Web, query: str, status: int
) -> None:
    await json_error(web, f"/v1/history?name={query}", status)


async def test_history_of_an_unknown_service_is_404(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    response = await json_error(web, "/v1/history?name=nope", 404)
    assert "nope" in (await body(response))["error"]


async def test_feed_sends_history_entries(autojump_clock: trio.testing.MockClock, web: Web) -> None:
    with_history(web)
    web.store.set_state("web", stable("img:1"))
    with trio.fail_after(CAP):
        async with web.client.websocket("/v1/feed") as ws:
            assert json.loads(await ws.receive())["type"] == "snapshot"
            first = json.loads(await ws.receive())
            assert first["type"] == "history"
            assert [d["outcome"] for d in first["services"]["web"]] == ["stable"]
            web.store.set_state("db", waiting("pg:2"))
            messages = [json.loads(await ws.receive()) for _ in range(2)]
    [update] = [m for m in messages if m["type"] == "history"]
    # Only what changed, as its whole list.
    assert update["version"] > first["version"]
    assert list(update["services"]) == ["db"]
    assert [d["outcome"] for d in update["services"]["db"]] == ["deploying"]


async def test_feed_sends_every_host_first_then_only_the_hosts_that_changed(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    many = {
        f"h{i:03d}": service_view({"web": stable("img:1"), "db": stable("pg:1")})
        for i in range(100)
    }
    hosts = FakeHosts(many, {"gone": lapsed()})
    hosts.read_at = 990.0
    async with make_web(global_source=hosts) as web:
        with trio.fail_after(CAP):
            async with web.client.websocket("/v1/feed?global=delta") as ws:
                assert json.loads(await ws.receive())["type"] == "snapshot"
                text = await ws.receive()
                first = json.loads(text)
                assert first["type"] == "global"
                assert first["hosts"] == hosts_document(hosts.picture())
                assert (first["token"], first["stale"], first["read_at"]) == (1, False, 990.0)
                # One host changes, one is forgotten: a picture whose other hosts' mappings
                # are the same objects (as ConsulSource keeps them).
                changed = {**many, "h042": service_view({"web": waiting("img:2")})}
                hosts.set(changed)
                delta_text = await ws.receive()
                delta = json.loads(delta_text)
                assert delta["type"] == "global_delta"
                assert delta["token"] == 2 and delta["gone"] == ["gone"]
                assert delta["hosts"] == {"h042": hosts_document(hosts.picture())["h042"]}
                # Its size is one host's, not the fleet's.
                assert len(delta_text) * 50 < len(text)
                # A change of staleness alone: no host.
                hosts.set_stale(True)
                stale = json.loads(await ws.receive())
                assert (stale["type"], stale["stale"], stale["hosts"], stale["gone"]) == (
                    "global_delta",
                    True,
                    {},
                    [],
                )
            # A new client gets the whole picture again, first; one that did not ask for
            # deltas (the first contract's) gets a whole picture per change, as before.
            async with web.client.websocket("/v1/feed") as ws:
                await ws.receive()
                again = json.loads(await ws.receive())
                assert again["type"] == "global" and again["stale"] is True
                assert again["hosts"] == hosts_document(hosts.picture())
                hosts.set(many)
                whole = json.loads(await ws.receive())
                assert whole["type"] == "global"
                assert whole["hosts"] == hosts_document(hosts.picture())


def apply_delta(hosts: dict[str, Any], message: Mapping[str, Any]) -> None:
    """What the dashboard does with a `global` or `global_delta` message."""
    if message["type"] == "global":
        hosts.clear()
    for host in message.get("gone", []):
        del hosts[host]
    hosts.update(message["hosts"])


async def test_feed_deltas_applied_make_every_picture_for_a_fast_and_a_slow_client(
    autojump_clock: trio.testing.MockClock, make_web: MakeWeb
) -> None:
    chance = random.Random(17)
    names = [f"h{i}" for i in range(8)]
    views = {image: service_view({"web": stable(image)}) for image in ("img:1", "img:2")}
    busy = service_view({"web": waiting("img:2")})
    hosts: dict[str, Any] = {"h0": views["img:1"]}
    records: dict[str, HostRecord] = {}
    source = FakeHosts(dict(hosts))
    pictures: dict[tuple[int, bool], dict[str, Any]] = {}  # (token, stale) -> the whole picture

    def remember() -> None:
        pictures[(source.picture().token, source.stale)] = hosts_document(source.picture())

    remember()
    async with make_web(global_source=source) as web:
        with trio.fail_after(CAP):
            async with (
                web.client.websocket("/v1/feed?global=delta") as fast,
                web.client.websocket("/v1/feed?global=delta") as slow,
            ):
                seen: dict[str, Any] = {}
                slow_seen: dict[str, Any] = {}
                for client in (fast, slow):
                    assert json.loads(await client.receive())["type"] == "snapshot"
                apply_delta(slow_seen, json.loads(await slow.receive()))
                for step in range(200):
                    host = chance.choice(names)
                    move = chance.choice(["deploy", "settle", "lapse", "back", "forget", "stale"])
                    if move == "stale":
                        source.set_stale(not source.stale)
                    else:
                        if move == "deploy":
                            hosts[host] = busy
                        elif move == "settle":
                            hosts[host] = views[chance.choice(["img:1", "img:2"])]
                        elif move == "lapse" and host in hosts:  # unreachable: its record stays
                            del hosts[host]
                            records[host] = lapsed(float(step))
                        elif move == "back":
                            hosts[host] = views["img:1"]
                            records[host] = HostRecord(services=RAN_WEB_1, live=True)
                        elif move == "forget" and host not in hosts:
                            records.pop(host, None)
                        # Unchanged hosts keep their mappings, as ConsulSource's pictures do.
                        source.set(dict(hosts), dict(records))
                    remember()
                    # The fast client reads every message it is sent (each one a picture);
                    # the slow one only now and then: it skips pictures, never builds a backlog.
                    while True:
                        with trio.move_on_after(0.05):
                            message = json.loads(await fast.receive())
                            apply_delta(seen, message)
                            key = (message["token"], message["stale"])
                            assert seen == pictures[key], (step, move, host)
                            continue
                        break
                    if step % 25 == 24:
                        message = json.loads(await slow.receive())
                        assert message["type"] == "global_delta"
                        apply_delta(slow_seen, message)
                        assert slow_seen == pictures[(message["token"], message["stale"])]
                with trio.move_on_after(0.05):
                    while True:
                        apply_delta(slow_seen, json.loads(await slow.receive()))
                assert seen == slow_seen == hosts_document(source.picture())


async def test_feed_refuses_an_unknown_global_shape(
    autojump_clock: trio.testing.MockClock, web: Web
) -> None:
    errors: list[WebsocketResponseError] = []
    with trio.fail_after(CAP):
        try:
            async with web.client.websocket("/v1/feed", query_string={"global": "diff"}) as ws:
                await ws.receive()
        except* WebsocketResponseError as group:
            errors.extend(e for e in group.exceptions if isinstance(e, WebsocketResponseError))
    (error,) = errors
    assert error.response.status_code == 400
    assert "whole or delta" in json.loads(await error.response.get_data())["error"]


async def test_healthz_says_condos_clock(autojump_clock: trio.testing.MockClock, web: Web) -> None:
    before = time.time()
    with trio.fail_after(CAP):
        data = await body(await web.client.get("/healthz"))
    assert before <= data["time"] <= time.time()

"""A condo follows Consul only while somebody asks for the fleet (issue 12), on the real agent
(127.0.0.1:8500): idle, its watcher sends nothing while other hosts write; a `/v1/wait_for`
starts it and is answered when its condition turns true; the linger after the last waiter ends
it; `/v1/global_state` on an idle condo reads first (a key written while idle is in it); and the
publisher, while the watcher idles, finds a key deleted behind its back by itself.

The web app runs in-process (quart's test client) over a real ConsulSource, with a short linger.
Every test works under its own prefix (test_consul_session.consul_area).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio
from quart import typing as quart_typing

from condo.consul import SESSION_TTL, ConsulClient, ConsulSource, KeyLayout, Publisher
from condo.consul.layout import encode_value
from condo.metrics import Metrics
from condo.store import Store
from tests.consul_support import stable, web_app_over
from tests.integration.test_consul_session import AGENT, Area, consul_area

pytestmark = pytest.mark.consul

HOST = "lazy-host"
LINGER = 0.5  # the source keeps following this long after the last demand
CAP = 30


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


def view(image: str) -> dict[str, Any]:
    return {"state": "Stable", "current": {"image": image}, "probation_until": None}


async def put_service(area: Area, host: str, service: str, image: str) -> None:
    """Another host's key (no session: its host counts by its keys alone)."""
    key = KeyLayout.of(area.prefix).key(service, host)
    value = encode_value(host, service, view(image), 1.0)
    assert (await area.http.put(f"/v1/kv/{key}", content=value)).text.strip() == "true"


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a flag of the source under test (waiting on the source itself would be demand)."""
    while not predicate():
        await trio.sleep(0.01)


@attrs.frozen
class Lazy:
    source: ConsulSource
    client: quart_typing.TestClientProtocol
    metrics: Metrics


@asynccontextmanager
async def lazy_web(area: Area) -> AsyncIterator[Lazy]:
    """A ConsulSource (linger LINGER) and the web app over it, as condo runs them."""
    store = Store(HOST)
    metrics = Metrics()
    async with (
        httpx.AsyncClient(base_url=AGENT, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        source = ConsulSource(ConsulClient(http), KeyLayout.of(area.prefix), linger=LINGER)
        await nursery.start(source.run)
        metrics.consul_following.source = source
        app = web_app_over(source, store, metrics)
        async with app.test_app() as test_app:
            yield Lazy(source, test_app.test_client(), metrics)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def publishing(area: Area, store: Store) -> AsyncIterator[tuple[ConsulSource, Publisher]]:
    """The watcher (linger LINGER) and the publisher of `store`'s host on the real agent, wired
    as condo wires them; nobody asks for the fleet."""
    layout = KeyLayout.of(area.prefix)
    async with (
        httpx.AsyncClient(base_url=AGENT, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        client = ConsulClient(http)
        source = ConsulSource(client, layout, linger=LINGER)
        publisher = Publisher(client, store, layout, store.host)
        await nursery.start(source.run)
        await nursery.start(publisher.run, source)
        yield source, publisher
        nursery.cancel_scope.cancel()


async def test_an_idle_condo_reads_nothing_while_other_hosts_write(area: Area) -> None:
    with trio.fail_after(CAP):
        async with lazy_web(area) as lazy:
            source = lazy.source
            for n in range(5):  # other hosts deploy: nobody here asks
                await put_service(area, f"h{n}", "web", f"img:{n}")
                await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert source.requests == 0
            assert not source.following and source.stale
            assert lazy.metrics.value("condo_consul_following") == 0
            assert source.picture().hosts == {}

            # Somebody asks: one whole read (every write made while idle), then it follows.
            with source.demand():
                await until(lambda: source.following and not source.stale)
                assert lazy.metrics.value("condo_consul_following") == 1
                assert set(source.picture().hosts) == {f"h{n}" for n in range(5)}
                whole = source.requests
                assert whole == 1
                await put_service(area, "h0", "web", "img:10")
                await until(
                    lambda: source.picture().hosts["h0"]["web"]["current"]["image"] == "img:10"
                )
                assert source.requests <= whole + 2  # the blocking read that answered, or so

            # The linger passes: idle again, and nothing more is read.
            await until(lambda: not source.following)
            assert source.stale
            requests = source.requests
            for n in range(5):
                await put_service(area, f"h{n}", "web", f"img:{20 + n}")
            await trio.sleep(0.5)
            assert source.requests == requests


async def test_a_wait_follows_until_answered_then_the_linger_ends_it(area: Area) -> None:
    await put_service(area, "h2", "web", "img:1")
    with trio.fail_after(CAP):
        async with lazy_web(area) as lazy:
            source = lazy.source
            await trio.sleep(0.2)
            assert source.requests == 0 and not source.following
            answers: list[tuple[int, Any]] = []

            async def wait() -> None:
                response = await lazy.client.get("/v1/wait_for?name=web&image=img:2&timeout=20")
                answers.append((response.status_code, json.loads(await response.get_data())))

            async with trio.open_nursery() as waiting:
                waiting.start_soon(wait)
                await until(lambda: source.following and not source.stale)
                await trio.sleep(LINGER * 2)  # past the linger: the open wait is demand
                assert lazy.metrics.value("condo_consul_following") == 1 and not answers
                await put_service(area, "h2", "web", "img:2")
            assert answers == [(200, {"status": "ok", "hosts": ["h2"]})]

            # The wait left: the source follows for the linger, then reads nothing.
            await until(lambda: not source.following)
            requests = source.requests
            await put_service(area, "h2", "web", "img:3")
            await trio.sleep(0.5)
            assert source.requests == requests


async def test_global_state_on_an_idle_condo_reads_first(area: Area) -> None:
    await put_service(area, "h2", "web", "img:1")
    with trio.fail_after(CAP):
        async with lazy_web(area) as lazy:
            source = lazy.source
            first = await lazy.client.get("/v1/global_state")
            body = json.loads(await first.get_data())
            assert body["stale"] is False
            assert body["hosts"]["h2"]["services"]["web"]["current"]["image"] == "img:1"
            await until(lambda: not source.following)  # the linger passed: idle
            requests = source.requests
            await put_service(area, "h2", "web", "img:2")  # written while idle
            await trio.sleep(0.3)
            assert source.requests == requests
            second = await lazy.client.get("/v1/global_state?name=web")
            body = json.loads(await second.get_data())
            assert body["stale"] is False
            assert body["hosts"]["h2"]["services"]["web"]["current"]["image"] == "img:2"
            assert source.requests == requests + 1  # one whole read


async def test_the_publisher_checks_its_own_keys_while_the_watcher_idles(area: Area) -> None:
    """A service key, the `.live` key and the record deleted by hand while nobody asks: the next
    renewal (TTL/2) reads this host's keys in one transaction and writes them again; the watcher
    reads nothing meanwhile."""
    layout = KeyLayout.of(area.prefix)
    store = Store(HOST)
    store.set_state("web", stable("condo-test/healthy:1"))
    store.set_state("db", stable("condo-test/busybox:1"))
    web, live, record = layout.key("web", HOST), layout.live_key(HOST), layout.record_key(HOST)
    bound = SESSION_TTL / 2 + 2.0
    with trio.fail_after(CAP):
        async with publishing(area, store) as (source, publisher):
            every = await until_all(area, lambda k: {web, live, record} <= k.keys())
            session = every[web]["Session"]
            for key in (web, live, record):
                assert (await area.http.delete(f"/v1/kv/{key}")).status_code == 200
            deleted_at = trio.current_time()
            every = await until_all(area, lambda k: {web, live, record} <= k.keys())
            assert trio.current_time() - deleted_at < bound
            assert every[web]["Session"] == every[live]["Session"] == session  # not a new one
            assert publisher.own_checks >= 1
            assert source.requests == 0 and not source.following


async def until_all(
    area: Area, predicate: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """Every key under the area (`.live` and `.hosts` too), once `predicate` holds of them."""
    while not predicate(every := await area.all_keys()):
        await trio.sleep(0.05)
    return every

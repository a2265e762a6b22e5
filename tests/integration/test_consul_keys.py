"""Per-key publishing against the real Consul agent (127.0.0.1:8500): one key that Consul cannot
take (too large, refused) never keeps the others from being written; the client ignores proxy
variables; a service removed while the publisher re-checks loses its key.

Keys sort by service name and a round writes them in that order, so the failing service is named
`a-...`: it comes first, and the keys after it must still arrive. Every test works under its own
prefix (see test_consul_session.consul_area).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import structlog
import trio

from condo.consul import ConsulClient, ConsulSource, KeyLayout, Publisher, open_consul_client
from condo.consul.publisher import MAX_VALUE_SIZE
from condo.fsm import Failure
from condo.metrics import Metrics
from condo.store import Store
from tests.consul_support import stable, until_pictured
from tests.integration.test_consul_session import AGENT, Area, consul_area

pytestmark = pytest.mark.consul

HOST = "consul-keys-host"
CAP = 20


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


class Refusing(httpx.AsyncBaseTransport):
    """The real agent, except that writes and deletes of `denied` keys get the 403 of an ACL.

    A stand-in for the 403 path only: the dev agent runs without ACLs, so a refusing policy cannot
    be set up on it. Every other call (and every other key) goes to the real agent.
    """

    def __init__(self, denied: set[str]) -> None:
        self.denied = denied
        self._agent = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = request.url.path.removeprefix("/v1/kv/")
        if request.method in ("PUT", "DELETE") and key in self.denied:
            return httpx.Response(403, text="Permission denied", request=request)
        return await self._agent.handle_async_request(request)

    async def aclose(self) -> None:
        await self._agent.aclose()


class Hiding(httpx.AsyncBaseTransport):
    """The real agent, except that prefix reads leave out the `hidden` keys: what a read answered
    just before those keys were written looks like (a window too narrow to hit at will)."""

    def __init__(self) -> None:
        self.hidden: set[str] = set()
        self._agent = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._agent.handle_async_request(request)
        if request.method != "GET" or not self.hidden or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        # Values (`?recurse`) or names (`?keys`: a watcher following a large prefix by folder).
        kept = [e for e in body if (e["Key"] if isinstance(e, dict) else e) not in self.hidden]
        index = response.headers["X-Consul-Index"]
        return httpx.Response(200, json=kept, headers={"X-Consul-Index": index}, request=request)

    async def aclose(self) -> None:
        await self._agent.aclose()


@attrs.frozen
class Publishing:
    publisher: Publisher
    source: ConsulSource
    sent: list[str]  # "METHOD path" of every call the publisher's client made


@asynccontextmanager
async def publishing(
    area: Area,
    store: Store,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    source_transport: httpx.AsyncBaseTransport | None = None,
    max_value_size: int = MAX_VALUE_SIZE,
) -> AsyncIterator[Publishing]:
    """A publisher and a watcher on the real agent, wired as run_consul wires them."""
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    layout = KeyLayout.of(area.prefix)
    async with (
        httpx.AsyncClient(
            base_url=AGENT,
            transport=transport or httpx.AsyncHTTPTransport(),
            event_hooks={"request": [record]},
        ) as http,
        httpx.AsyncClient(
            base_url=AGENT, transport=source_transport or httpx.AsyncHTTPTransport()
        ) as source_http,
        trio.open_nursery() as nursery,
    ):
        source = ConsulSource(ConsulClient(source_http), layout)
        client = ConsulClient(http)
        publisher = Publisher(client, store, layout, HOST, max_value_size=max_value_size)
        await nursery.start(source.run)
        await nursery.start(publisher.run, source)
        yield Publishing(publisher, source, sent)
        nursery.cancel_scope.cancel()


def huge(image: str) -> Store:
    """A store whose `a-big` view is over 512 KiB (a long error message), and a normal `b-web`."""
    store = Store(HOST)
    long_error = Failure(message="pull failed: " + "x" * (600 * 1024), at=1.0)
    store.set_state("a-big", attrs.evolve(stable(image), error=long_error))
    store.set_state("b-web", stable("condo-test/healthy:1"))
    return store


async def test_a_value_over_the_size_limit_is_not_sent_and_the_others_publish(
    area: Area,
) -> None:
    store = huge("condo-test/busybox:1")
    big, web = f"{area.prefix}/a-big/{HOST}", f"{area.prefix}/b-web/{HOST}"
    metrics = Metrics()
    with trio.fail_after(CAP), structlog.testing.capture_logs() as logs:
        async with publishing(area, store) as consul:
            consul.publisher.add_failure_observer(metrics.observe_consul_publish)
            keys = await area.until_keys(lambda k: web in k)
            assert big not in keys
            assert f"PUT /v1/kv/{big}" not in consul.sent  # checked before sending
            assert "over Consul's limit of 524288 bytes" in consul.publisher.failures["a-big"]
            assert metrics.value("condo_consul_publish_failing", service="a-big") == 1
            # Small again: written at once, and no longer failing.
            store.set_state("a-big", stable("condo-test/busybox:2"))
            keys = await area.until_keys(lambda k: big in k)
            assert keys[big]["Value"]["state"]["current"]["image"] == "condo-test/busybox:2"
            while consul.publisher.failures:  # the answer is read just after the agent stored it
                await trio.sleep(0.01)
            assert metrics.value("condo_consul_publish_failing", service="a-big") is None
    failed = [e for e in logs if e["event"] == "consul.publish_failed"]
    assert [e["key"] for e in failed] == [big]


# Consul answers 413 from the headers, without reading the body: httpx's body iterator is left
# unfinished and garbage-collected (a ResourceWarning, ignored outside tests).
@pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream.__aiter__'")
async def test_consuls_own_413_fails_that_key_only(area: Area) -> None:
    # condo's check raised above Consul's limit: the real agent's 413 must be per key too (an
    # agent configured with a smaller kv_max_value_size answers so).
    store = huge("condo-test/busybox:1")
    big, web = f"{area.prefix}/a-big/{HOST}", f"{area.prefix}/b-web/{HOST}"
    with trio.fail_after(CAP):
        async with publishing(area, store, max_value_size=4 * MAX_VALUE_SIZE) as consul:
            keys = await area.until_keys(lambda k: web in k)
            assert big not in keys
            assert f"PUT /v1/kv/{big}" in consul.sent
            assert " 413 " in consul.publisher.failures["a-big"]
            assert set(consul.publisher.failures) == {"a-big"}


async def test_a_key_refused_by_the_acl_blocks_no_other(area: Area) -> None:
    store = Store(HOST)
    for name in ("a-denied", "b-web", "c-db"):
        store.set_state(name, stable(f"condo-test/{name}:1"))
    denied = f"{area.prefix}/a-denied/{HOST}"
    refusing = Refusing({denied})
    with trio.fail_after(CAP), structlog.testing.capture_logs() as logs:
        async with publishing(area, store, transport=refusing) as consul:
            keys = await area.until_keys(lambda k: len(k) == 2)
            assert set(keys) == {f"{area.prefix}/b-web/{HOST}", f"{area.prefix}/c-db/{HOST}"}
            assert "403 permission denied" in consul.publisher.failures["a-denied"]
            # Later changes of the others are written too; the refused key is not retried for
            # them (it waits for its own delay, or a change of its own).
            store.set_state("c-db", stable("condo-test/c-db:2"))
            await area.until_keys(
                lambda k: (
                    k[f"{area.prefix}/c-db/{HOST}"]["Value"]["state"]["current"]["image"]
                    == "condo-test/c-db:2"
                )
            )
            assert consul.sent.count(f"PUT /v1/kv/{denied}") == 1
            # The operator fixes the policy; the service's next change is written at once.
            refusing.denied.clear()
            store.set_state("a-denied", stable("condo-test/a-denied:2"))
            await area.until_keys(lambda k: denied in k)
            # The agent stores the key before condo has read its answer: wait for that too.
            while consul.publisher.failures:
                await trio.sleep(0.01)
    assert sum(e["event"] == "consul.publish_failed" for e in logs) == 1


async def test_proxy_variables_are_not_followed(
    area: Area, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy nobody listens on: a client that followed it could not reach the agent.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with trio.fail_after(CAP):
        async with open_consul_client(AGENT) as client:
            listing = await client.read_prefix(f"{area.prefix}/")
            assert listing.entries == ()
            assert listing.index > 0


async def test_a_service_removed_while_the_publisher_rechecks_loses_its_key(area: Area) -> None:
    store = Store(HOST)
    store.set_state("db", stable("condo-test/busybox:1"))
    store.set_state("web", stable("condo-test/healthy:1"))
    db, web = f"{area.prefix}/db/{HOST}", f"{area.prefix}/web/{HOST}"
    hiding = Hiding()
    with trio.fail_after(CAP):
        async with publishing(area, store, source_transport=hiding) as consul:
            await area.until_keys(lambda k: {db, web} <= set(k))
            await until_pictured(consul.source, lambda p: len(p.hosts.get(HOST, {})) == 2)

            # The interleaving: a read that misses db's key makes the publisher's re-check stop
            # trusting it, and "db" leaves the store in that same instant (this observer runs
            # right after the publisher's), before the round that would have rewritten it.
            def remove_db() -> None:
                if "db" in store.entries and "db" not in consul.publisher.published:
                    store.drop("db")

            consul.source.add_read_observer(remove_db)
            hiding.hidden.add(db)
            store.set_state("web", stable("condo-test/healthy:2"))  # a write, so a read
            await until_pictured(consul.source, lambda p: "db" not in p.hosts[HOST])
            assert "db" not in store.entries
            hiding.hidden.clear()
            with trio.move_on_after(3):
                await area.until_keys(lambda k: db not in k)
            keys = await area.keys()
            assert db not in keys, "the removed service's key was left behind"
            assert keys[web]["Value"]["state"]["current"]["image"] == "condo-test/healthy:2"

"""Edges of "a condo follows Consul only while somebody asks", on the real agent (127.0.0.1:8500):
a feed that connects to an idle condo and drops, again and again, costs one whole read and leaves
no demand behind (the linger ends it); waits that start together on an idle condo, or with a
timeout of 0, answer from a fresh picture.

The web app runs in-process over a real ConsulSource, with a short linger (test_consul_lazy's
`lazy_web`); every test works under its own prefix.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from condo.consul import SESSION_TTL, ConsulClient, ConsulSource, KeyLayout, Publisher
from condo.store import Store
from condo.waiting import Picture, evaluate
from tests.consul_support import stable, until_pictured
from tests.integration.test_consul_lazy import (
    LINGER,
    lazy_web,
    publishing,
    put_service,
    until,
)
from tests.integration.test_consul_session import AGENT, Area, consul_area

pytestmark = pytest.mark.consul

CAP = 30


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


async def test_a_feed_that_connects_and_drops_again_and_again_leaks_no_demand(area: Area) -> None:
    await put_service(area, "h1", "web", "img:1")
    with trio.fail_after(CAP):
        async with lazy_web(area) as lazy:
            source = lazy.source
            for n in range(20):
                async with lazy.client.websocket("/v1/feed") as ws:
                    assert json.loads(await ws.receive())["type"] == "snapshot"
                    first = json.loads(await ws.receive())
                    assert first["type"] == "global" and first["stale"] is False
                    image = first["hosts"]["h1"]["services"]["web"]["current"]["image"]
                    assert image == "img:1"
                    if n % 2:
                        await ws.send("hello")  # whatever the client sends is dropped
            # One whole read for them all (then blocking queries, which nothing woke).
            assert source.requests <= 2
            await until(lambda: not source.following)
            assert lazy.metrics.value("condo_consul_following") == 0
            requests = source.requests
            await put_service(area, "h1", "web", "img:2")
            await trio.sleep(LINGER)
            assert source.requests == requests

            # Connected to an idle condo: the first `global` is fresh (what was written while
            # idle), then it follows.
            async with lazy.client.websocket("/v1/feed") as ws:
                assert json.loads(await ws.receive())["type"] == "snapshot"
                first = json.loads(await ws.receive())
                assert first["stale"] is False
                assert first["hosts"]["h1"]["services"]["web"]["current"]["image"] == "img:2"
                await put_service(area, "h1", "web", "img:3")
                with trio.fail_after(2):
                    update = json.loads(await ws.receive())
                assert update["hosts"]["h1"]["services"]["web"]["current"]["image"] == "img:3"
            await until(lambda: not source.following)


async def test_waits_on_an_idle_condo_answer_from_a_fresh_picture(area: Area) -> None:
    """Many waits at once on an idle condo, and a wait of timeout 0: one whole read, each
    answered from it (written while idle), in milliseconds."""
    await put_service(area, "h1", "web", "img:1")
    await put_service(area, "h2", "web", "img:1")
    with trio.fail_after(CAP):
        async with lazy_web(area) as lazy:
            source = lazy.source
            answers: list[tuple[int, Any]] = []

            async def wait(path: str) -> None:
                response = await lazy.client.get(path)
                answers.append((response.status_code, json.loads(await response.get_data())))

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(wait, "/v1/wait_for?name=web&image=img:1&timeout=10")
            assert trio.current_time() - started < 1.0
            assert answers == [(200, {"status": "ok", "hosts": ["h1", "h2"]})] * 50
            assert source.requests <= 2
            await until(lambda: not source.following)

            # Written while idle: h2 is not there yet. A wait of 0 says so, from a fresh read.
            await put_service(area, "h2", "web", "img:0")
            answers.clear()
            await wait("/v1/wait_for?name=web&image=img:1&timeout=0")
            [(status, body)] = answers
            assert (status, body["status"], list(body["pending"])) == (500, "timeout", ["h2"])
            assert "stale" not in body


async def test_a_prefix_deleted_by_hand_never_makes_a_wait_done_without_an_idle_host(
    area: Area,
) -> None:
    """The prefix deleted by hand (every key, every record) while host `a` is asked (it follows:
    its own keys are back within a read) and host `b` idles (back at its next renewal): a wait
    on `a` must not say done on `a` alone meanwhile, `b` running another image."""
    layout = KeyLayout.of(area.prefix)
    done_alone: list[Picture] = []
    with trio.fail_after(CAP):
        async with (
            httpx.AsyncClient(base_url=AGENT, timeout=10) as http,
            trio.open_nursery() as nursery,
        ):
            client = ConsulClient(http)
            sources = {}
            for host, image in (("a", "img:1"), ("b", "img:0")):
                store = Store(host)
                store.set_state("web", stable(f"condo-test/{image}"))
                sources[host] = source = ConsulSource(client, layout, linger=LINGER)
                await nursery.start(source.run)
                await nursery.start(Publisher(client, store, layout, host).run, source)
            asked = sources["a"]
            with asked.demand():
                await until_pictured(asked, lambda p: {"a", "b"} <= p.records.keys())
                assert not evaluate("web", "condo-test/img:1", {}, {}).done
                await trio.sleep(1)  # b's next renewal is 4 s away
                deleted = await area.http.delete(f"/v1/kv/{area.prefix}?recurse")
                assert deleted.status_code == 200
                await until_pictured(asked, lambda p: "b" not in p.records)
                while "b" not in (picture := asked.picture()).records:
                    if not asked.stale:
                        verdict = evaluate(
                            "web", "condo-test/img:1", picture.hosts, picture.records
                        )
                        if verdict.done:
                            done_alone.append(picture)
                    await asked.wait_beyond(picture.token)
            nursery.cancel_scope.cancel()
    assert done_alone == []


async def test_the_own_key_check_of_a_host_of_many_services_and_odd_names(area: Area) -> None:
    """More services than one transaction takes (64 gets), one of them named with characters a
    URL quotes: keys deleted by hand in the second transaction's share, and the odd one, are
    written again within a renewal, while the watcher reads nothing."""
    layout = KeyLayout.of(area.prefix)
    store = Store("many")
    names = [f"svc{n:02}" for n in range(70)] + ["we b%?#&é"]
    for name in names:
        store.set_state(name, stable("condo-test/busybox:1"))
    gone = [layout.key(name, "many") for name in ("svc68", "we b%?#&é")]
    with trio.fail_after(CAP):
        async with publishing(area, store) as (source, publisher):
            every = {layout.key(name, "many") for name in names}
            while not every <= (await area.all_keys()).keys():
                await trio.sleep(0.05)
            for key in gone:
                quoted = urllib.parse.quote(key, safe="/")
                assert (await area.http.delete(f"/v1/kv/{quoted}")).status_code == 200
            deleted_at, checks = trio.current_time(), publisher.own_checks
            while not every <= (await area.all_keys()).keys():
                await trio.sleep(0.05)
            assert trio.current_time() - deleted_at < SESSION_TTL / 2 + 2.0
            assert publisher.own_checks == checks + 1
            assert source.requests == 0

"""Edges of "a condo follows Consul only while somebody asks", against the fake Consul of
test_consul_tasks with virtual time: what the publisher's own-key check (`PUT /v1/txn`, while the
watcher idles) does with an answer that does not match the transaction it sent.

A 200 to a transaction of `get`s means every `get` succeeded: its Results hold each key asked,
and only those. An answer that says otherwise (a proxy's, a broken agent's) says nothing of this
host's keys: it neither crashes the publisher nor makes it rewrite everything at each renewal.
And a Consul that never answers keeps no route of an idle condo waiting beyond the fresh-read
bound.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import structlog
import trio
import trio.testing

from condo.consul import ConsulClient, ConsulSource
from condo.consul.source import FRESH_LIMIT
from condo.metrics import Metrics
from condo.store import Store
from tests.consul_support import stable, web_app_over
from tests.test_consul_tasks import HOST, LAYOUT, FakeConsul, running

Answer = Callable[[list[str]], httpx.Response]


@attrs.define
class LyingTxn(FakeConsul):
    """The fake, whose `PUT /v1/txn` answers `lie(keys asked)` once `lie` is set."""

    lie: Answer | None = None

    def _txn(self, ops: list[dict[str, Any]]) -> httpx.Response:
        if self.lie is None:
            return super()._txn(ops)
        return self.lie([op["KV"]["Key"] for op in ops])


def kv(key: str) -> dict[str, Any]:
    return {"KV": {"Key": key, "Value": base64.b64encode(b"{}").decode(), "ModifyIndex": 1}}


async def lied_to(fake: LyingTxn, lie: Answer) -> tuple[int, int, list[Any]]:
    """Publish, then let the txn lie for two renewals while the watcher idles, with a deploy
    between them (published at once, as ever): the writes and session creations made meanwhile
    (the deploy's one key and record aside), and the logs."""
    store = Store(HOST)
    store.set_state("web", stable("web:1"))
    store.set_state("db", stable("db:1"))
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running(fake, store, asked=False) as consul:
            await fake.until(lambda: len(fake.services) == 2 and fake.record() is not None)
            await trio.sleep(1)
            fake.lie = lie
            since = trio.current_time()
            await trio.sleep(6)  # the renewal at t=5, with its check
            store.set_state("web", stable("web:2"))
            deployed = trio.current_time()
            with trio.fail_after(0.5):
                await fake.until(lambda: image("web", fake) == "web:2")
            await trio.sleep(5)  # the renewal at t=10, with its check
            assert not consul.source.following
            assert fake.count("PUT /v1/txn", since=since) >= 2
            assert fake.count("PUT /v1/session/renew", since=since) == 2
            writes = fake.count("PUT /v1/kv/", since=since) - 2
            assert fake.count("PUT /v1/kv/", since=deployed) >= 2  # web's key, the record
            created = fake.count("PUT /v1/session/create", since=since)
    return writes, created, logs


def image(service: str, fake: FakeConsul) -> object:
    value = fake.value(service)
    return None if value is None else value["current"]["image"]


async def test_a_txn_answer_naming_a_key_not_asked_is_no_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 200 whose Results hold a key the transaction did not ask for (with the ones it did)."""
    other = LAYOUT.key("web", "h2")
    fake = LyingTxn()
    writes, created, logs = await lied_to(
        fake,
        lambda keys: httpx.Response(200, json={"Results": [kv(k) for k in [*keys, other]]}),
    )
    assert (writes, created) == (0, 0)
    assert [e["event"] for e in logs if e["event"] == "consul.own_check_refused"] == [
        "consul.own_check_refused"
    ]


async def test_a_txn_answer_without_the_keys_asked_rewrites_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 200 whose Results are empty (or not a list): not "every key of this host is gone"."""
    shapes: list[object] = [[], None, "garbage", {"KV": 1}]
    for results in shapes:

        def lie(keys: list[str], results: object = results) -> httpx.Response:
            return httpx.Response(200, json={"Results": results})

        writes, created, logs = await lied_to(LyingTxn(), lie)
        assert (writes, created) == (0, 0), results
        assert any(e["event"] == "consul.own_check_refused" for e in logs)


async def test_a_txn_that_alone_fails_keeps_no_change_from_being_published(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The transaction alone fails (a 5xx, a body that is not JSON) while every other call
    works: the check is skipped until the next renewal, and the round publishes as ever (not
    a round ended before its writes, retried at once, forever)."""
    for lie in (
        lambda keys: httpx.Response(502, text="Bad Gateway"),
        lambda keys: httpx.Response(200, text="<html>proxy</html>"),
    ):
        writes, created, logs = await lied_to(LyingTxn(), lie)
        assert (writes, created) == (0, 0)
        assert not any(e["event"] == "consul.unreachable" for e in logs)


async def test_every_route_on_an_idle_condo_is_bounded_when_consul_does_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Consul accepts and never answers (a paused agent): `/v1/global_state`, a wait of
    timeout 0 and a feed's first `global` on an idle condo each answer, stale, within the
    fresh-read bound; none hangs on the read."""
    fake = FakeConsul(hung=True)
    store = Store(HOST)
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle), base_url="http://c")
    metrics = Metrics()
    async with http, trio.open_nursery() as nursery:
        source = ConsulSource(ConsulClient(http), LAYOUT)
        await nursery.start(source.run)
        app = web_app_over(source, store, metrics)
        async with app.test_app() as test_app:
            client = test_app.test_client()
            took: dict[str, tuple[float, Any]] = {}

            async def timed(name: str, ask: Callable[[], Awaitable[Any]]) -> None:
                start = trio.current_time()
                body = await ask()
                took[name] = (trio.current_time() - start, body)

            async def get(path: str) -> Any:
                response = await client.get(path)
                return json.loads(await response.get_data())

            async def feed() -> Any:
                async with client.websocket("/v1/feed") as ws:
                    assert json.loads(await ws.receive())["type"] == "snapshot"
                    return json.loads(await ws.receive())

            with trio.fail_after(30):
                async with trio.open_nursery() as asking:
                    asking.start_soon(timed, "global_state", lambda: get("/v1/global_state"))
                    asking.start_soon(
                        timed, "wait", lambda: get("/v1/wait_for?name=web&image=i&timeout=0")
                    )
                    asking.start_soon(timed, "feed", feed)
        nursery.cancel_scope.cancel()
    assert set(took) == {"global_state", "wait", "feed"}
    for name, (seconds, body) in took.items():
        assert seconds <= FRESH_LIMIT + 0.1, name
        assert body["stale"] is True, name


@attrs.define
class RefusedLiveReads(FakeConsul):
    """The fake, refusing (403) every read of one key alone: a token that may write this host's
    keys but not read them back by name."""

    def _read_key(self, key: str, params: httpx.QueryParams) -> Any:
        self.key_reads.append(None)
        return _refused()


async def _refused() -> httpx.Response:
    return httpx.Response(403, text="Permission denied")


async def test_the_live_key_deleted_behind_an_idle_hosts_back_is_back_before_the_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its one blocking query on `.live/<host>` wakes a check of every key of this host: all of
    them are written again at once, not at the next renewal (5 s)."""
    fake = FakeConsul()
    store = Store(HOST)
    store.set_state("web", stable("web:1"))
    with trio.fail_after(60):
        async with running(fake, store, asked=False) as consul:
            await fake.until(lambda: len(fake.services) == 1 and fake.record() is not None)
            await trio.sleep(1)  # the next renewal is 4 s away
            reads = len(fake.reads)  # (the publisher's own read of its record at the start)
            for key in list(fake.kv):  # the prefix deleted by hand
                del fake.kv[key]
            fake.bump()
            deleted = trio.current_time()
            await fake.until(lambda: len(fake.services) == 1 and fake.record() is not None)
            assert trio.current_time() - deleted < 0.5
            assert LAYOUT.live_key(HOST) in fake.kv
            assert not consul.source.following
            assert len(fake.reads) == reads  # no prefix read: the watcher idles throughout


async def test_a_refused_watch_of_the_live_key_is_said_once_and_publishing_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = RefusedLiveReads()
    store = Store(HOST)
    store.set_state("web", stable("web:1"))
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running(fake, store, asked=False):
            await fake.until(lambda: len(fake.services) == 1)
            await trio.sleep(30)
            store.set_state("web", stable("web:2"))
            await fake.until(lambda: image("web", fake) == "web:2")
    refusals = [e for e in logs if e["event"] == "consul.live_watch_refused"]
    assert len(refusals) == 1
    assert len(fake.key_reads) <= 4  # asked again every 10 s, not every second

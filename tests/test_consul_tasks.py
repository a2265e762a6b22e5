"""The publisher's and the watcher's timing, on Trio's MockClock with a scripted Consul.

`FakeConsul` answers the HTTP calls condo makes (sessions, acquire, delete, blocking reads) the
way the 1.8.7 agent does, behind httpx.MockTransport, so retries, renewals and
outages run in virtual time and the tests assert exact or bounded virtual durations. It is never
evidence that condo works with Consul: tests/integration/test_consul_*.py are.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import structlog
import trio
import trio.testing

from condo.consul import (
    ConsulClient,
    ConsulSource,
    KeyLayout,
    Publisher,
    decode_value,
    encode_value,
)
from condo.consul import source as source_module
from condo.consul.client import BLOCKING_WAIT
from condo.consul.layout import RECORDS, encode_live, encode_record, summary
from condo.consul.publisher import (
    MAX_RETRY_DELAY,
    MAX_VALUE_SIZE,
    PERMANENT_RETRY_DELAY,
    REFUSED_RETRY_DELAY,
)
from condo.errors import SpecError
from condo.fsm import Failure, ServiceState
from condo.metrics import Metrics
from condo.spec import ServiceSpec
from condo.store import Store
from condo.waiting import UNREACHABLE, Picture, evaluate
from tests.consul_support import asking, open_crowd, stable, until_pictured

HOST = "h1"
LAYOUT = KeyLayout.of("condo")
SESSION_NAME = f"condo:condo:{HOST}"


@attrs.define
class FakeConsul:
    """An in-memory Consul agent: KV with sessions, and blocking reads."""

    kv: dict[str, tuple[bytes, str | None]] = attrs.Factory(dict)
    sessions: dict[str, str] = attrs.Factory(dict)  # id -> name
    index: int = 100
    down: bool = False  # refuse every connection
    hung: bool = False  # accept and never answer (a SIGSTOPped agent)
    calls: list[tuple[float, str]] = attrs.Factory(list)
    reads: list[int | None] = attrs.Factory(list)  # the index of every KV read (None: no index)
    key_reads: list[int | None] = attrs.Factory(list)  # likewise, of one key alone (`.live`)
    modified: dict[str, int] = attrs.Factory(dict)  # key -> ModifyIndex
    serial: int = 0
    changed: trio.Event = attrs.Factory(trio.Event)
    denied: set[str] = attrs.Factory(set)  # keys an ACL refuses to write or delete (403)
    hidden: set[str] = attrs.Factory(set)  # keys left out of reads (a read from before a write)
    deleted: dict[str, int] = attrs.Factory(dict)  # key -> the index that deleted it (tombstones)
    # kv as of the last bump (None: before the first call; what a test put in before is old)
    _seen: dict[str, tuple[bytes, str | None]] | None = None

    def bump(self) -> None:
        self.index += 1
        if self._seen is None:
            self._seen = dict(self.kv)
        # What changed since the last bump, whoever changed it (a handler, or a test writing
        # `kv` directly): the per-prefix indexes of `?keys` reads follow, tombstones included.
        # A hidden key counts as changed (a read that misses it is one from another moment).
        for key in self._seen.keys() - self.kv.keys():
            self.deleted[key] = self.index
        for key, value in self.kv.items():
            if self._seen.get(key) != value or key in self.hidden:
                self.modified[key] = self.index
        self._seen = dict(self.kv)
        self.wake()

    def wake(self) -> None:
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    def set_down(self, down: bool) -> None:
        self.down = down
        self.wake()  # in-flight blocking reads notice (a dropped connection)

    def expire(self, session: str) -> None:
        """Consul invalidates the session (TTL ran out): `Behavior: delete` drops its keys."""
        self.sessions.pop(session)
        self.kv = {k: v for k, v in self.kv.items() if v[1] != session}
        self.bump()

    @property
    def services(self) -> dict[str, tuple[bytes, str | None]]:
        """The service keys (`<prefix>/<service>/<host>`), without `.live` and `.hosts`."""
        return {k: v for k, v in self.kv.items() if not k.split("/")[1].startswith(".")}

    def record(self, host: str = HOST) -> dict[str, Any] | None:
        """The services of the host's record (`.hosts/<host>`), or None without one."""
        held = self.kv.get(LAYOUT.record_key(host))
        return None if held is None else dict(json.loads(held[0])["services"])

    def count(self, what: str, since: float = -math.inf) -> int:
        return sum(1 for at, call in self.calls if call.startswith(what) and at >= since)

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()

    def value(self, service: str, host: str = HOST) -> dict[str, Any] | None:
        held = self.kv.get(LAYOUT.key(service, host))
        if held is None:
            return None
        state: dict[str, Any] = dict(decode_value(LAYOUT, LAYOUT.key(service, host), held[0]).state)
        return state

    def holder(self, service: str, host: str = HOST) -> str | None:
        held = self.kv.get(LAYOUT.key(service, host))
        return None if held is None else held[1]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self._seen is None:
            self._seen = dict(self.kv)
        self.calls.append((trio.current_time(), f"{request.method} {path}"))
        if self.hung:
            await trio.sleep_forever()
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        await trio.lowlevel.checkpoint()
        match request.method, path.split("/")[2:]:
            case "PUT", ["session", "create"]:
                body = json.loads(request.content)
                assert (body["TTL"], body["Behavior"], body["LockDelay"]) == ("10s", "delete", "0s")
                self.serial += 1
                sid = f"session-{self.serial}"
                self.sessions[sid] = body["Name"]
                self.bump()
                return httpx.Response(200, json={"ID": sid})
            case "PUT", ["session", "renew", sid]:
                if sid not in self.sessions:
                    return httpx.Response(404, text=f"Session id '{sid}' not found")
                return httpx.Response(200, json=[{"ID": sid}])
            case "PUT", ["session", "destroy", sid]:
                if sid in self.sessions:
                    self.expire(sid)
                return httpx.Response(200, text="true")
            case "GET", ["session", "list"]:
                return httpx.Response(
                    200, json=[{"ID": sid, "Name": name} for sid, name in self.sessions.items()]
                )
            case "PUT" | "DELETE", ["kv", *parts] if "/".join(parts) in self.denied:
                return httpx.Response(403, text="Permission denied")
            case "PUT", ["kv", *parts] if "acquire" not in request.url.params:
                self.kv["/".join(parts)] = (request.content, None)
                self.bump()
                self.modified["/".join(parts)] = self.index
                return httpx.Response(200, text="true")
            case "PUT", ["kv", *parts]:
                key, sid = "/".join(parts), request.url.params["acquire"]
                if sid not in self.sessions:
                    return httpx.Response(500, text=f'invalid session "{sid}"')
                held = self.kv.get(key)
                if held is not None and held[1] in self.sessions and held[1] != sid:
                    return httpx.Response(200, text="false")
                self.kv[key] = (request.content, sid)
                self.bump()
                self.modified[key] = self.index
                return httpx.Response(200, text="true")
            case "DELETE", ["kv", *parts]:
                if self.kv.pop("/".join(parts), None) is not None:
                    self.bump()
                return httpx.Response(200, text="true")
            case "GET", ["kv", *parts]:
                return await self._read("/".join(parts), request.url.params)
            case "PUT", ["txn"]:
                return self._txn(json.loads(request.content))
        raise AssertionError(f"unexpected call {request.method} {path}")

    def _txn(self, ops: list[dict[str, Any]]) -> httpx.Response:
        """`PUT /v1/txn` of KV `get`s, as Consul answers it: 409 naming every missing key."""
        assert all(op["KV"]["Verb"] == "get" for op in ops)
        keys = [op["KV"]["Key"] for op in ops]
        missing = [i for i, key in enumerate(keys) if key not in self.kv or key in self.hidden]
        if missing:
            errors = [{"OpIndex": i, "What": f"key {keys[i]!r} doesn't exist"} for i in missing]
            return httpx.Response(409, json={"Results": None, "Errors": errors})
        results = [
            {
                "KV": {
                    "Key": key,
                    "Value": base64.b64encode(self.kv[key][0]).decode(),
                    "Session": self.kv[key][1],
                    "ModifyIndex": self.modified.get(key, 1),
                }
            }
            for key in keys
        ]
        return httpx.Response(200, json={"Results": results, "Errors": None})

    def prefix_index(self, prefix: str) -> int:
        """Consul's index of a prefix: its newest write or delete (the agent's when none)."""
        under = [i for k, i in (self.modified | self.deleted).items() if k.startswith(prefix)]
        return max(under, default=self.index)

    async def _read(self, prefix: str, params: httpx.QueryParams) -> httpx.Response:
        if params.get("keys") == "true":
            return await self._keys(prefix, params)
        if "recurse" not in params:
            return await self._read_key(prefix, params)
        assert params["recurse"] == "true"
        self.reads.append(int(params["index"]) if "index" in params else None)
        if "index" in params:
            with trio.move_on_after(float(params["wait"].rstrip("s"))):
                while self.prefix_index(prefix) <= int(params["index"]) and not self.down:
                    await self.changed.wait()
            if self.down:
                raise httpx.ReadError("connection reset")
        # As Consul: the index of what is under the prefix (a folder's watch sleeps through
        # changes of other folders).
        headers = {"X-Consul-Index": str(self.prefix_index(prefix))}
        body = [
            {
                "Key": key,
                "Value": base64.b64encode(value).decode(),
                "Session": session,
                "ModifyIndex": self.modified.get(key, 1),
            }
            for key, (value, session) in sorted(self.kv.items())
            if key.startswith(prefix) and key not in self.hidden
        ]
        if not body:
            return httpx.Response(404, headers=headers)
        return httpx.Response(200, json=body, headers=headers)

    async def _read_key(self, key: str, params: httpx.QueryParams) -> httpx.Response:
        """One key (the publisher's watch of `.live/<host>`): blocking on that key's own index
        while it exists, on the whole store's while it does not, as Consul does."""
        self.key_reads.append(int(params["index"]) if "index" in params else None)

        def index() -> int:
            return self.modified.get(key, 1) if key in self.kv else self.index

        if "index" in params:
            with trio.move_on_after(float(params["wait"].rstrip("s"))):
                while index() <= int(params["index"]) and not self.down:
                    await self.changed.wait()
            if self.down:
                raise httpx.ReadError("connection reset")
        headers = {"X-Consul-Index": str(index())}
        if key not in self.kv or key in self.hidden:
            return httpx.Response(404, headers=headers)
        value, session = self.kv[key]
        body = [
            {
                "Key": key,
                "Value": base64.b64encode(value).decode(),
                "Session": session,
                "ModifyIndex": self.modified.get(key, 1),
            }
        ]
        return httpx.Response(200, json=body, headers=headers)

    async def _keys(self, prefix: str, params: httpx.QueryParams) -> httpx.Response:
        """`?keys&separator=/`, blocking on the prefix's own index as Consul does."""
        assert params["separator"] == "/"
        if "index" in params:
            self.reads.append(int(params["index"]))
            with trio.move_on_after(float(params["wait"].rstrip("s"))):
                while self.prefix_index(prefix) <= int(params["index"]) and not self.down:
                    await self.changed.wait()
            if self.down:
                raise httpx.ReadError("connection reset")
        names: list[str] = []
        for key in sorted(self.kv):
            if not key.startswith(prefix) or key in self.hidden:
                continue
            rest = key[len(prefix) :]
            name = prefix + rest[: rest.index("/") + 1] if "/" in rest else key
            if name not in names:
                names.append(name)
        headers = {"X-Consul-Index": str(self.prefix_index(prefix))}
        if not names:
            return httpx.Response(404, headers=headers)
        return httpx.Response(200, json=names, headers=headers)


@attrs.frozen
class Consul:
    fake: FakeConsul
    client: ConsulClient
    source: ConsulSource
    publisher: Publisher


@asynccontextmanager
async def running(
    fake: FakeConsul, store: Store, *, max_value_size: int = MAX_VALUE_SIZE, asked: bool = True
) -> AsyncIterator[Consul]:
    """The publisher and the watcher, wired as run_consul wires them, on the fake; with `asked`,
    somebody asks for the fleet throughout (the watcher follows, as under an open wait)."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle), base_url="http://consul")
    client = ConsulClient(http)
    source = ConsulSource(client, LAYOUT)
    publisher = Publisher(client, store, LAYOUT, HOST, max_value_size=max_value_size)
    async with http, trio.open_nursery() as nursery:
        await nursery.start(source.run)
        await nursery.start(publisher.run, source)
        with source.demand() if asked else contextlib.nullcontext():
            yield Consul(fake, client, source, publisher)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def published(fake: FakeConsul, store: Store) -> AsyncIterator[Consul]:
    """`running`, from the moment both services of the `store` fixture have their key."""
    async with running(fake, store) as consul:
        await fake.until(lambda: len(fake.services) == 2)
        yield consul


def image_of(picture: Picture, service: str, host: str = HOST) -> str | None:
    view = picture.hosts.get(host, {}).get(service)
    return None if view is None or view["current"] is None else str(view["current"]["image"])


@pytest.fixture
def fake() -> FakeConsul:
    return FakeConsul()


@pytest.fixture
def store() -> Store:
    store = Store(HOST)
    store.set_state("web", stable("web:1"))
    store.set_state("db", stable("db:1"))
    return store


# --- publisher -----------------------------------------------------------------------------------


async def test_start_up_publishes_everything_under_one_session(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with trio.fail_after(10):
        async with published(fake, store) as consul:
            assert trio.current_time() - start < 0.1  # at once, not at the next transition
            assert fake.sessions == {"session-1": SESSION_NAME}
            assert {fake.holder("web"), fake.holder("db")} == {"session-1"}
            view = store.view()["services"]
            assert fake.value("web") == json.loads(json.dumps(view["web"]))
            assert fake.value("db") == json.loads(json.dumps(view["db"]))
            assert consul.publisher.published == {"web", "db"}


async def test_changes_coalesce_into_the_latest_value(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        async with published(fake, store):
            before = trio.current_time()
            # A burst of changes (the listener is synchronous: the store cannot be blocked).
            for n in range(1000):
                store.set_state("web", stable(f"web:{n}"))
            await fake.until(lambda: (fake.value("web") or {})["image"] == "web:999")
            # One write per round, never one per change.
            assert fake.count("PUT /v1/kv/condo/web/h1", since=before) <= 2


async def test_a_service_that_leaves_the_store_loses_its_key(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        async with published(fake, store) as consul:
            store.drop("db")
            await fake.until(lambda: len(fake.services) == 1)
            assert fake.holder("web") == "session-1"
            assert consul.publisher.published == {"web"}


async def test_renews_every_half_ttl(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with trio.fail_after(60):
        async with running(fake, store):
            await trio.sleep(31)
    renewals = [at - start for at, call in fake.calls if call.startswith("PUT /v1/session/renew/")]
    assert renewals == pytest.approx([5.0, 10.0, 15.0, 20.0, 25.0, 30.0], abs=1e-6)


async def test_a_long_round_renews_between_its_writes(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    """12 keys on a Consul that takes 2 s per write: the first round lasts 24 s, over the TTL;
    the session is renewed within it, every TTL/2 (plus the write in flight), never left to
    expire."""
    store = Store(HOST)
    for i in range(12):
        store.set_state(f"s{i:02d}", stable(f"s:{i}"))

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "acquire" in request.url.params:
            await trio.sleep(2)
        return await fake.handle(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(slow), base_url="http://consul")
    publisher = Publisher(ConsulClient(http), store, LAYOUT, HOST)
    start = trio.current_time()
    with trio.fail_after(60):
        async with http, trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            await fake.until(lambda: len(fake.services) == 12)
            nursery.cancel_scope.cancel()
    assert trio.current_time() - start >= 24
    times = [at - start for at, call in fake.calls if call.startswith("PUT /v1/session/")]
    assert len(times) >= 5  # created, then renewed at least 4 times within the round
    assert max(b - a for a, b in itertools.pairwise(times)) <= 5.0 + 2.0


async def test_outage_is_logged_once_and_caught_up_within_a_second(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with running(fake, store) as consul:
            await until_pictured(consul.source, lambda p: image_of(p, "web") == "web:1")
            fake.set_down(True)
            await trio.sleep(1)
            store.set_state("web", stable("web:2"))  # supervision goes on while Consul is away
            await trio.sleep(59)
            stale_during = consul.source.stale
            assert image_of(consul.source.picture(), "web") == "web:1"  # the last known
            fake.set_down(False)
            back = trio.current_time()
            await fake.until(lambda: (fake.value("web") or {})["image"] == "web:2")
            assert trio.current_time() - back <= MAX_RETRY_DELAY + 0.01
            # The session may have expired meanwhile: renewed first thing.
            assert fake.count("PUT /v1/session/renew/", since=back) == 1
            await until_pictured(consul.source, lambda p: image_of(p, "web") == "web:2")
            assert trio.current_time() - back <= MAX_RETRY_DELAY + 0.1
            assert (stale_during, consul.source.stale) == (True, False)
    events = [entry["event"] for entry in logs]
    assert events.count("consul.unreachable") == 1
    assert events.count("consul.reachable") == 1
    attempts = fake.count("PUT /v1/session/renew/") + fake.count("PUT /v1/kv/")
    assert attempts < 100  # backed off, not a hot loop (60 s at <= 1 s per attempt)


async def test_session_expired_during_outage_is_replaced_and_everything_republished(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(120):
        async with published(fake, store) as consul:
            fake.set_down(True)
            await trio.sleep(30)
            fake.expire("session-1")  # what a 30 s outage does to a 10 s TTL
            fake.set_down(False)
            back = trio.current_time()
            await fake.until(lambda: len(fake.services) == 2)
            assert trio.current_time() - back <= MAX_RETRY_DELAY + 0.01
            assert {fake.holder("web"), fake.holder("db")} == {"session-2"}
            assert consul.publisher.session == "session-2"


async def test_session_lost_behind_our_back_comes_back_before_the_next_renewal(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with published(fake, store):
            await trio.sleep(1)
            lost = trio.current_time()
            fake.expire("session-1")
            await fake.until(lambda: len(fake.services) == 2)
            # The watcher saw the keys go; no need to wait for the renewal at t=5.
            assert trio.current_time() - lost < 0.1
            assert set(fake.sessions) == {"session-2"}
    assert [e["reason"] for e in logs if e["event"] == "consul.session_lost"] == [
        "a write answered that the session is invalid"
    ]


async def test_while_nobody_asks_the_renewals_check_this_hosts_keys_alone(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """Idle (nobody asks for the fleet), the watcher reads nothing, however the others write;
    each renewal (TTL/2) reads this host's keys in one transaction, and what was deleted behind
    the publisher's back (a service key, `.live`, the record) is written again in that round."""
    other = LAYOUT.key("web", "h2")
    with trio.fail_after(60):
        async with running(fake, store, asked=False) as consul:
            await fake.until(lambda: len(fake.services) == 2 and fake.record() is not None)
            await trio.sleep(1)  # (the first round's calls, at t=0, are behind)
            start = trio.current_time()
            for n in range(20):  # another host deploys, again and again
                view = {"state": "Stable", "current": {"image": f"web:{n}"}}
                fake.kv[other] = (encode_value("h2", "web", view, 1.0), None)
                fake.bump()
                await trio.sleep(0.5)
            # Two renewals (t=5, t=10), each with one transaction of 4 gets (web, db, .live,
            # the record); not one read of the prefix.
            assert fake.count("GET /v1/kv/", since=start) == 0
            assert consul.source.requests == 0 and not consul.source.following
            assert fake.count("PUT /v1/txn", since=start) == 2 == consul.publisher.own_checks
            deleted = trio.current_time()
            for key in (LAYOUT.key("web", HOST), LAYOUT.live_key(HOST), LAYOUT.record_key(HOST)):
                del fake.kv[key]
            fake.bump()
            await fake.until(
                lambda: (
                    fake.holder("web") == "session-1"
                    and LAYOUT.live_key(HOST) in fake.kv
                    and fake.record() is not None
                )
            )
            # At the next renewal (t=15): within TTL/2, in the renewal's own round.
            assert trio.current_time() - deleted <= 5.0
            assert fake.count("PUT /v1/session/create") == 1  # the same session throughout
            assert fake.count("PUT /v1/txn", since=deleted) == 2  # one 409 naming the missing


async def test_renewal_404_replaces_the_session(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with trio.fail_after(30):
        async with published(fake, store) as consul:
            # Lost without the keys going (as if the watcher were blind): only the renewal can tell.
            fake.sessions.clear()
            await fake.until(lambda: "session-2" in fake.sessions)
            assert trio.current_time() - start == pytest.approx(5.0)  # the first renewal
            await fake.until(lambda: fake.holder("web") == fake.holder("db") == "session-2")
            assert consul.publisher.published == {"web", "db"}


async def test_a_killed_predecessors_session_is_taken_over(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    fake.sessions["old"] = SESSION_NAME
    fake.sessions["someone-else"] = "condo:condo:h2"
    fake.kv[LAYOUT.key("web", HOST)] = (b"{}", "old")
    fake.kv[LAYOUT.key("web", "h2")] = (b"{}", "someone-else")
    start = trio.current_time()
    with trio.fail_after(10):
        async with running(fake, store):
            await fake.until(lambda: fake.holder("web") == fake.holder("db") == "session-1")
            assert trio.current_time() - start < 0.1
            assert set(fake.sessions) == {"someone-else", "session-1"}
            assert fake.holder("web", "h2") == "someone-else"


async def test_a_key_held_by_another_session_is_reported_once_and_retried(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    fake.sessions["intruder"] = "not-condo"
    fake.kv[LAYOUT.key("web", HOST)] = (b"{}", "intruder")
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running(fake, store) as consul:
            await fake.until(lambda: fake.holder("db") == "session-1")
            await trio.sleep(20)
            assert fake.holder("web") == "intruder"
            assert consul.publisher.published == {"db"}
            fake.expire("intruder")
            released = trio.current_time()
            await fake.until(lambda: fake.holder("web") == "session-1")
            assert trio.current_time() - released <= REFUSED_RETRY_DELAY + 0.01
    held = [e for e in logs if e["event"] == "consul.key_held_elsewhere"]
    assert [e["key"] for e in held] == ["condo/web/h1"]
    assert sum(e["event"] == "consul.key_acquired" for e in logs) == 1


async def test_clean_shutdown_destroys_the_session(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        async with running(fake, store):
            await fake.until(lambda: fake.record() is not None)
    assert fake.sessions == {}
    # The service keys and the liveness go with the session; the record stays: this host still
    # runs web and db (its containers keep running), it is just not watched any more.
    assert set(fake.kv) == {LAYOUT.record_key(HOST)}
    assert fake.record() == {
        "web": {"state": "Stable", "image": "web:1"},
        "db": {"state": "Stable", "image": "db:1"},
    }


async def test_shutdown_with_a_silent_consul_is_bounded(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with published(fake, store):
            fake.hung = True
            stopping = trio.current_time()
        assert trio.current_time() - stopping == pytest.approx(2.0)
    assert [e["event"] for e in logs if e["event"].startswith("consul.session_")][-1] == (
        "consul.session_not_destroyed"
    )


async def test_consul_down_at_start_does_not_delay_start_up(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    fake.down = True
    start = trio.current_time()
    with trio.fail_after(30):
        async with running(fake, store) as consul:
            assert trio.current_time() == start
            assert consul.source.stale
            await trio.sleep(10)
            fake.set_down(False)
            back = trio.current_time()
            await fake.until(lambda: len(fake.services) == 2)
            assert trio.current_time() - back <= MAX_RETRY_DELAY + 0.01


# --- per-key failures ----------------------------------------------------------------------------


async def test_a_key_refused_by_an_acl_blocks_no_other_and_is_retried_with_a_delay(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    # "db" sorts before "web": the refused key comes first in the round.
    denied = LAYOUT.key("db", HOST)
    fake.denied.add(denied)
    metrics = Metrics()
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with running(fake, store) as consul:
            consul.publisher.add_failure_observer(metrics.observe_consul_publish)
            start = trio.current_time()
            await fake.until(lambda: fake.holder("web") == "session-1")
            assert trio.current_time() - start < 0.1
            assert "403" in consul.publisher.failures["db"]
            # Changes of other services come and go; the refused key waits for its delay.
            for n in range(55):
                store.set_state("web", stable(f"web:{n}"))
                await trio.sleep(1)
            await fake.until(lambda: (fake.value("web") or {})["image"] == "web:54")
            attempts = [at - start for at, call in fake.calls if call == f"PUT /v1/kv/{denied}"]
            assert attempts == pytest.approx(
                [n * PERMANENT_RETRY_DELAY for n in range(len(attempts))], abs=0.05
            )
            assert len(attempts) == 6  # 0, 10, ..., 50: no hot loop
            assert metrics.value("condo_consul_publish_failing", service="db") == 1
            # The operator fixes the ACL: written at the next retry, without any change.
            fake.denied.clear()
            fixed = trio.current_time()
            await fake.until(lambda: fake.holder("db") == "session-1")
            assert trio.current_time() - fixed <= PERMANENT_RETRY_DELAY + 0.05
            assert consul.publisher.failures == {}
            assert consul.publisher.published == {"web", "db"}
    failed = [e for e in logs if e["event"] == "consul.publish_failed"]
    assert [(e["service"], e["key"]) for e in failed] == [("db", denied)]  # once, not per retry
    assert [e["service"] for e in logs if e["event"] == "consul.publish_resolved"] == ["db"]
    assert metrics.value("condo_consul_publish_errors_total", service="db") == len(attempts)
    assert metrics.value("condo_consul_publish_failing", service="db") is None


async def test_a_refused_key_is_retried_at_once_when_its_service_changes(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    denied = LAYOUT.key("db", HOST)
    fake.denied.add(denied)
    with trio.fail_after(30):
        async with running(fake, store) as consul:
            await fake.until(lambda: fake.holder("web") == "session-1")
            await trio.sleep(1)
            fake.denied.clear()
            changed = trio.current_time()
            store.set_state("db", stable("db:2"))
            await fake.until(lambda: fake.holder("db") == "session-1")
            assert trio.current_time() - changed < 0.1
            assert consul.publisher.failures == {}


async def test_a_refused_delete_keeps_the_key_and_is_retried(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with published(fake, store) as consul:
            fake.denied.add(LAYOUT.key("db", HOST))
            store.drop("db")
            store.set_state("web", stable("web:2"))  # written although the delete before it failed
            await fake.until(lambda: (fake.value("web") or {})["image"] == "web:2")
            assert fake.holder("db") == "session-1"
            assert "403" in consul.publisher.failures["db"]
            fake.denied.clear()
            fixed = trio.current_time()
            await fake.until(lambda: fake.holder("db") is None)
            assert trio.current_time() - fixed <= PERMANENT_RETRY_DELAY + 0.05
            assert consul.publisher.failures == {}


async def test_a_value_over_the_size_limit_is_not_sent_and_the_others_publish(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    # A service whose view is huge: a (made-up) error message of 600 KiB.
    huge = attrs.evolve(stable("db:1"), error=Failure(message="x" * 600 * 1024, at=1.0))
    store.set_state("db", huge)
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running(fake, store) as consul:
            await fake.until(lambda: fake.holder("web") == "session-1")
            await trio.sleep(30)
            assert fake.count(f"PUT /v1/kv/{LAYOUT.key('db', HOST)}") == 0  # never sent
            assert "over Consul's limit of 524288 bytes" in consul.publisher.failures["db"]
            store.set_state("db", stable("db:2"))  # small again: published at once
            await fake.until(lambda: (fake.value("db") or {}).get("image") == "db:2")
            assert consul.publisher.failures == {}
    assert sum(e["event"] == "consul.publish_failed" for e in logs) == 1


async def test_a_service_removed_while_the_publisher_rechecks_loses_its_key(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    key = LAYOUT.key("db", HOST)
    with trio.fail_after(30):
        async with published(fake, store) as consul:
            await until_pictured(consul.source, lambda p: len(p.hosts.get(HOST, {})) == 2)

            # The interleaving: a read that misses "db" (as one from just before its write
            # would) makes the publisher's re-check stop trusting db's key, and "db" leaves the
            # store in that same instant, before the round that would rewrite it.
            def remove_db() -> None:
                if "db" in store.entries and "db" not in consul.publisher.published:
                    store.drop("db")

            consul.source.add_read_observer(remove_db)  # runs right after the publisher's check
            fake.hidden.add(key)
            fake.bump()  # a read happens
            await until_pictured(consul.source, lambda p: "db" not in p.hosts[HOST])
            assert "db" not in store.entries
            fake.hidden.clear()
            with trio.move_on_after(5):
                await fake.until(lambda: key not in fake.kv)
            assert key not in fake.kv, "the removed service's key was left behind"
            assert fake.holder("web") == "session-1"


# --- watcher -------------------------------------------------------------------------------------


async def test_picture_skips_foreign_values_and_reports_each_once(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    fake.sessions["s-h2"] = "condo:condo:h2"
    h2_value = json.dumps({"host": "h2", "service": "web", "state": {"state": "Wait"}}).encode()
    fake.kv |= {
        "condo/web/h2": (h2_value, "s-h2"),
        "condo/junk/h3": (b"not json", None),
        "condo/too/deep/key": (h2_value, None),
        "condo/web/h9": (h2_value, None),  # a copy under the wrong host
    }
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with running(fake, store) as consul:
            await fake.until(lambda: len(fake.services) == 6)
            source = consul.source
            while HOST not in source.picture().hosts or len(source.picture().hosts[HOST]) < 2:
                await source.wait_beyond(source.picture().token)
            picture = source.picture()
            assert set(picture.hosts) == {HOST, "h2"}
            assert picture.hosts["h2"] == {"web": {"state": "Wait"}}
            assert picture.token == fake.index
            store.set_state("web", stable("web:2"))  # more reads; the junk is not reported again
            await fake.until(lambda: (fake.value("web") or {})["image"] == "web:2")
            await trio.sleep(1)
    foreign = sorted(e["key"] for e in logs if e["event"] == "consul.foreign_value")
    assert foreign == ["condo/junk/h3", "condo/too/deep/key", "condo/web/h9"]


async def test_thousands_of_waiters_cost_one_query(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(30):
        async with published(fake, store) as consul:
            await trio.sleep(1)
            async with open_crowd(consul.source, 5000) as crowd:
                await trio.sleep(1)
                reads_before = consul.source.reads
                store.set_state("web", stable("web:2"))
            assert crowd.woken == 5000
            # One wake-up of the watcher (two at most: the key, then the record), whatever
            # the number of waiters.
            assert consul.source.reads - reads_before <= 2
            assert consul.source.picture().token > crowd.token


async def test_an_index_that_goes_backwards_reads_afresh(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    store = Store(HOST)
    h2 = {"host": "h2", "service": "web", "state": {"state": "Init"}}
    with trio.fail_after(120):
        async with running(fake, store) as consul:
            await fake.until(lambda: "session-1" in fake.sessions)
            await trio.sleep(1)
            source = consul.source
            old = source.picture().token
            blocked_on = fake.reads[-1]
            assert blocked_on is not None and blocked_on > 3
            # A dev agent restarted behind a proxy: no data, indexes start small again. The
            # blocking read returns at the end of its wait with the smaller index.
            # (This host's liveness key stays, so that the publisher has nothing to rewrite and
            # every index read below is the watcher's own.)
            live = LAYOUT.live_key(HOST)
            fake.kv = {"condo/web/h2": (json.dumps(h2).encode(), None), live: fake.kv[live]}
            fake.index = 3
            fake.modified, fake.deleted = {}, {}
            while "h2" not in source.picture().hosts:
                await source.wait_beyond(source.picture().token)
            assert source.picture().token > old  # tokens only move forward
            await trio.sleep(1)
            after = fake.reads[fake.reads.index(blocked_on) + 1 :]
            assert after[:2] == [None, 3]  # reset: one read without blocking, then block on 3


async def test_wait_beyond_an_old_token_returns_at_once(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        async with published(fake, store) as consul:
            await trio.sleep(1)
            before = trio.current_time()
            await consul.source.wait_beyond(consul.source.picture().token - 1)
            assert trio.current_time() == before


async def test_the_first_read_of_an_empty_prefix_wakes_waiters(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    fake.down = True
    with trio.fail_after(30):
        async with running(fake, Store(HOST)) as consul:
            source = consul.source
            unknown = source.picture()
            await trio.sleep(5)
            fake.set_down(False)
            back = trio.current_time()
            # Same (empty) hosts, same token, but no longer stale: waiters hear of it.
            await source.wait_beyond(unknown.token)
            assert trio.current_time() - back <= MAX_RETRY_DELAY + 0.01
            assert (source.stale, source.picture().token, source.picture().hosts) == (False, 0, {})


# --- liveness and the host's record (multi-host truth) ------------------------------------------


async def test_a_service_is_published_only_after_its_first_reconciliation(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    store = Store(HOST)
    store.set_state("web", ServiceState(desired=ServiceSpec(container={"Image": "web:1"})))
    with trio.fail_after(30):
        async with running(fake, store) as consul:
            await fake.until(lambda: LAYOUT.live_key(HOST) in fake.kv)
            await trio.sleep(5)
            assert fake.services == {}, "a service was published as Init"
            assert fake.record() is None
            store.set_state("web", stable("web:1"))
            await fake.until(
                lambda: fake.record() == {"web": {"state": "Stable", "image": "web:1"}}
            )
            assert consul.publisher.published == {"web"}
            # A spec error is worth showing, Init or not (it never joins the record).
            store.set_state("bad", ServiceState())
            store.set_spec_error("bad", SpecError("bad.edn", "broken", 1), "bad.edn")
            await fake.until(lambda: fake.value("bad") is not None)
            assert set(fake.record() or {}) == {"web"}


async def test_a_restart_keeps_the_record_until_the_store_says_otherwise(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    """The record a previous process wrote is carried over while the new process has not
    reconciled (Init) or not yet learnt of a service (store not settled); a removed service, or
    one the settled store does not have, leaves it."""
    said = {"host": HOST, "services": {
        "web": {"state": "Stable", "image": "web:1"},
        "db": {"state": "Stable", "image": "db:1"},
        "old": {"state": "Stable", "image": "old:1"},
    }, "at": 1.0}  # fmt: skip
    fake.kv[LAYOUT.record_key(HOST)] = (json.dumps(said).encode(), None)
    store = Store(HOST)
    store.set_state("web", ServiceState(desired=ServiceSpec(container={"Image": "web:2"})))
    with trio.fail_after(60):
        async with running(fake, store):
            await fake.until(lambda: LAYOUT.live_key(HOST) in fake.kv)
            await trio.sleep(5)
            assert fake.record() == said["services"]  # nothing known yet: nothing dropped
            store.set_state("web", stable("web:2"))
            await fake.until(lambda: (fake.record() or {}).get("web", {}).get("image") == "web:2")
            assert set(fake.record() or {}) == {"web", "db", "old"}
            store.set_state("db", attrs.evolve(stable("db:1"), desired=None, removed=True))
            await fake.until(lambda: "db" not in (fake.record() or {}))
            assert "old" in (fake.record() or {})  # the store is not settled yet
            store.mark_settled()
            await fake.until(lambda: set(fake.record() or {}) == {"web"})


async def test_a_host_whose_session_lapsed_is_unreachable_not_gone(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """Another host (h2) cut off: Consul expires its session and deletes its keys; its record
    stays, so the watcher still counts it, as unreachable since it was last seen live."""
    fake.sessions["s-h2"] = "condo:condo:h2"
    h2_view = {"state": "Stable", "current": {"image": "web:1"}}
    h2_value = {"host": "h2", "service": "web", "state": h2_view, "at": 1.0}
    h2_record = {"host": "h2", "services": {"web": {"state": "Stable", "image": "web:1"}}}
    fake.kv |= {
        LAYOUT.key("web", "h2"): (json.dumps(h2_value).encode(), "s-h2"),
        LAYOUT.live_key("h2"): (b"{}", "s-h2"),
        LAYOUT.record_key("h2"): (json.dumps(h2_record | {"at": 1.0}).encode(), None),
    }
    with trio.fail_after(60):
        async with running(fake, store) as consul:
            picture = await until_pictured(
                consul.source, lambda p: {"h2", HOST} <= p.records.keys()
            )
            assert picture.records["h2"].live and picture.records["h2"].last_seen is None
            assert evaluate("web", "web:1", picture.hosts, picture.records).hosts == ("h1", "h2")
            await trio.sleep(3)
            lapsed_at = time.time()
            fake.expire("s-h2")
            picture = await until_pictured(consul.source, lambda p: "h2" not in p.hosts)
            record = picture.records["h2"]
            assert not record.live
            assert record.last_seen is not None and record.last_seen <= lapsed_at
            # h1 runs web:2 now; h2 cannot be seen: never done, h2 named as unreachable.
            store.set_state("web", stable("web:2"))
            picture = await until_pictured(consul.source, lambda p: image_of(p, "web") == "web:2")
            verdict = evaluate("web", "web:2", picture.hosts, picture.records)
            assert not verdict.done
            assert verdict.hosts == ("h1", "h2")
            assert verdict.pending == {
                "h2": {
                    "state": UNREACHABLE,
                    "since": record.last_seen,
                    "image": "web:1",
                    "last_state": "Stable",
                }
            }


async def test_the_publisher_holds_its_liveness_and_rewrites_a_forgotten_record(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with running(fake, store):
            await fake.until(lambda: fake.record() is not None)
            live = LAYOUT.live_key(HOST)
            assert fake.kv[live][1] == "session-1"
            # Deleted behind its back (an operator, a `condo forget` of a live host racing):
            del fake.kv[live], fake.kv[LAYOUT.record_key(HOST)]
            fake.bump()
            await fake.until(lambda: live in fake.kv and fake.record() is not None)
            assert fake.kv[live][1] == "session-1"
            assert set(fake.record() or {}) == {"web", "db"}


async def test_a_record_refused_by_an_acl_delays_no_service_key_and_is_reported(
    fake: FakeConsul, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """The record is one more key: a refusal (403) fails it alone, like a service key's; it
    never ends the round (which held every later change of every service for 10 s)."""
    record = LAYOUT.record_key(HOST)
    fake.denied.add(record)
    metrics = Metrics()
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with published(fake, store) as consul:
            consul.publisher.add_failure_observer(metrics.observe_consul_publish)
            for n in range(25):
                changed = trio.current_time()
                image = f"web:{n}"
                store.set_state("web", stable(image))
                await fake.until(lambda: (fake.value("web") or {})["image"] == image)  # noqa: B023
                assert trio.current_time() - changed < 0.1, n
                await trio.sleep(1)
            assert "403" in consul.publisher.failures[RECORDS]
            # Retried when it changes, else on its delay (no hot loop), and written once the ACL
            # allows it.
            quiet = trio.current_time()
            await trio.sleep(35)
            attempts = fake.count(f"PUT /v1/kv/{record}", since=quiet)
            assert attempts == 3, attempts
            assert metrics.value("condo_consul_publish_failing", service=RECORDS) == 1
            fake.denied.clear()
            fixed = trio.current_time()
            await fake.until(lambda: fake.record() is not None)
            assert trio.current_time() - fixed <= PERMANENT_RETRY_DELAY + 0.05
            assert fake.record() == {"web": {"state": "Stable", "image": "web:24"},
                                     "db": {"state": "Stable", "image": "db:1"}}  # fmt: skip
            assert consul.publisher.failures == {}
    failed = [e for e in logs if e["event"] == "consul.publish_failed"]
    assert [(e["service"], e["key"]) for e in failed] == [(RECORDS, record)]
    assert not [e for e in logs if e["event"] == "consul.refused"]


async def test_a_record_over_the_size_limit_is_not_sent_and_keeps_the_last_that_fitted(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    limit = 1000  # every service value fits (~650 bytes); a record of forty services does not
    store = Store(HOST)
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running(fake, store, max_value_size=limit) as consul:
            store.set_state("web", stable("web:1"))
            only_web = {"web": {"state": "Stable", "image": "web:1"}}
            await fake.until(lambda: fake.record() == only_web)
            for n in range(40):
                store.set_state(f"s{n}", stable("s:1"))
            await fake.until(lambda: len(fake.services) == 41)
            await trio.sleep(30)
            assert fake.count(f"PUT /v1/kv/{LAYOUT.record_key(HOST)}") == 1  # the one that fitted
            assert "over Consul's limit" in consul.publisher.failures[RECORDS]
            assert fake.record() == only_web
    assert sum(e["event"] == "consul.publish_failed" for e in logs) == 1


class _Reconciling(FakeConsul):
    """Runs `during` once, when the first write of `key` arrives: a store change that lands
    while a publish round awaits Consul."""

    def __init__(self, key: str, during: Callable[[], None]) -> None:
        super().__init__()
        self._key = key
        self._during: Callable[[], None] | None = during
        self.records: list[dict[str, Any]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1/kv/")
        if request.method == "PUT" and path == self._key and self._during is not None:
            during, self._during = self._during, None
            during()
        response = await super().handle(request)
        if request.method == "PUT" and path == LAYOUT.record_key(HOST):
            self.records.append(json.loads(request.content)["services"])
        return response


async def test_a_service_reconciled_during_a_round_never_leaves_the_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A restart: the record says web and api; api is spawned and reconciled while the first
    round awaits Consul. The record is written from the round's own reading of the store (as the
    keys are), so api never leaves it: its key is not written yet, and a host without key or
    record entry for api would not count for it at all (a wait elsewhere would pass)."""
    said = {
        "web": {"state": "Stable", "image": "web:1"},
        "api": {"state": "Stable", "image": "api:1"},
    }
    store = Store(HOST)
    store.set_state("web", stable("web:2"))
    fake = _Reconciling(LAYOUT.key("web", HOST), lambda: store.set_state("api", stable("api:2")))
    fake.kv[LAYOUT.record_key(HOST)] = (json.dumps({"host": HOST, "services": said}).encode(), None)
    with trio.fail_after(30):
        async with running(fake, store):
            await fake.until(
                lambda: (
                    (fake.record() or {}).get("api", {}).get("image") == "api:2"
                    and fake.value("api") is not None
                )
            )
    assert fake.records, "the record was never rewritten"
    assert all("api" in services for services in fake.records), fake.records


async def test_a_record_forgotten_while_live_is_written_again_with_what_it_carried(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    """A restart: api (in the record) is not reconciled yet when `condo forget` races the host's
    return. The record written again still has api: it runs here, and has no key yet."""
    said = {
        "web": {"state": "Stable", "image": "web:1"},
        "api": {"state": "Stable", "image": "api:1"},
    }
    fake.kv[LAYOUT.record_key(HOST)] = (json.dumps({"host": HOST, "services": said}).encode(), None)
    store = Store(HOST)
    store.set_state("web", stable("web:1"))
    store.set_state("api", ServiceState(desired=ServiceSpec(container={"Image": "api:1"})))
    with trio.fail_after(30):
        async with running(fake, store):
            await fake.until(lambda: fake.value("web") is not None)
            await trio.sleep(1)
            assert fake.record() == said
            del fake.kv[LAYOUT.record_key(HOST)]
            fake.bump()
            await fake.until(lambda: fake.record() is not None)
            assert fake.record() == said


class _Election(FakeConsul):
    """A leader election behind a blocking read: the read in flight hangs on the old leader's
    dead connection, while new calls are answered 500 "No cluster leader" until `leaderless`
    ends (then as usual: the new leader)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaderless = False
        self.frozen: set[int] = set()  # the blocking reads (by serial) cut off with the old leader
        self._reads = 0

    def elect(self) -> None:
        self.leaderless = True
        self.frozen = set(range(self._reads + 1))
        self.wake()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.leaderless:
            self.calls.append((trio.current_time(), f"{request.method} {request.url.path}"))
            await trio.lowlevel.checkpoint()
            return httpx.Response(500, text="No cluster leader")
        if request.method != "GET" or "index" not in request.url.params:
            return await super().handle(request)
        self._reads += 1
        serial = self._reads
        answer = await super().handle(request)
        if serial in self.frozen:
            await trio.sleep_forever()  # its connection died silently with the old leader
        return answer


async def test_a_picture_behind_a_leader_election_is_stale_until_read_again(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """The watcher's blocking read hangs on the old leader (in Consul up to its whole wait, 30 s)
    while the publisher is answered "No cluster leader": the picture is stale from that answer
    on, and the watcher reads again at once, so that it is fresh soon after the election."""
    fake = _Election()
    with trio.fail_after(120):
        async with published(fake, store) as consul:
            await until_pictured(consul.source, lambda p: image_of(p, "web") == "web:1")
            await trio.sleep(1)
            fake.elect()
            elected_at = trio.current_time()
            while (
                consul.publisher.session is not None
                and fake.count("PUT /v1/session/renew/", since=elected_at) == 0
            ):
                await trio.sleep(0.1)
            await trio.sleep(0.5)
            assert consul.source.stale, "a failed call after the last read: the picture is stale"
            # Meanwhile the host moves on; the new leader is there 2 s later.
            store.set_state("web", stable("web:2"))
            await trio.sleep(2)
            fake.leaderless = False
            elected = trio.current_time()
            # Read again at once, not after the old read's wait (it never ends here).
            await until_pictured(consul.source, lambda p: image_of(p, "web") == "web:2")
            assert trio.current_time() - elected < 1.5
            assert not consul.source.stale


@pytest.mark.parametrize("by_folder", [True, False], ids=["by-folder", "whole"])
async def test_a_change_to_one_key_decodes_that_key_alone(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock, by_folder: bool
) -> None:
    """The watcher decodes only the keys whose ModifyIndex moved: of 220 keys (10 hosts x 20
    services, with their `.live` and `.hosts` keys), one rewrite costs one decode. Followed by
    folder (a large prefix), one watch per folder: the change costs the answer of its folder's
    watch and of the prefix's (two requests, that folder's bytes), not one probe per folder;
    its counters say how many requests and bytes it took."""
    hosts, services = [f"h{i}" for i in range(10)], [f"s{j:02d}" for j in range(20)]
    view = {"state": "Stable", "current": {"image": "web:1"}}
    for host in hosts:
        session = f"session-{host}"
        fake.sessions[session] = LAYOUT.session_name(host)
        fake.kv[LAYOUT.live_key(host)] = (encode_live(host, 1.0), session)
        fake.kv[LAYOUT.record_key(host)] = (
            encode_record(host, {s: summary(view) for s in services}, 1.0),
            None,
        )
        for service in services:
            fake.kv[LAYOUT.key(service, host)] = (encode_value(host, service, view, 1.0), session)
    fake.modified = {key: n for n, key in enumerate(sorted(fake.kv), start=1)}
    fake.index = len(fake.kv)
    sizes: list[int] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        response = await fake.handle(request)
        sizes.append(len(response.content))
        return response

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://consul")
    source = ConsulSource(ConsulClient(http), LAYOUT, watch_worth=0 if by_folder else 10**9)
    with trio.fail_after(30):
        async with http, trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await until_pictured(source, lambda p: len(p.hosts) == len(hosts))
            assert source.decodes == len(fake.kv) == 220
            assert source.reads == 1
            assert source.read_bytes == sum(sizes) > 200 * 200
            whole = source.read_bytes
            await trio.sleep(0.5)  # the watches are in flight
            answers = len(sizes)
            token = source.picture().token
            moved = dict(view, state="Deploying")
            key = LAYOUT.key("s07", "h3")
            fake.kv[key] = (encode_value("h3", "s07", moved, 2.0), "session-h3")
            fake.bump()
            fake.modified[key] = fake.index
            picture = await until_pictured(source, lambda p: p.token != token)
            assert picture.hosts["h3"]["s07"] == moved
            assert picture.hosts["h4"]["s07"] == view
            assert source.decodes == 221  # that key alone
            assert source.reads == 2
            await trio.sleep(0.5)  # every answer of that change is in (the prefix's watch too)
            assert source.read_bytes == sum(sizes)
            if by_folder:
                # One watch per folder (22) and one on the prefix were in flight; the change
                # woke its folder's (its 10 keys) and the prefix's (the folders' names): two
                # answers, not the 220 values.
                assert len(sizes) - answers == 2 and source.requests == len(sizes)
                assert sizes[-1] + sizes[-2] == source.read_bytes - whole
                assert source.read_bytes - whole < whole / 10
            else:
                assert len(sizes) - answers == 1 and source.requests == len(sizes)
                assert source.read_bytes - whole > whole * 0.9
            # An index bump outside the prefix (a session renewed, created): by folder, no
            # wake-up at all (the fake's whole reads wake on any index); nothing decoded.
            fake.bump()
            await trio.sleep(1)
            assert source.decodes == 221
            assert source.reads == 2
            assert source.picture().token == picture.token
            nursery.cancel_scope.cancel()


async def test_a_prefix_of_too_many_folders_is_read_whole(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every folder's watch holds a connection to the agent (which takes 200 at once from one
    address): beyond MAX_WATCHES folders, however large the prefix, it is read whole (one
    blocking read in flight); a folder that appears while followed by folder switches too."""
    monkeypatch.setattr(source_module, "MAX_WATCHES", 4)
    view = {"state": "Stable", "current": {"image": "web:1"}}
    fake.sessions["session-h"] = LAYOUT.session_name("h")
    for service in ("s1", "s2"):
        fake.kv[LAYOUT.key(service, "h")] = (encode_value("h", service, view, 1.0), "session-h")
    flying = 0  # requests in flight

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal flying
        flying += 1
        try:
            return await fake.handle(request)
        finally:
            flying -= 1

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://consul")
    source = ConsulSource(ConsulClient(http), LAYOUT, watch_worth=0)
    with trio.fail_after(30):
        async with http, trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await until_pictured(source, lambda p: len(p.hosts.get("h", {})) == 2)
            await trio.sleep(1)
            assert flying == 3  # two folders' watches and the prefix's
            for service in ("s3", "s4", "s5"):
                key = LAYOUT.key(service, "h")
                fake.kv[key] = (encode_value("h", service, view, 1.0), "session-h")
                fake.bump()
            await until_pictured(source, lambda p: len(p.hosts["h"]) == 5)
            await trio.sleep(1)
            assert flying == 1  # one whole read, blocking
            nursery.cancel_scope.cancel()


async def test_a_quiet_folder_whose_wait_runs_out_costs_no_whole_read(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock
) -> None:
    """A folder's watch starts from the whole read's index, which is beyond the folder's own
    (Consul's index of a prefix is its newest write): when its wait runs out, Consul answers
    the folder's own, smaller index. That is no agent gone backwards: followed by folder, a
    quiet prefix costs one answer per folder and wait, never a whole read again."""
    view = {"state": "Stable", "current": {"image": "web:1"}}
    fake.sessions["session-h"] = LAYOUT.session_name("h")
    for service in ("s1", "s2"):
        fake.kv[LAYOUT.key(service, "h")] = (encode_value("h", service, view, 1.0), "session-h")
        fake.bump()
    fake.kv[LAYOUT.key("s3", "h")] = (encode_value("h", "s3", view, 1.0), "session-h")
    fake.bump()  # the newest write: the prefix's index, beyond s1's and s2's
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle), base_url="http://consul")
    source = ConsulSource(ConsulClient(http), LAYOUT, watch_worth=0)
    with trio.fail_after(300):
        async with http, trio.open_nursery() as nursery:
            await nursery.start(source.run)
            nursery.start_soon(asking, source)  # followed throughout (beyond the linger)
            await until_pictured(source, lambda p: len(p.hosts.get("h", {})) == 3)
            whole = fake.reads.count(None)
            await trio.sleep(3 * BLOCKING_WAIT + 5)  # three waits run out
            assert fake.reads.count(None) == whole  # no whole read (nor folder read) again
            assert source.reads == 1
            assert not source.stale
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("by_folder", [True, False], ids=["by-folder", "whole"])
async def test_a_forget_never_leaves_the_picture_behind_what_the_watcher_read(
    fake: FakeConsul, autojump_clock: trio.testing.MockClock, by_folder: bool
) -> None:
    """`forget` reads the prefix (then the sessions) and applies that read: a change the
    watcher applied in between is newer than it. The picture must come back to the newer one
    at once, not stay behind until that folder changes again (its watch blocks beyond it)."""
    view = {"state": "Stable", "current": {"image": "web:1"}}
    fake.sessions["session-h"] = LAYOUT.session_name("h")
    fake.kv[LAYOUT.live_key("h")] = (encode_live("h", 1.0), "session-h")
    fake.kv[LAYOUT.key("web", "h")] = (encode_value("h", "web", view, 1.0), "session-h")
    fake.kv[LAYOUT.record_key("gone")] = (encode_record("gone", {}, 1.0), None)
    fake.bump()
    moved = dict(view, current={"image": "web:2"})

    def image(picture: Picture) -> str | None:
        return image_of(picture, "web", "h")

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/session/list":  # forget's second call: a change meanwhile
            key = LAYOUT.key("web", "h")
            fake.kv[key] = (encode_value("h", "web", moved, 2.0), "session-h")
            fake.bump()
            fake.modified[key] = fake.index
            await until_pictured(source, lambda p: image(p) == "web:2")
        return await fake.handle(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://consul")
    source = ConsulSource(ConsulClient(http), LAYOUT, watch_worth=0 if by_folder else 10**9)
    with trio.fail_after(60):
        async with http, trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await until_pictured(source, lambda p: image(p) == "web:1")
            await trio.sleep(1)  # followed (by folder, or one whole blocking read)
            await source.forget("gone")
            assert fake.record("gone") is None
            with trio.fail_after(2):
                await until_pictured(source, lambda p: image(p) == "web:2")
            await trio.sleep(1)
            assert image(source.picture()) == "web:2"
            nursery.cancel_scope.cancel()

"""condo.consul against the real Consul agent (127.0.0.1:8500): keys, values, sessions, the
watcher. No Docker here: the store is fed states directly; tests/integration/test_consul_hosts.py
runs whole condos on the engine.

Every test works under its own prefix `condo-test/<uuid>` and removes it (and any session named
for it) at teardown, so tests and sessions sharing the agent never see each other's keys.
"""

from __future__ import annotations

import base64
import functools
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import structlog
import trio

from condo.config import Config
from condo.consul import (
    SESSION_TTL,
    ConsulClient,
    ConsulRunning,
    ConsulSource,
    KeyLayout,
    run_consul,
)
from condo.errors import ForgetRefused
from condo.store import Store
from condo.waiting import Picture
from tests.consul_support import asking, open_crowd, stable, until_pictured

pytestmark = pytest.mark.consul

AGENT = "http://127.0.0.1:8500"
HOST = "consul-test-host"


# --- helpers shared with test_consul_hosts.py ----------------------------------------------------


@attrs.frozen
class Area:
    """One test's corner of the agent: its prefix, and a plain client to look behind condo."""

    prefix: str
    http: httpx.AsyncClient

    async def keys(self) -> dict[str, dict[str, Any]]:
        """The service keys: key -> the raw KV entry (with `Session`, and `Value` decoded as
        JSON when it is). Hosts' liveness and records (`.live/`, `.hosts/`) are left out."""
        return _services(await self.all_keys())

    async def all_keys(self) -> dict[str, dict[str, Any]]:
        """Every key under the prefix, liveness and records too."""
        response = await self.http.get(f"/v1/kv/{self.prefix}/", params={"recurse": "true"})
        return _entries(response)

    async def sessions(self) -> dict[str, dict[str, Any]]:
        """id -> session info, for the sessions of this area (named `condo:<prefix>:<host>`)."""
        response = await self.http.get("/v1/session/list")
        response.raise_for_status()
        return {s["ID"]: s for s in response.json() if f":{self.prefix}:" in s["Name"]}

    async def until_keys(
        self, predicate: Callable[[dict[str, dict[str, Any]]], bool]
    ) -> dict[str, dict[str, Any]]:
        """Follow the prefix with blocking queries (no polling) until `predicate` holds."""
        index = 0
        while True:
            params = {"recurse": "true"} | ({"index": str(index), "wait": "5s"} if index else {})
            response = await self.http.get(f"/v1/kv/{self.prefix}/", params=params)
            keys = _services(_entries(response))
            if predicate(keys):
                return keys
            new = int(response.headers["X-Consul-Index"])
            index = new if new >= index else 0


def _services(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in entries.items() if not k.split("/")[-2].startswith(".")}


def _entries(response: httpx.Response) -> dict[str, dict[str, Any]]:
    if response.status_code == 404:
        return {}
    response.raise_for_status()
    entries: dict[str, dict[str, Any]] = {}
    for entry in response.json():
        raw = base64.b64decode(entry["Value"]) if entry["Value"] else b""
        try:
            entry["Value"] = json.loads(raw)
        except ValueError:  # somebody else's bytes: keep them raw
            entry["Value"] = raw
        entries[entry["Key"]] = entry
    return entries


@asynccontextmanager
async def consul_area() -> AsyncIterator[Area]:
    """A fresh prefix on the real agent; everything under it (and its sessions) gone after."""
    async with httpx.AsyncClient(base_url=AGENT, timeout=10) as http:
        leader = await http.get("/v1/status/leader")  # fails the test when no agent answers
        assert leader.status_code == 200 and leader.json(), "Consul agent has no leader"
        area = Area(prefix=f"condo-test/{uuid.uuid4().hex[:12]}", http=http)
        try:
            yield area
        finally:
            with trio.move_on_after(10, shield=True):
                for session in await area.sessions():
                    await http.put(f"/v1/session/destroy/{session}")
                await http.delete(f"/v1/kv/{area.prefix}", params={"recurse": "true"})


def image_of(picture: Picture, service: str, host: str) -> str | None:
    view = picture.hosts.get(host, {}).get(service)
    if view is None or view.get("state") != "Stable" or view["current"] is None:
        return None
    return str(view["current"]["image"])


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def area() -> AsyncIterator[Area]:
    async with consul_area() as area:
        yield area


def config_for(area: Area, tmp_path: Path, host: str = HOST) -> Config:
    return Config(
        prefixes=(tmp_path,),
        state_path=tmp_path / "state.json",
        host=host,
        expose="consul",
        consul_prefix=area.prefix,
    )


async def start(nursery: trio.Nursery, config: Config, store: Store) -> ConsulSource:
    consul: ConsulRunning = await nursery.start(functools.partial(run_consul, config, store))
    return consul.source


# --- tests ---------------------------------------------------------------------------------------


async def test_keys_layout_values_and_session(area: Area, tmp_path: Path) -> None:
    store = Store(HOST)
    store.set_state("web", stable("condo-test/healthy:1"))
    store.set_state("a b%c", stable("condo-test/busybox:1"))  # characters URLs care about
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start(nursery, config_for(area, tmp_path), store)
            keys = await area.until_keys(lambda k: len(k) == 2)
            assert set(keys) == {f"{area.prefix}/web/{HOST}", f"{area.prefix}/a b%c/{HOST}"}
            sessions = await area.sessions()
            assert len(sessions) == 1
            ((sid, session),) = sessions.items()
            assert session["Name"] == f"condo:{area.prefix}:{HOST}"
            assert (session["TTL"], session["Behavior"], session["LockDelay"]) == (
                "10s",
                "delete",
                0,
            )
            assert {entry["Session"] for entry in keys.values()} == {sid}
            web = keys[f"{area.prefix}/web/{HOST}"]["Value"]
            assert (web["host"], web["service"]) == (HOST, "web")
            assert web["state"]["state"] == "Stable"
            assert web["state"]["current"]["image"] == "condo-test/healthy:1"
            assert web["state"] == json.loads(json.dumps(store.view()["services"]["web"]))

            # A change is written; a service that leaves the store loses its key.
            store.set_state("web", stable("condo-test/healthy:2"))
            store.drop("a b%c")
            keys = await area.until_keys(
                lambda k: (
                    len(k) == 1
                    and k[f"{area.prefix}/web/{HOST}"]["Value"]["state"]["current"]["image"]
                    == "condo-test/healthy:2"
                )
            )
            # Beside them: the host's liveness, held by the same session, and its record,
            # held by none, saying what the host runs now.
            every = await area.all_keys()
            live, record = f"{area.prefix}/.live/{HOST}", f"{area.prefix}/.hosts/{HOST}"
            assert every[live]["Session"] == sid
            while (every[record]["Value"]["services"]) != {
                "web": {"state": "Stable", "image": "condo-test/healthy:2"}
            }:
                await trio.sleep(0.05)
                every = await area.all_keys()
            assert "Session" not in every[record] or every[record]["Session"] is None
            nursery.cancel_scope.cancel()
    # A clean shutdown ends the session: the liveness goes, the record stays (the containers
    # run on; a wait must not forget them).
    every = await area.all_keys()
    assert live not in every
    assert every[record]["Value"]["services"] == {
        "web": {"state": "Stable", "image": "condo-test/healthy:2"}
    }


@pytest.mark.parametrize("asked", [True, False], ids=["followed", "idle"])
async def test_session_destroyed_behind_condos_back_comes_back(
    area: Area, tmp_path: Path, asked: bool
) -> None:
    """Followed (somebody asks for the fleet), the watcher's next read shows it (within 2 s);
    idle, the next renewal does (404: every TTL/2)."""
    store = Store(HOST)
    store.set_state("web", stable("condo-test/healthy:1"))
    store.set_state("db", stable("condo-test/busybox:1"))
    bound = 2.0 if asked else SESSION_TTL / 2 + 2.0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            source = await start(nursery, config_for(area, tmp_path), store)
            if asked:
                nursery.start_soon(asking, source)
            before = await area.until_keys(lambda k: len(k) == 2)
            (old,) = {e["Session"] for e in before.values()}
            destroyed = await area.http.put(f"/v1/session/destroy/{old}")
            assert destroyed.status_code == 200
            lost_at = trio.current_time()
            after = await area.until_keys(
                lambda k: len(k) == 2 and {e["Session"] for e in k.values()} != {old}
            )
            assert trio.current_time() - lost_at < bound
            (new,) = {e["Session"] for e in after.values()}
            assert set(await area.sessions()) == {new}
            nursery.cancel_scope.cancel()


async def test_clean_shutdown_removes_every_key_at_once(area: Area, tmp_path: Path) -> None:
    store = Store(HOST)
    store.set_state("web", stable("condo-test/healthy:1"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start(nursery, config_for(area, tmp_path), store)
            await area.until_keys(lambda k: len(k) == 1)
            nursery.cancel_scope.cancel()
        # No waiting: the session was destroyed before run_consul returned.
        assert await area.keys() == {}
        assert await area.sessions() == {}


async def test_a_predecessors_session_is_taken_over_at_once(area: Area, tmp_path: Path) -> None:
    # What a condo killed a moment ago leaves: its session, holding its keys for up to 20 s.
    predecessor = {"TTL": "60s", "Behavior": "delete", "LockDelay": "0s"}
    created = await area.http.put(
        "/v1/session/create", json={"Name": f"condo:{area.prefix}:{HOST}", **predecessor}
    )
    stale = created.json()["ID"]
    key = f"{area.prefix}/web/{HOST}"
    held = await area.http.put(f"/v1/kv/{key}", params={"acquire": stale}, content=b"{}")
    assert held.text.strip() == "true"
    store = Store(HOST)
    store.set_state("web", stable("condo-test/healthy:1"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            await start(nursery, config_for(area, tmp_path), store)
            keys = await area.until_keys(
                lambda k: key in k and k[key]["Session"] not in (None, stale)
            )
            assert trio.current_time() - started < 2.0
            assert keys[key]["Value"]["state"]["state"] == "Stable"
            assert stale not in await area.sessions()
            nursery.cancel_scope.cancel()


async def test_source_pictures_every_host_and_skips_foreign_values(
    area: Area, tmp_path: Path
) -> None:
    store = Store(HOST)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            source = await start(nursery, config_for(area, tmp_path), store)
            # An empty prefix (Consul answers 404) is an empty picture, and a fresh one.
            await until_pictured(source, lambda p: not source.stale)
            assert source.picture().hosts == {}
            other = {"host": "h2", "service": "web", "state": {"state": "Wait", "current": None}}
            for key, value in {
                f"{area.prefix}/web/h2": json.dumps(other).encode(),
                f"{area.prefix}/junk/h3": b"not json at all",
                f"{area.prefix}/web/h4": json.dumps(other).encode(),  # another host's copy
                f"{area.prefix}/deeper/x/y": json.dumps(other).encode(),
                f"{area.prefix}/empty/h5": b"",
            }.items():
                assert (await area.http.put(f"/v1/kv/{key}", content=value)).text.strip() == "true"
            store.set_state("web", stable("condo-test/healthy:1"))
            picture = await until_pictured(source, lambda p: {"h2", HOST} <= set(p.hosts))
            assert set(picture.hosts) == {"h2", HOST}
            assert picture.hosts["h2"] == {"web": other["state"]}
            assert image_of(picture, "web", HOST) == "condo-test/healthy:1"
            nursery.cancel_scope.cancel()


async def test_thousands_of_waiters_cost_one_query(area: Area) -> None:
    reads = 0

    async def count(request: httpx.Request) -> None:
        nonlocal reads
        if request.url.path.startswith("/v1/kv/"):
            reads += 1

    key = f"{area.prefix}/web/h2"
    value = {"host": "h2", "service": "web", "state": {"state": "Init"}}
    with trio.fail_after(30):
        async with (
            httpx.AsyncClient(base_url=AGENT, event_hooks={"request": [count]}) as http,
            trio.open_nursery() as nursery,
        ):
            source = ConsulSource(ConsulClient(http), KeyLayout.of(area.prefix))
            await nursery.start(source.run)
            await until_pictured(source, lambda p: not source.stale)
            async with open_crowd(source, 3000) as crowd:
                await trio.sleep(0.5)
                before = reads
                await area.http.put(f"/v1/kv/{key}", content=json.dumps(value).encode())
            assert crowd.woken == 3000
            # The blocking read that was waiting answered; one more started after it.
            assert reads - before <= 2
            assert source.picture().hosts == {"h2": {"web": {"state": "Init"}}}
            nursery.cancel_scope.cancel()


async def test_consul_away_at_start_up_delays_nothing_and_logs_once(
    area: Area, tmp_path: Path
) -> None:
    # A port nobody listens on: every call is refused at once, as with a stopped agent's host.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = attrs.evolve(config_for(area, tmp_path), consul_endpoint=f"http://127.0.0.1:{port}")
    store = Store(HOST)
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            asked = trio.current_time()
            source = await start(nursery, config, store)
            assert trio.current_time() - asked < 0.5  # started() does not wait for Consul
            for n in range(50):  # the store (and so every driver) is never held up
                store.set_state("web", stable(f"condo-test/busybox:{n}"))
            await trio.sleep(3)
            assert source.stale
            assert source.picture().hosts == {}
            nursery.cancel_scope.cancel()
    unreachable = [e for e in logs if e["event"] == "consul.unreachable"]
    assert len(unreachable) == 1  # once, not per retry
    assert "ConnectError" in unreachable[0]["error"]


async def test_forget_refuses_a_host_whose_session_lives_without_its_keys(area: Area) -> None:
    """A live condo whose `.live` key was deleted by hand, holding no service key (all `Init` at
    a restart, or refused by an ACL), still holds its session: it is live, never forgotten."""
    created = await area.http.put(
        "/v1/session/create",
        json={"Name": f"condo:{area.prefix}:h2", "TTL": "60s", "Behavior": "delete"},
    )
    session = created.json()["ID"]
    record_key = f"{area.prefix}/.hosts/h2"
    record = {"host": "h2", "services": {"web": {"state": "Stable", "image": "x:1"}}, "at": 1.0}
    await area.http.put(f"/v1/kv/{record_key}", content=json.dumps(record).encode())
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=AGENT, timeout=10) as http:
            source = ConsulSource(ConsulClient(http), KeyLayout.of(area.prefix))
            with pytest.raises(ForgetRefused) as refused:
                await source.forget("h2")
            assert refused.value.reason == "live", refused.value
            assert record_key in await area.all_keys()
            # Its condo stops (the session ends): now it may go.
            await area.http.put(f"/v1/session/destroy/{session}")
            await source.forget("h2")
            assert record_key not in await area.all_keys()

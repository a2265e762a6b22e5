"""Simulated hosts for the dashboard's fleet tests: as bench/multihost.py's simulated cell does,
each host is a `Store` published into the real Consul by condo's own `Publisher` (one session
per host, real Consul traffic, no containers), here in the test's own Trio loop.

`simulated_hosts(prefix, stem, count, names, image)` yields the stores once every key is in
Consul; setting a store's state (`sim_deploying`, `sim_stable`) publishes that host's change, as
a real condo would. Leaving it cancels the publishers, which destroy their sessions.

`SimFleet` does the same host by host, for tests that make hosts come and go: `start` (a new
session: the host is live again), `stop` (its session destroyed, its record kept: unreachable),
`forget` (its record deleted too: gone, as `condo hosts forget` does). `sim_store` is such a
host's store; `fleet_beside(condo)` a `SimFleet` on a fresh Consul prefix that the test's real
condo joins (`expose_consul(fleet.layout.prefix)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import attrs
import httpx
import trio

from condo.consul import ConsulClient, KeyLayout, Publisher
from condo.fsm import Box, Phase, ServiceState
from condo.spec import ServiceSpec
from condo.store import Store
from tests.browser.dashboard import stop_condo
from tests.integration.harness import CondoUnderTest
from tests.integration.test_consul_session import consul_area

AGENT = "http://127.0.0.1:8500"
BATCH = 10  # hosts started at a time, as a fleet comes up (bench/multihost.py SIM_BATCH)
PUBLISH_LIMIT = 60.0  # s: every simulated key in Consul


def _box(service: str, image: str, created_at: float) -> Box:
    spec = ServiceSpec(container={"Image": image})
    return Box(id=f"sim-{service}-{image}", name=f"{service}_sim", spec=spec,
               created_at=created_at, healthcheck=False, stable_at=created_at)  # fmt: skip


def sim_stable(service: str, image: str, created_at: float) -> ServiceState:
    box = _box(service, image, created_at)
    return ServiceState(phase=Phase.Stable, desired=box.spec, current=box)


def sim_deploying(service: str, old: str, image: str, created_at: float) -> ServiceState:
    current, candidate = _box(service, old, created_at), _box(service, image, created_at)
    return ServiceState(phase=Phase.Wait, desired=candidate.spec, current=current, next=candidate)


def sim_store(host: str, services: dict[str, str], created_at: float) -> Store:
    """The store of a host running each of `services` (name → image) Stable, settled."""
    store = Store(host)
    for name, image in services.items():
        store.set_state(name, sim_stable(name, image, created_at))
    store.mark_settled()
    return store


@contextlib.asynccontextmanager
async def simulated_hosts(
    prefix: str, stem: str, count: int, names: Sequence[str], image: str, created_at: float
) -> AsyncIterator[list[Store]]:
    """`count` hosts `<stem>001`... running every one of `names` Stable on `image`."""
    layout = KeyLayout.of(prefix)
    running = dict.fromkeys(names, image)
    stores = [sim_store(f"{stem}{i:03d}", running, created_at) for i in range(1, count + 1)]
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with (
        httpx.AsyncClient(base_url=AGENT, limits=limits, trust_env=False, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        client = ConsulClient(http)
        publishers = [Publisher(client, store, layout, store.host) for store in stores]
        with trio.fail_after(PUBLISH_LIMIT):
            for first in range(0, count, BATCH):
                batch = publishers[first : first + BATCH]
                for publisher in batch:
                    await nursery.start(publisher.run)
                # The publishers have no event for "confirmed"; a tenth of a second is nothing.
                while not all(len(p.published) == len(names) for p in batch):
                    await trio.sleep(0.1)
        try:
            yield stores
        finally:
            nursery.cancel_scope.cancel()


@attrs.define
class SimFleet:
    """Simulated hosts on `layout`'s prefix, each with a publisher of its own (see the module)."""

    client: ConsulClient
    layout: KeyLayout
    nursery: trio.Nursery
    running: dict[str, trio.CancelScope] = attrs.Factory(dict)

    async def start(self, store: Store) -> None:
        """Publish `store` (a new session) until `stop`; returns once Consul has every key."""
        assert store.host not in self.running, store.host
        publisher = Publisher(self.client, store, self.layout, store.host)
        scope = trio.CancelScope()
        self.running[store.host] = scope

        async def publish() -> None:
            with scope:
                await publisher.run()

        self.nursery.start_soon(publish)
        with trio.fail_after(PUBLISH_LIMIT):
            while len(publisher.published) < len(store.view()["services"]):
                await trio.sleep(0.05)

    async def stop(self, host: str) -> None:
        """End the host's session, as a killed condo's lapses: its record stays (unreachable)."""
        self.running.pop(host).cancel()
        with trio.fail_after(PUBLISH_LIMIT):
            while await self.client.read_key(self.layout.live_key(host)) is not None:
                await trio.sleep(0.05)

    async def forget(self, host: str) -> None:
        """Delete a stopped host's record: the host is gone."""
        assert host not in self.running, host
        await self.client.delete(self.layout.record_key(host))


@contextlib.asynccontextmanager
async def sim_fleet(prefix: str) -> AsyncIterator[SimFleet]:
    """A `SimFleet` on `prefix`; leaving it stops every host still running."""
    async with (
        httpx.AsyncClient(base_url=AGENT, trust_env=False, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        try:
            yield SimFleet(client=ConsulClient(http), layout=KeyLayout.of(prefix), nursery=nursery)
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def fleet_beside(condo: CondoUnderTest) -> AsyncIterator[SimFleet]:
    """A `SimFleet` on a fresh Consul prefix, for `condo` to join; leaving it stops `condo`
    (SIGTERM) first: a condo still running would publish into the prefix as it is deleted."""
    async with consul_area() as area, sim_fleet(area.prefix) as fleet:
        try:
            yield fleet
        finally:
            with trio.move_on_after(15, shield=True):
                await stop_condo(condo, graceful=True)

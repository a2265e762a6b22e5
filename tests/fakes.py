"""A typed in-memory engine for MockClock tests of the service driver's timing logic.

It implements condo.service.ContainerEngine (mypy checks it against the Protocol). It is never
evidence that a feature works with Docker; the integration tests are. It only lets virtual
time run fast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from condo.docker import Container, ContainerId, ContainerSummary
from condo.errors import (
    ContainerNotFound,
    DockerApiError,
    DockerTimeout,
    ForgetRefused,
    ImageNotFound,
    NameConflict,
)
from condo.service import ContainerEngine
from condo.waiting import HostDirectory, HostRecord, HostsView, Picture, StateSource


@attrs.define
class FakeContainer:
    id: str
    name: str
    body: dict[str, Any]
    running: bool = False
    health: str | None = None
    exit_code: int = 0


@attrs.define
class FakeEngine:
    """Images on the engine, images in the registry, containers; and what was called."""

    local_images: set[str] = attrs.Factory(set)
    registry_images: set[str] = attrs.Factory(set)
    healthchecked: set[str] = attrs.Factory(set)  # images with a HEALTHCHECK
    pull_hangs: bool = False
    create_answer_lost: bool = False  # create succeeds, but its answer never arrives
    stop_delay: float = 0.0
    # The next `slow_starts` starts (removes) act at once but answer only after `slow_delay`
    # seconds: a slow engine whose answers come too late for condo's limits.
    slow_starts: int = 0
    slow_removes: int = 0
    slow_delay: float = 0.0
    failing_stops: int = 0  # the next stops fail with a 500 (the engine in trouble)
    containers: dict[str, FakeContainer] = attrs.Factory(dict)
    calls: list[str] = attrs.Factory(list)
    _serial: int = 0

    async def image_present(self, image: str) -> bool:
        await trio.lowlevel.checkpoint()
        return image in self.local_images

    async def pull(self, image: str) -> None:
        self.calls.append(f"pull {image}")
        if self.pull_hangs:
            await trio.sleep_forever()
        await trio.sleep(0.1)
        if image not in self.registry_images:
            raise ImageNotFound(404, f"manifest for {image} not found")
        self.local_images.add(image)

    async def create(self, body: Mapping[str, Any], *, name: str) -> ContainerId:
        await trio.lowlevel.checkpoint()
        if body["Image"] not in self.local_images:
            raise ImageNotFound(404, f"No such image: {body['Image']}")
        if any(c.name == name for c in self.containers.values()):
            raise NameConflict(409, f"name {name} is in use")
        self._serial += 1
        cid = f"c{self._serial}"
        self.containers[cid] = FakeContainer(id=cid, name=name, body=dict(body))
        self.calls.append(f"create {name}")
        if self.create_answer_lost:
            self.create_answer_lost = False
            raise DockerTimeout(f"POST /containers/create?name={name}: timed out")
        return ContainerId(cid)

    async def start(self, cid: ContainerId) -> None:
        await trio.lowlevel.checkpoint()
        box = self._get(cid)
        box.running = True
        if box.body["Image"] in self.healthchecked:
            box.health = "starting"
        self.calls.append(f"start {box.name}")
        if self.slow_starts > 0:
            self.slow_starts -= 1
            await trio.sleep(self.slow_delay)

    async def stop(self, cid: ContainerId, *, grace: float) -> None:
        box = self._get(cid)
        self.calls.append(f"stop {box.name}")
        if self.failing_stops > 0:
            self.failing_stops -= 1
            raise DockerApiError(500, "the engine is in trouble")
        await trio.sleep(min(self.stop_delay, grace))
        box.running = False

    async def remove(self, cid: ContainerId) -> None:
        await trio.lowlevel.checkpoint()
        box = self._get(cid)
        self.calls.append(f"remove {box.name}")
        if self.slow_removes > 0:
            self.slow_removes -= 1
            await trio.sleep(self.slow_delay)  # cut short by condo's limit: nothing removed
        del self.containers[box.id]

    async def inspect(self, cid_or_name: str) -> Container:
        await trio.lowlevel.checkpoint()
        box = self._get(cid_or_name)
        return Container(
            id=ContainerId(box.id),
            name=box.name,
            image=box.body["Image"],
            labels=box.body.get("Labels") or {},
            status="running" if box.running else "exited",
            running=box.running,
            health=box.health,
            exit_code=box.exit_code,
            created_at=0.0,
            restart_policy="",
        )

    async def image_digests(self, image: str) -> tuple[str, ...]:
        await trio.lowlevel.checkpoint()
        return ()  # its images come from no registry (and its containers name no image id)

    async def list_containers(self, *, labels: Mapping[str, str]) -> list[ContainerSummary]:
        await trio.lowlevel.checkpoint()
        rows = []
        for box in self.containers.values():
            have = box.body.get("Labels") or {}
            if all(have.get(k) == v for k, v in labels.items()):
                rows.append(
                    ContainerSummary(
                        id=ContainerId(box.id),
                        name=box.name,
                        image=box.body["Image"],
                        labels=have,
                        state="running" if box.running else "exited",
                        created_at=0.0,
                    )
                )
        return rows

    async def rename(self, cid: ContainerId, new_name: str) -> None:
        await trio.lowlevel.checkpoint()
        self._get(cid).name = new_name
        self.calls.append(f"rename {new_name}")

    def _get(self, cid: str) -> FakeContainer:
        for box in self.containers.values():
            if cid in (box.id, box.name):
                return box
        raise ContainerNotFound(404, f"No such container: {cid}")


class FakeHosts:
    """A StateSource over a picture the test sets (what condo.consul provides for real)."""

    def __init__(self, hosts: HostsView, records: Mapping[str, HostRecord] | None = None) -> None:
        self._picture = Picture(token=1, hosts=hosts, records=records or {})
        self._changed = trio.Event()
        self.stale = False  # a test may set it (`set_stale`), as if the source could not be read
        self.read_at: float | None = None
        self.forgotten: list[str] = []
        self.demand_held = 0  # holders of `demand()` now (ConsulSource follows while any)
        self.following = True

    def set(self, hosts: HostsView, records: Mapping[str, HostRecord] | None = None) -> None:
        self._picture = Picture(token=self._picture.token + 1, hosts=hosts, records=records or {})
        self._wake()

    def set_stale(self, stale: bool) -> None:
        self.stale = stale
        self._wake()  # as ConsulSource does: a change of staleness wakes waiters

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def forget(self, host: str) -> None:
        """A HostDirectory over the picture: the rules ConsulSource applies to a fresh read."""
        await trio.lowlevel.checkpoint()
        if self.stale:
            raise ForgetRefused("Consul cannot be read", reason="unavailable")
        record = self._picture.records.get(host)
        if host in self._picture.hosts or (record is not None and record.live):
            raise ForgetRefused(f"{host} is live", reason="live")
        if record is None:
            raise ForgetRefused(f"no host {host!r}", reason="unknown")
        self.forgotten.append(host)

    def picture(self) -> Picture:
        return self._picture

    async def wait_beyond(self, token: int) -> None:
        if self._picture.token <= token:
            with self.demand():
                await self._changed.wait()  # a new picture, or a change of staleness

    @contextmanager
    def demand(self) -> Iterator[None]:
        self.demand_held += 1
        try:
            yield
        finally:
            self.demand_held -= 1

    async def fresh(self) -> None:
        await trio.lowlevel.checkpoint()


def _typecheck(engine: FakeEngine) -> ContainerEngine:
    return engine  # mypy proves the fake satisfies the driver's port


def _typecheck_hosts(hosts: FakeHosts) -> StateSource:
    return hosts  # and this one the web app's


def _typecheck_directory(hosts: FakeHosts) -> HostDirectory:
    return hosts

"""A fault-injecting, in-memory Docker engine for the model-based fault search (test_fault_search).

It is never evidence that a feature works with Docker: the integration tests are. It exists so
that the search can drive the real supervisor and drivers through thousands of interleavings of
faults on Trio's MockClock.

Owns: `World`, the engine's containers and everything done to them (creates, touches), which
outlives any condo process; `Handle`, one condo process's connection to it (what `run_condo`
gets through its `open_engine` seam, duck-typing `condo.docker.DockerClient`).

Faults (a plan the search sets, consumed by the next matching calls):
- `slow`: the engine acts after `delay` seconds; the client gives up at its own timeout (30 s,
  a stop's grace + 30 s) with DockerTimeout. A cancelled or timed-out call still acts: the
  engine never hears that the client went away.
- `lost`: the engine acts, the answer is lost (DockerTimeout).
- `e404`: somebody removed the container just before the call (the engine cannot answer 404
  for one that exists); on create, the image is gone for a moment. `e409`, `e500`: the engine
  answers that error without acting.
Engine restart: calls fail (DockerUnavailable) for a while, event streams break, every container
stops, and with `lose` they are gone. A killed condo's handle is `dead`: its calls hang and act
on nothing, like those of a process that no longer exists.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, TypeVar, cast

import attrs
import trio

from condo import labels as condo_labels
from condo.docker import (
    Container,
    ContainerEvent,
    ContainerId,
    ContainerSummary,
    DockerClient,
    RegistryAuth,
)
from condo.errors import (
    ContainerNotFound,
    DockerApiError,
    DockerTimeout,
    DockerUnavailable,
    ImageNotFound,
    NameConflict,
)

T = TypeVar("T")

CLIENT_TIMEOUT = 30.0  # condo.docker.client's read guard
STOP_TIMEOUT_MARGIN = 30.0
HEALTHY_AFTER = 2.0  # a healthchecked container turns healthy this long after its start
RESTART_DOWN_FOR = 5.0
EPOCH = 1_700_000_000.0  # the virtual wall clock: EPOCH + Trio time

Method = Literal["create", "start", "stop", "remove", "inspect", "list", "rename", "any"]
FaultKind = Literal["slow", "lost", "e404", "e409", "e500"]


@attrs.frozen
class Fault:
    method: Method
    kind: FaultKind
    delay: float = 0.0
    count: int = 1

    def __str__(self) -> str:
        delay = f" {self.delay:g}s" if self.kind == "slow" else ""
        return f"{self.kind}{delay} x{self.count} on {self.method}"


@attrs.define
class Box:
    """One container of the world."""

    id: str
    name: str
    image: str
    labels: dict[str, str]
    created_at: float
    running: bool = False
    health: str | None = None
    exit_code: int = 0
    generation: int = 0  # bumped by every start and stop: stale health timers do nothing

    @property
    def host(self) -> str | None:
        return self.labels.get(condo_labels.HOST)


@attrs.frozen
class Created:
    at: float  # when the engine acted
    asked_at: float  # when condo asked (a slow engine acts later, perhaps after condo died)
    by: str  # the host name of the condo that asked
    cid: str
    service: str
    spec_hash: str


@attrs.frozen
class Touched:
    at: float
    by: str
    op: str
    cid: str
    owner: str | None  # the container's condo.host label
    service: str | None
    grace: float | None
    running_before: bool
    alone: bool  # no other container of its host and service was running


class World:
    """The engine: its containers, its faults, and what condo did to it."""

    def __init__(self, nursery: trio.Nursery, images: Mapping[str, bool]) -> None:
        self._nursery = nursery
        self.images = dict(images)  # image -> has a HEALTHCHECK
        self.containers: dict[str, Box] = {}
        self.created: list[Created] = []
        self.touched: list[Touched] = []
        self.faults: list[Fault] = []
        self.restarting = False
        self._ids = itertools.count(1)
        self._streams: list[_Stream] = []

    # --- the search's controls ------------------------------------------------------------------

    def handle(self, host: str) -> Handle:
        return Handle(self, host)

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def add_foreign(self, name: str, labels: Mapping[str, str], image: str) -> None:
        """A container condo must never touch (another host's, or unlabelled)."""
        box = self._new_box(name, image, labels)
        self._start(box)

    def restart(self, *, lose: bool) -> None:
        """The engine restarts: every container stops (or is lost), streams break, calls fail."""
        self.restarting = True
        for stream in self._streams:
            stream.broken = True
            stream.wake.set()
        for box in list(self.containers.values()):
            box.running = False
            box.generation += 1
            box.exit_code = 255
            if lose:
                del self.containers[box.id]

        async def back() -> None:
            await trio.sleep(RESTART_DOWN_FOR)
            self.restarting = False

        self._nursery.start_soon(back)

    def remove_by_hand(self, cid_or_name: str) -> None:
        for box in list(self.containers.values()):
            if cid_or_name in (box.id, box.name):
                box.running = False
                box.generation += 1
                del self.containers[box.id]
                self._emit(box, "destroy")

    def crash(self, cid: str) -> None:
        box = self.containers.get(cid)
        if box is not None and box.running:
            box.running = False
            box.generation += 1
            box.exit_code = 137
            self._emit(box, "die")

    # --- what the engine does -------------------------------------------------------------------

    def _take_fault(self, method: str) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.method in (method, "any"):
                if fault.count <= 1:
                    del self.faults[i]
                else:
                    self.faults[i] = attrs.evolve(fault, count=fault.count - 1)
                return fault
        return None

    def _new_box(self, name: str, image: str, labels: Mapping[str, str]) -> Box:
        if any(b.name == name for b in self.containers.values()):
            raise NameConflict(409, f"Conflict. The container name /{name} is already in use")
        cid = f"{next(self._ids):064x}"
        box = Box(id=cid, name=name, image=image, labels=dict(labels), created_at=_wall())
        self.containers[cid] = box
        return box

    def _get(self, cid_or_name: str) -> Box:
        for box in self.containers.values():
            if cid_or_name in (box.id, box.name):
                return box
        raise ContainerNotFound(404, f"No such container: {cid_or_name}")

    def _start(self, box: Box) -> None:
        if box.running:
            return
        box.running = True
        box.generation += 1
        box.health = "starting" if self.images.get(box.image) else None
        self._emit(box, "start")
        if box.health is not None:
            generation = box.generation

            async def turn_healthy() -> None:
                await trio.sleep(HEALTHY_AFTER)
                if box.generation == generation and box.running and not self.restarting:
                    box.health = "healthy"
                    self._emit(box, "health_status", health="healthy")

            self._nursery.start_soon(turn_healthy)

    def _emit(self, box: Box, action: str, *, health: str | None = None) -> None:
        if self.restarting:
            return
        attributes = {**box.labels, "name": box.name, "image": box.image}
        if action == "die":
            attributes["exitCode"] = str(box.exit_code)
        event = ContainerEvent(
            time_nano=int(_wall() * 1e9),
            action=action,
            health=health,
            container_id=ContainerId(box.id),
            attributes=attributes,
        )
        for stream in self._streams:
            if all(box.labels.get(k) == v for k, v in stream.labels.items()):
                stream.queue.append(event)
                stream.wake.set()

    async def _act_after(
        self, delay: float, act: Callable[[], T]
    ) -> trio.MemoryReceiveChannel[Any]:
        """Run `act` after `delay` in the world's own task (no client can cancel it)."""
        send, receive = trio.open_memory_channel[Any](1)

        async def later() -> None:
            await trio.sleep(delay)
            try:
                result: Any = ("ok", act())
            except DockerApiError as exc:  # the engine's answer, to whoever still listens
                result = ("error", exc)
            send.send_nowait(result)

        self._nursery.start_soon(later)
        return receive


@attrs.define
class _Stream:
    labels: Mapping[str, str]
    queue: list[ContainerEvent] = attrs.Factory(list)
    wake: trio.Event = attrs.Factory(trio.Event)
    broken: bool = False


class Handle:
    """One condo process's connection to the world (duck-types condo.docker.DockerClient)."""

    def __init__(self, world: World, host: str) -> None:
        self.world = world
        self.host = host
        self.dead = False

    def as_client(self) -> DockerClient:
        # The supervisor and the event stream are typed against the concrete client; this fake
        # implements the part of it they use (checked by the search, not by mypy).
        return cast("DockerClient", self)

    def opener(self) -> Callable[[str, RegistryAuth], AbstractAsyncContextManager[DockerClient]]:
        @asynccontextmanager
        async def open_engine(_url: str, _auth: RegistryAuth) -> AsyncIterator[DockerClient]:
            yield self.as_client()

        return open_engine

    async def _call(
        self,
        method: str,
        act: Callable[[], T],
        *,
        guard: float = CLIENT_TIMEOUT,
        target: str | None = None,
    ) -> T:
        await trio.lowlevel.checkpoint()
        if self.dead:
            raise DockerUnavailable(f"{method}: condo was killed")  # and nothing is done
        world = self.world
        if world.restarting:
            raise DockerUnavailable(f"{method}: the engine is restarting")
        fault = world._take_fault(method)
        if fault is None:
            return act()
        match fault.kind:
            case "e404":
                if target is not None:
                    world.remove_by_hand(target)
                    return act()  # now a true 404
                raise ImageNotFound(404, f"{method}: injected 404")
            case "e409":
                raise DockerApiError(409, f"{method}: injected 409")
            case "e500":
                raise DockerApiError(500, f"{method}: injected 500")
            case "lost":
                act()
                raise DockerTimeout(f"{method}: the answer was lost")
        answer = await world._act_after(fault.delay, act)
        if fault.delay > guard:
            await trio.sleep(guard)
            raise DockerTimeout(f"{method}: timed out after {guard:g} s")
        kind, value = await answer.receive()
        if kind == "error":
            raise value
        return cast("T", value)

    def _touch(self, op: str, box: Box, grace: float | None = None) -> None:
        self.world.touched.append(
            Touched(
                at=trio.current_time(),
                by=self.host,
                op=op,
                cid=box.id,
                owner=box.host,
                service=box.labels.get(condo_labels.SERVICE),
                grace=grace,
                running_before=box.running,
                alone=not any(
                    b.running
                    and b is not box
                    and b.host == box.host
                    and b.labels.get(condo_labels.SERVICE) == box.labels.get(condo_labels.SERVICE)
                    for b in self.world.containers.values()
                ),
            )
        )

    # --- DockerClient's surface ---------------------------------------------------------------

    @property
    def api_version(self) -> str:
        return "1.45"

    @property
    def is_podman(self) -> bool:
        return False  # a Docker engine: healthchecks run by themselves

    async def ping(self) -> str:
        return await self._call("ping", lambda: "OK")

    async def engine_version(self) -> str:
        return await self._call("version", lambda: "27.0.0-faultsim")

    async def image_present(self, image: str) -> bool:
        return await self._call("image", lambda: image in self.world.images)

    async def image_digests(self, image: str) -> tuple[str, ...]:
        # The history asks it of a deploy that turned stable; these images come from no registry.
        return await self._call("image", lambda: ())

    async def pull(self, image: str) -> None:
        def act() -> None:
            if image not in self.world.images:
                raise ImageNotFound(404, f"manifest for {image} not found")

        await self._call("pull", act)

    async def create(self, body: Mapping[str, Any], *, name: str) -> ContainerId:
        world = self.world
        asked_at = trio.current_time()

        def act() -> ContainerId:
            image = str(body["Image"])
            if image not in world.images:
                raise ImageNotFound(404, f"No such image: {image}")
            box = world._new_box(name, image, body.get("Labels") or {})
            world.created.append(
                Created(
                    at=trio.current_time(),
                    asked_at=asked_at,
                    by=self.host,
                    cid=box.id,
                    service=box.labels.get(condo_labels.SERVICE, ""),
                    spec_hash=box.labels.get(condo_labels.SPEC_HASH, ""),
                )
            )
            world._emit(box, "create")
            return ContainerId(box.id)

        return await self._call("create", act)

    async def start(self, cid: ContainerId) -> None:
        def act() -> None:
            box = self.world._get(cid)
            self._touch("start", box)
            self.world._start(box)

        await self._call("start", act, target=cid)

    async def stop(self, cid: ContainerId, *, grace: float) -> None:
        def act() -> None:
            box = self.world._get(cid)
            self._touch("stop", box, grace)
            if box.running:
                box.running = False
                box.generation += 1
                box.exit_code = 0
                self.world._emit(box, "die")
                self.world._emit(box, "stop")

        await self._call("stop", act, guard=grace + STOP_TIMEOUT_MARGIN, target=cid)

    async def remove(self, cid: ContainerId) -> None:
        def act() -> None:
            box = self.world._get(cid)
            self._touch("remove", box)
            if box.running:
                box.running = False
                box.generation += 1
                box.exit_code = 137
                self.world._emit(box, "die")
            del self.world.containers[box.id]
            self.world._emit(box, "destroy")

        await self._call("remove", act, target=cid)

    async def rename(self, cid: ContainerId, new_name: str) -> None:
        def act() -> None:
            box = self.world._get(cid)
            if any(b.name == new_name for b in self.world.containers.values() if b is not box):
                raise NameConflict(409, f"name {new_name} is in use")
            self._touch("rename", box)
            box.name = new_name
            self.world._emit(box, "rename")

        await self._call("rename", act, target=cid)

    async def inspect(self, cid_or_name: str) -> Container:
        def act() -> Container:
            box = self.world._get(cid_or_name)
            return Container(
                id=ContainerId(box.id),
                name=box.name,
                image=box.image,
                labels=box.labels,
                status="running" if box.running else "exited",
                running=box.running,
                health=box.health,
                exit_code=box.exit_code,
                created_at=box.created_at,
                restart_policy="",
            )

        return await self._call("inspect", act, target=cid_or_name)

    async def list_containers(self, *, labels: Mapping[str, str]) -> list[ContainerSummary]:
        def act() -> list[ContainerSummary]:
            return [
                ContainerSummary(
                    id=ContainerId(box.id),
                    name=box.name,
                    image=box.image,
                    labels=box.labels,
                    state="running" if box.running else "exited",
                    created_at=box.created_at,
                )
                for box in self.world.containers.values()
                if all(box.labels.get(k) == v for k, v in labels.items())
            ]

        return await self._call("list", act)

    async def logs_tail(self, cid: ContainerId, lines: int = 20) -> str:
        return ""

    @asynccontextmanager
    async def open_event_stream(
        self,
        *,
        labels: Mapping[str, str],
        actions: Collection[str],
        since_nanos: int | None = None,
        until_nanos: int | None = None,
    ) -> AsyncIterator[AsyncIterator[ContainerEvent]]:
        await trio.lowlevel.checkpoint()
        if self.dead:
            raise DockerUnavailable("GET /events: condo was killed")
        if self.world.restarting:
            raise DockerUnavailable("GET /events: the engine is restarting")
        if until_nanos is not None:
            # A replay: this engine keeps no backlog (as after its own restart); the
            # EventsResumed that follows makes condo re-inspect.
            yield _no_events()
            return
        stream = _Stream(labels=dict(labels))
        self.world._streams.append(stream)
        try:
            yield self._follow(stream, set(actions))
        finally:
            self.world._streams.remove(stream)

    async def _follow(self, stream: _Stream, actions: set[str]) -> AsyncIterator[ContainerEvent]:
        while True:
            if stream.broken:
                raise DockerUnavailable("GET /events: the connection dropped")
            if self.dead:
                raise DockerUnavailable("GET /events: condo was killed")
            if stream.queue:
                event = stream.queue.pop(0)
                if event.action in actions:
                    yield event
                continue
            stream.wake = trio.Event()
            await stream.wake.wait()


async def _no_events() -> AsyncIterator[ContainerEvent]:
    await trio.lowlevel.checkpoint()
    nothing: tuple[ContainerEvent, ...] = ()
    for event in nothing:  # an async generator that yields nothing
        yield event


def _wall() -> float:
    return EPOCH + trio.current_time()

"""One service's driver: it runs the pure state machine (condo.fsm) against the engine.

The driver owns one service: its `Mailbox` (inputs), its `ServiceState`, and at most one
in-flight Docker operation. Its loop is:

1. If effects are pending, run the next one (after the state file has caught up: the disk always
   knows what condo is about to do before the engine does, so a `kill -9` at any moment can be
   recovered without duplicates), and feed its result back to `fsm.step`.
2. Otherwise wait for the next input under `trio.move_on_at(state.deadline)`: a new spec, an
   engine event routed here, a resync request; or the deadline. Only the wait is bounded: what
   it received is handled in full. A resync folds in the spec waiting beside it, so that the
   first action after a restart already uses the current spec.

Docker calls are shielded from cancellation (with a bound), so that a shutdown finishes the call
in flight and records its result; only an image pull may be cut short: by shutdown, or by a newer
spec that makes it pointless. Removing a service is a message (`Mailbox.set_spec(None)`), never a
cancellation: the driver retires its containers and returns once `state.finished` and nothing is
left to read or to look for.

Invariants:
- Nothing is stopped, removed or renamed unless the engine shows it with this host's and this
  service's labels, whatever the state says (records may come from a damaged file).
- Whatever the engine may have done without condo hearing of it (a call that timed out, an answer
  lost, a stop or remove refused) is looked for again by a resync `LEFTOVER_RESYNC_DELAY` later;
  the driver never ends before that resync.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import structlog
import trio

from condo import deploys, fsm, labels
from condo.docker.models import Container, ContainerId, ContainerSummary
from condo.errors import (
    BadRequest,
    ContainerNotFound,
    DockerApiError,
    DockerError,
    DockerTimeout,
    EngineUnsupported,
    ImageNotFound,
)
from condo.spec import DEFAULT_STOP_TIMEOUT, ServiceSpec
from condo.store import Store, now
from condo.tasks import run_beside

log = structlog.get_logger(__name__)

MAILBOX_CAPACITY = 64
# Bounds on Docker calls that must finish even during shutdown (they are shielded).
CALL_LIMIT = 60.0
STOP_LIMIT_EXTRA = 30.0
OBSERVE_RETRY_DELAY = 1.0
LEFTOVER_RESYNC_DELAY = 2.0
# A pull that makes no headway this long (a hung registry) fails as a transient error.
PULL_LIMIT = 600.0
# The registry digest of a started container's image is asked for within this; past it (or on
# an error) the deploy goes on without one, and a revert to it pins the image id instead.
DIGEST_LIMIT = 10.0


class ContainerEngine(Protocol):
    """The part of the Docker client a service driver uses (condo.docker.DockerClient)."""

    async def image_present(self, image: str) -> bool: ...
    async def pull(self, image: str) -> None: ...
    async def create(self, body: Mapping[str, Any], *, name: str) -> ContainerId: ...
    async def start(self, cid: ContainerId) -> None: ...
    async def stop(self, cid: ContainerId, *, grace: float) -> None: ...
    async def remove(self, cid: ContainerId) -> None: ...
    async def inspect(self, cid_or_name: str) -> Container: ...
    async def image_digests(self, image: str) -> tuple[str, ...]: ...
    async def list_containers(self, *, labels: Mapping[str, str]) -> list[ContainerSummary]: ...
    async def rename(self, cid: ContainerId, new_name: str) -> None: ...


@attrs.frozen
class ResyncRequested:
    """Re-inspect this service's containers (start-up, events gap, mailbox overflow)."""


Input = fsm.Event | ResyncRequested


class Mailbox:
    """The inputs of one driver. Never blocks a sender and never builds a backlog.

    The spec is a latest-value slot (a newer spec replaces an unread one); engine events queue
    up to MAILBOX_CAPACITY, and an overflow drops them and asks for a resync instead (the
    resync reads the engine's truth, so nothing is lost but stale detail).
    """

    def __init__(self) -> None:
        self._spec: ServiceSpec | None = None
        self._spec_set = False
        self._spec_dirty = False
        self._events: deque[fsm.Event] = deque()
        self._resync = False
        self._wakeup = trio.Event()
        self._spec_changed = trio.Event()

    def set_spec(self, spec: ServiceSpec | None) -> None:
        """The service's spec is now `spec` (None: its file is gone)."""
        self._spec = spec
        self._spec_set = True
        self._spec_dirty = True
        self._spec_changed.set()
        self._wake()

    def offer_spec(self, spec: ServiceSpec | None) -> None:
        """`set_spec`, unless `spec` is the very object already set: an unchanged spec file
        parses to the same object (condo.specdir), and each snapshot offers every service its
        spec; waking 200 drivers for nothing put the one that changed behind them."""
        if not (self._spec_set and spec is self._spec):
            self.set_spec(spec)

    def resend_spec(self) -> None:
        """Deliver the latest spec again (after a driver restart), if one was ever set."""
        if self._spec_set:
            self.set_spec(self._spec)

    def put(self, event: fsm.Event) -> None:
        """Queue an engine event; on overflow, trade the backlog for a resync."""
        if len(self._events) >= MAILBOX_CAPACITY:
            self._events.clear()
            self._resync = True
        else:
            self._events.append(event)
        self._wake()

    def request_resync(self) -> None:
        self._resync = True
        self._wake()

    @property
    def has_input(self) -> bool:
        """Something is waiting to be read (a finished driver must read it before it ends:
        a record of a removed service may meet a spec file that is back)."""
        return self._resync or self._spec_dirty or bool(self._events)

    @property
    def latest_spec(self) -> ServiceSpec | None:
        return self._spec

    def take_spec(self) -> fsm.SpecChanged | None:
        """The unread spec change, if any, marked read (for a resync to fold in)."""
        if not self._spec_dirty:
            return None
        self._spec_dirty = False
        return fsm.SpecChanged(self._spec)

    def supersedes(self, spec: ServiceSpec) -> bool:
        """True when an unread spec would replace `spec`'s container (or remove the service)."""
        if not self._spec_dirty:
            return False
        return self._spec is None or self._spec.container_hash != spec.container_hash

    async def wait_spec_changed(self) -> None:
        """Return when a new spec is set after this call began."""
        self._spec_changed = trio.Event()
        await self._spec_changed.wait()

    async def get(self) -> Input:
        """The next input: a resync first (the engine's truth), then a new spec, then events."""
        while True:
            if self._resync:
                self._resync = False
                return ResyncRequested()
            if self._spec_dirty:
                self._spec_dirty = False
                return fsm.SpecChanged(self._spec)
            if self._events:
                return self._events.popleft()
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def _wake(self) -> None:
        self._wakeup.set()


@attrs.frozen(kw_only=True)
class ServiceContext:
    """What a driver needs from the rest of condo."""

    name: str
    host: str
    engine: ContainerEngine
    store: Store
    flush_state: Callable[[], Awaitable[None]]


async def run_service(ctx: ServiceContext, mailbox: Mailbox, initial: fsm.ServiceState) -> None:
    """Drive one service until its spec file is gone and its containers are retired.

    Returns when `state.finished`; cancellation (shutdown) lets the Docker call in flight finish.
    """
    driver = _Driver(ctx, mailbox, initial)
    with structlog.contextvars.bound_contextvars(service=ctx.name):
        await driver.run()


class _Driver:
    def __init__(self, ctx: ServiceContext, mailbox: Mailbox, state: fsm.ServiceState) -> None:
        self._ctx = ctx
        self._mailbox = mailbox
        self._state = state
        self._pending: deque[fsm.Effect] = deque()
        # When a container could not be retired (the engine failed or was too slow), the
        # Trio time of a resync that finds it again as a stray; the driver never ends before.
        self._leftover_resync_at: float | None = None
        ctx.store.set_state(ctx.name, state)

    async def run(self) -> None:
        while True:
            if self._pending:
                # Write-ahead: the state file knows what we are about to do.
                await self._ctx.flush_state()
                effect = self._pending.popleft()
                result = await self._execute(effect)
                if result is not None:
                    self._apply(result)
                continue
            if (
                self._state.finished
                and self._leftover_resync_at is None
                and not self._mailbox.has_input
            ):
                log.info("service.finished")
                return
            deadline = self._state.deadline if self._state.deadline is not None else math.inf
            resync_at = self._leftover_resync_at
            received: Input | None = None
            # Only the wait is bounded by the deadline: what it received is always handled in
            # full (a resync cut short by a deadline that had already passed would be lost).
            with trio.move_on_at(min(deadline, resync_at or math.inf)):
                received = await self._mailbox.get()
            if received is None and resync_at is not None and trio.current_time() >= resync_at:
                received = ResyncRequested()
            if isinstance(received, ResyncRequested):
                self._leftover_resync_at = None  # this resync finds every leftover
            if received is None:
                self._apply(fsm.DeadlineReached())
            elif isinstance(received, ResyncRequested):
                containers = await self._observe()
                # A spec that arrived meanwhile is folded into the reconciliation, so that
                # nothing is done for a spec that is already obsolete.
                self._apply(fsm.Observed(containers=containers, latest=self._mailbox.take_spec()))
            else:
                self._apply(received)

    def _apply(self, event: fsm.Event) -> None:
        before = self._state
        after, effects = fsm.step(before, event, now())
        self._state = after
        self._pending.extend(effects)
        self._ctx.store.set_state(self._ctx.name, after)
        if after.phase is not before.phase or after.error != before.error:
            box = after.next or after.current
            log.info(
                "service.transition",
                from_=before.phase.value,
                to=after.phase.value,
                container=None if box is None else box.name,
                why=type(event).__name__,
                error=None if after.error is None else after.error.message,
            )

    # --- effects ------------------------------------------------------------------------------

    async def _execute(self, effect: fsm.Effect) -> fsm.Event | None:
        log.debug("service.effect", effect=type(effect).__name__)
        match effect:
            case fsm.Deploy():
                return await self._deploy(effect)
            case fsm.Retire(box=box, keep=keep):
                await self._retire(box.id, box.name, grace=box.spec.stop_timeout, keep=keep)
                return None
            case fsm.RemoveStray(id=cid, name=name):
                # A stray may be serving still (a retire that failed, a lost record): it gets
                # the service's stop timeout like any container condo stops.
                spec = self._state.desired
                grace = spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT
                await self._retire(cid, name, grace=grace, keep=False)
                return None
            case fsm.Rename(box=box, name=new_name):
                try:
                    with trio.move_on_after(CALL_LIMIT, shield=True):
                        if self._owns(await self._ctx.engine.inspect(box.id)):
                            await self._ctx.engine.rename(ContainerId(box.id), new_name)
                except DockerError as exc:
                    return fsm.RenameFailed(id=box.id, message=str(exc))
                return None

    async def _deploy(self, effect: fsm.Deploy) -> fsm.Event:
        spec, engine = effect.spec, self._ctx.engine
        try:
            cancelled = await self._pull_unless_superseded(spec)
        except DockerError as exc:
            return fsm.DeployFailed(
                message=f"pull {spec.image}: {exc}", replaced=False, permanent=_permanent(exc)
            )
        if cancelled:
            return fsm.DeployFailed(message="superseded", replaced=False, cancelled=True)

        replaced = False
        created: fsm.Box | None = None
        name = effect.name or labels.generated_name(self._ctx.name)
        body = dict(spec.create_body)  # the container, plus the ports `:proxy` publishes
        body["Labels"] = {
            **(spec.container.get("Labels") or {}),
            **labels.for_container(self._ctx.host, self._ctx.name, spec.container_hash),
        }
        # Everything from here on must finish once begun, even during shutdown, so that what
        # the engine has and what condo records never drift apart.
        with trio.move_on_after(CALL_LIMIT + spec.stop_timeout + STOP_LIMIT_EXTRA, shield=True):
            if effect.replace is not None:
                box = effect.replace
                if not await self._retire(box.id, box.name, grace=box.spec.stop_timeout):
                    return fsm.DeployFailed(message=f"could not stop {box.name}", replaced=False)
                replaced = True
            try:
                cid = await engine.create(body, name=name)
            except DockerError as exc:
                leftover = await self._created_anyway(name, exc, spec)
                return fsm.DeployFailed(
                    message=f"create {name}: {exc}",
                    replaced=replaced,
                    leftover=leftover,
                    permanent=_permanent(exc),
                )
            created = fsm.Box(
                id=cid, name=name, spec=spec, created_at=time.time(), healthcheck=False
            )
            try:
                await engine.start(cid)
                info = await engine.inspect(cid)
            except DockerError as exc:
                if _unheard(exc):
                    # The engine may still start it (an answer lost or late): look again.
                    self._resync_later()
                return fsm.DeployFailed(
                    message=f"start {name}: {exc}", replaced=replaced, leftover=created
                )
            box = attrs.evolve(
                created,
                healthcheck=info.health is not None,
                restart_policy=info.restart_policy,
                # What a revert to this deploy pins to: the digest, else the id.
                image_id=info.image_id,
                image_digest=await self._digest_of(spec.image, info.image_id),
            )
            return fsm.ContainerStarted(box=box, running=info.running, health=info.health)
        # The limit expired mid-way (a slow engine): the engine may have acted without condo
        # hearing of it. What is known to exist is handed back to be retired; a create whose
        # answer never came is looked up by name; and a resync reads the engine's whole truth,
        # so that nothing this attempt made is left running unknown.
        if created is None:
            with trio.move_on_after(CALL_LIMIT, shield=True):
                created = await self._find_created(name, spec)
        self._resync_later()
        return fsm.DeployFailed(
            message=f"deploy of {name} timed out", replaced=replaced, leftover=created
        )

    async def _digest_of(self, image: str, image_id: str) -> str:
        """The registry digest (`repo@sha256:…`) of `image`'s repository that the engine knows
        for the image `image_id`, as the history reads it (`deploys.own_digest`); "" when there
        is none (built or loaded locally) or the engine cannot say now."""
        if not image_id:
            return ""
        try:
            with trio.fail_after(DIGEST_LIMIT):
                digests = await self._ctx.engine.image_digests(image_id)
        except (DockerError, trio.TooSlowError) as exc:
            log.warning("service.digest_failed", image=image, error=str(exc) or "timed out")
            return ""
        return deploys.own_digest(image, digests) or ""

    async def _created_anyway(
        self, name: str, error: DockerError, spec: ServiceSpec
    ) -> fsm.Box | None:
        """After a create whose outcome is unknown (timeout, dropped connection), the container
        may exist all the same: find it by its name, so that it is retired, not leaked."""
        if not _unheard(error):
            return None  # the engine answered: nothing was created
        found = await self._find_created(name, spec)
        if found is None:
            # Not there yet, but a slow engine may still act on the request: look again.
            self._resync_later()
        return found

    async def _find_created(self, name: str, spec: ServiceSpec) -> fsm.Box | None:
        """This service's container named `name`, if the engine has one."""
        try:
            info = await self._ctx.engine.inspect(name)
        except DockerError:
            return None  # not there (or the engine is still away: the next resync sees it)
        if not self._owns(info):
            return None  # somebody else's container of that name
        return fsm.Box(id=info.id, name=name, spec=spec, created_at=time.time(), healthcheck=False)

    def _owns(self, info: Container) -> bool:
        """The container carries this host's and this service's labels."""
        return (
            info.labels.get(labels.HOST) == self._ctx.host
            and info.labels.get(labels.SERVICE) == self._ctx.name
        )

    async def _pull_unless_superseded(self, spec: ServiceSpec) -> bool:
        """Pull per the spec's policy; True when a newer spec made the pull pointless."""
        policy = spec.effective_pull()
        engine = self._ctx.engine
        if policy == "never" or (policy == "missing" and await engine.image_present(spec.image)):
            if policy == "never" and not await engine.image_present(spec.image):
                raise ImageNotFound(404, f"{spec.image} is not on the engine and :pull is :never")
            return False

        async def pull() -> bool:
            log.info("service.pull", image=spec.image)
            try:
                with trio.fail_after(PULL_LIMIT):
                    await engine.pull(spec.image)
            except trio.TooSlowError:  # a hung registry: a transient error like any other
                raise DockerTimeout(
                    f"pull of {spec.image} took more than {PULL_LIMIT:g} s"
                ) from None
            return True

        async def wait_superseded(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            while not self._mailbox.supersedes(spec):
                await self._mailbox.wait_spec_changed()

        # None: the watcher ended first (a newer spec), which cancelled the pull.
        return await run_beside(pull, wait_superseded) is None

    async def _retire(self, cid: str, name: str, *, grace: float, keep: bool = False) -> bool:
        """Stop (and unless `keep`, remove) a container; True once it no longer runs.

        Only a container that carries this host's and this service's labels is ever touched,
        whatever the state says (a record may come from a damaged or foreign file): anything
        else counts as gone. Stop and remove have limits of their own, so that a slow remove
        after a finished stop never makes a stopped container look like it still serves; a
        container that could not be removed is left to a resync, which removes it as a stray.
        """
        engine = self._ctx.engine
        try:
            with trio.fail_after(CALL_LIMIT, shield=True):
                info = await engine.inspect(cid)
        except ContainerNotFound:
            return True  # already gone: that is what we wanted
        except (DockerError, trio.TooSlowError) as exc:
            log.warning("service.retire_failed", container=name, error=str(exc) or "timed out")
            self._resync_later()
            return False
        if not self._owns(info):
            log.error(
                "service.not_ours",
                container=name,
                id=cid[:12],
                host=info.labels.get(labels.HOST),
                service_label=info.labels.get(labels.SERVICE),
            )
            return True  # never ours to stop: forget it
        try:
            with trio.fail_after(grace + STOP_LIMIT_EXTRA, shield=True):
                await engine.stop(ContainerId(cid), grace=grace)
        except ContainerNotFound:
            return True
        except (DockerError, trio.TooSlowError) as exc:
            # Left for a resync: once it is not in the state any more, it is found as a stray
            # and removed then.
            log.warning("service.retire_failed", container=name, error=str(exc) or "timed out")
            self._resync_later()
            return False
        if not keep:
            try:
                with trio.fail_after(CALL_LIMIT, shield=True):
                    await engine.remove(ContainerId(cid))
            except ContainerNotFound:
                pass
            except (DockerError, trio.TooSlowError) as exc:
                # Stopped, so it no longer serves; the resync removes the stopped stray.
                log.warning("service.remove_failed", container=name, error=str(exc) or "timed out")
                self._resync_later()
        log.info("service.retired", container=name, kept=keep)
        return True

    def _resync_later(self) -> None:
        """A container could not be retired: look again in a while (not at once, so that an
        engine that keeps failing is not hammered), and never end before that."""
        if self._leftover_resync_at is None:
            self._leftover_resync_at = trio.current_time() + LEFTOVER_RESYNC_DELAY

    async def _observe(self) -> tuple[fsm.Seen, ...]:
        """Everything the engine has of this service, retrying while it cannot answer."""
        engine = self._ctx.engine
        while True:
            try:
                rows = await engine.list_containers(
                    labels=labels.owned_by(self._ctx.host, self._ctx.name)
                )
                seen = []
                state = self._state
                recorded = {
                    b.id for b in (state.current, state.next, state.failed, state.replacing) if b
                }
                for row in rows:
                    try:
                        info = await engine.inspect(row.id)
                    except ContainerNotFound:
                        continue  # removed between the list and the inspect
                    # One the state does not record may be adopted (a deploy interrupted by a
                    # kill -9) and become the last good: learn what a revert would pin it to.
                    # (Its image as created, `Config.Image`, is its spec's.)
                    digest = ""
                    if info.id not in recorded and info.running:
                        digest = await self._digest_of(info.image, info.image_id)
                    seen.append(
                        fsm.Seen(
                            id=info.id,
                            name=info.name,
                            spec_hash=info.labels.get(labels.SPEC_HASH, ""),
                            running=info.running,
                            health=info.health,
                            created_at=info.created_at,
                            restart_policy=info.restart_policy,
                            exit_code=info.exit_code,
                            image_id=info.image_id,
                            image_digest=digest,
                        )
                    )
                return tuple(seen)
            except EngineUnsupported as exc:
                # Nothing this service shows can be trusted: say why in its state (the client
                # logged it once); the state itself (and the file) is left as it was.
                shown = self._ctx.store.entries[self._ctx.name].state.error
                if shown is None or shown.message != str(exc):  # keep the first `at`
                    failure = fsm.Failure(message=str(exc), at=time.time(), unobserved=True)
                    refused = attrs.evolve(self._state, error=failure)
                    self._ctx.store.set_state(self._ctx.name, refused)
                await trio.sleep(OBSERVE_RETRY_DELAY)
            except DockerError as exc:
                # Never guess while the engine cannot answer: a container we cannot see is not
                # a dead container (the original made duplicates that way).
                log.warning("service.observe_failed", error=str(exc))
                await trio.sleep(OBSERVE_RETRY_DELAY)


def _permanent(error: DockerError) -> bool:
    """The spec cannot be deployed as it is: its image does not exist, or the engine rejects
    its create body. (A name conflict or a vanished container is condo's to sort out.)"""
    return isinstance(error, ImageNotFound | BadRequest)


def _unheard(error: DockerError) -> bool:
    """The engine did not answer (a timeout, a dropped connection): it may have acted anyway."""
    return error.transient and not isinstance(error, DockerApiError)

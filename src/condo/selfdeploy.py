"""Self-deploy: condo replacing its own container with the one `self.edn` describes.

`self.edn` is a bare create-container body (no `:spec` wrapper). Its hash is compared with the
`CONDO_SELF` environment variable of the running condo; when they differ (or `CONDO_SELF` is not
set, as for a condo started by hand), this happens, in order:

1. Every service is suspended: drivers finish the Docker call in flight and stop; no workload is
   touched; the state file is written (the last write of this condo if the hand-over succeeds:
   from then on the successor owns the state file).
2. The new condo container is created from `self.edn`, with `CONDO_SELF=<hash>` and
   `CONDO_HOST=<this condo's host>` added to its env (the same host name means it adopts every
   workload from the shared state file and labels), and the labels `condo.self=<host>` and
   `condo.self-hash=<hash>`.
3. Side by side (the usual case): it is started at once, with `AutoRemove` (unless it has a
   RestartPolicy), so that once it is itself replaced it disappears. condo waits for it to be
   healthy (its image's HEALTHCHECK against /healthz; without a healthcheck: still running after
   SELF_NO_HEALTHCHECK_GRACE seconds), then exits 0 without writing anything.
   Stop-then-start: when `self.edn` publishes a host port this condo's own container publishes
   (two containers cannot hold one published port), a short-lived hand-over container
   (`condo hand-over`, this condo's own image, labelled `condo.hand-over=<host>`) stops this
   condo, starts the successor and waits for it (`run_hand_over`); on success it removes this
   condo's container, on failure it removes the successor, records the failure in the state file
   and starts this condo again. The successor is then not `AutoRemove`: the next hand-over, done
   the same way, must be able to start it again.
4. Any failure (pull, create, a name or port clash, start, health, the engine away, a condo bug):
   the successor is removed, this condo resumes every service, and that hash is not tried again
   until self.edn changes. `/v1/state` shows why under `"self"` (`SelfStatus`), and so does the
   state file, so that a condo started again after a failed hand-over remembers it.

If a healthy condo with the wanted hash already runs for this host (e.g. this one was restarted by
its RestartPolicy after handing over), this condo exits 0 without deploying anything. While the
engine cannot answer that question, condo asks again every ENGINE_RETRY_DELAY seconds (services
keep running meanwhile).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from condo import labels, persist
from condo.docker import (
    Container,
    ContainerEvent,
    ContainerId,
    DockerClient,
    EventsResumed,
    published_host_ports,
    run_events,
)
from condo.errors import ContainerNotFound, DockerError, SelfDeployFailed, StateFileError
from condo.spec import SelfSpec
from condo.tasks import run_beside

log = structlog.get_logger(__name__)

SELF_ENV = "CONDO_SELF"
SELF_LABEL = "condo.self"
SELF_HASH_LABEL = "condo.self-hash"
HAND_OVER_LABEL = "condo.hand-over"
SELF_HEALTH_TIMEOUT = 60.0
SELF_NO_HEALTHCHECK_GRACE = 5.0
ENGINE_RETRY_DELAY = 2.0
OLD_STOP_GRACE = 10.0  # the old condo ends within a second of SIGTERM (it is suspended)
# How long a condo waits to be stopped by its hand-over container before it looks for it.
HAND_OVER_STOP_LIMIT = 60.0
HAND_OVER_POLL_DELAY = 1.0
CLEANUP_LIMIT = 120.0  # removing a successor, retried while the engine is away
BRING_BACK_LIMIT = 600.0  # the hand-over container's retries to start the old condo again
PERSIST_FIRST_DELAY = 0.5
PERSIST_MAX_DELAY = 10.0
CONTAINER_IN_MOUNTINFO = re.compile(r"/containers/([0-9a-f]{64})/")


@attrs.frozen
class SelfStatus:
    """The last self-deploy: `/v1/state`'s and the state file's `"self"` field."""

    hash: str
    state: str
    """deploying | waiting (for the engine) | failed."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.hash, "state": self.state, "error": self.error}

    @classmethod
    def from_json(cls, data: object) -> SelfStatus | None:
        """The status a state file recorded (None when absent or not of this shape)."""
        if not isinstance(data, Mapping):
            return None
        hash_, state, error = data.get("hash"), data.get("state"), data.get("error")
        if not isinstance(hash_, str) or not isinstance(state, str):
            return None
        return cls(hash_, state, error if isinstance(error, str) else None)


def running_hash() -> str | None:
    """The hash of the self.edn this condo was started from (None: started by hand)."""
    return os.environ.get(SELF_ENV) or None


def own_container_id(mountinfo: str) -> ContainerId | None:
    """This process's container id, from /proc/self/mountinfo (the engine bind-mounts
    /etc/hostname and friends from `.../containers/<id>/`); None outside a container."""
    found = CONTAINER_IN_MOUNTINFO.search(mountinfo)
    return ContainerId(found.group(1)) if found else None


async def find_own_container(docker: DockerClient) -> Container | None:
    """This condo's own container, or None when it runs outside one (or cannot tell)."""
    try:
        # procfs, generated in memory: read at once, without a thread (a thread would let a test's
        # MockClock jump ahead while condo starts, and costs more than the read).
        mountinfo = Path("/proc/self/mountinfo").read_text()  # noqa: ASYNC240
    except OSError:  # not Linux, or no /proc: then not in a container condo can see
        return None
    cid = own_container_id(mountinfo)
    if cid is None:
        return None
    try:
        return await docker.inspect(cid)
    except ContainerNotFound:  # another engine's container (a nested setup): not ours to stop
        return None


def self_body(spec: SelfSpec, host: str, *, auto_remove: bool = True) -> dict[str, Any]:
    """The create body of the new condo container."""
    body = dict(spec.container)
    env = [str(e) for e in body.get("Env") or []]
    env = [e for e in env if not e.startswith(f"{SELF_ENV}=")]
    env.insert(0, f"{SELF_ENV}={spec.hash}")
    # The successor must be this host: under another name it would adopt nothing and leave
    # every workload unsupervised. A CONDO_HOST in self.edn is overridden.
    env = [e for e in env if not e.startswith("CONDO_HOST=")]
    env.append(f"CONDO_HOST={host}")
    body["Env"] = env
    body["Labels"] = {
        **(body.get("Labels") or {}),
        SELF_LABEL: host,
        SELF_HASH_LABEL: spec.hash,
    }
    host_config = dict(body.get("HostConfig") or {})
    if auto_remove and not (host_config.get("RestartPolicy") or {}).get("Name"):
        host_config.setdefault("AutoRemove", True)
    body["HostConfig"] = host_config
    return body


def clashing_ports(spec: SelfSpec, own: Container | None) -> frozenset[str]:
    """The host ports both self.edn and this condo's own container publish.

    None with host networking in self.edn: the engine discards its PortBindings (nothing is
    published, so nothing clashes), and with `--server-reuse-port` on both sides the two condos
    listen on the one port at once."""
    host_config = spec.container.get("HostConfig") or {}
    if own is None or host_config.get("NetworkMode") == "host":
        return frozenset()
    wanted = published_host_ports(host_config.get("PortBindings"))
    return wanted & own.host_ports


def unshared_paths(spec: SelfSpec, own: Container | None, paths: Iterable[Path]) -> list[str]:
    """The paths (spec directories, the state file's folder) that this condo's container has
    bound from the host but self.edn does not bind the same way: the successor would read other
    specs or no state file, and retire every workload. Empty when condo runs outside a
    container (nothing to compare) or shares them all."""
    if own is None:
        return []
    host_config = spec.container.get("HostConfig") or {}
    theirs = {_bind_ends(str(b)) for b in host_config.get("Binds") or ()}
    theirs |= {
        (str(m.get("Source")), str(m.get("Target")))
        for m in host_config.get("Mounts") or ()
        if isinstance(m, dict)
    }
    mine = [_bind_ends(b) for b in own.binds]
    missing = []
    for path in dict.fromkeys(paths):  # once each (the state often lives beside the specs)
        # The bind that holds `path` in this container: the deepest one above it.
        holders = [(src, dst) for src, dst in mine if path.is_relative_to(dst)]
        if holders:
            bind = max(holders, key=lambda b: len(b[1]))
            if bind not in theirs:
                missing.append(f"{path} (bound from {bind[0]} at {bind[1]})")
    return missing


def _bind_ends(bind: str) -> tuple[str, str]:
    """`src:dst[:options]` → (src, dst)."""
    source, _, rest = bind.partition(":")
    return source, rest.partition(":")[0]


async def already_handed_over(docker: DockerClient, spec: SelfSpec, host: str) -> bool:
    """A healthy (or healthcheck-less running) condo with this hash already runs for `host`."""
    for row in await docker.list_containers(labels={SELF_LABEL: host, SELF_HASH_LABEL: spec.hash}):
        try:
            info = await docker.inspect(row.id)
        except ContainerNotFound:
            continue  # gone between the list and the inspect
        if info.running and info.health in (None, "healthy"):
            return True
    return False


async def _remove_quietly(docker: DockerClient, cid: ContainerId, what: str) -> None:
    """Remove `cid`, retrying while the engine cannot answer: a successor left running would
    be a second condo of this host."""
    await _persist(f"remove {what}", lambda: docker.remove(cid), limit=CLEANUP_LIMIT)


async def _persist(what: str, call: Callable[[], Awaitable[None]], *, limit: float) -> bool:
    """Run `call` until it succeeds (a container already gone counts), retrying what fails
    with a growing delay, shielded, for at most `limit` seconds; False when it never did."""
    delay = PERSIST_FIRST_DELAY
    with trio.move_on_after(limit, shield=True):
        while True:
            try:
                await call()
            except ContainerNotFound:
                return True  # already gone (AutoRemove): what a removal wanted
            except DockerError as exc:  # the engine is away or failing: try again
                log.warning("self.retrying", action=what, error=str(exc), delay=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, PERSIST_MAX_DELAY)
                continue
            return True
    log.error("self.gave_up", action=what, limit=limit)
    return False


async def _start_and_wait_healthy(
    docker: DockerClient, cid: ContainerId, name: str, hash_: str
) -> None:
    """Start `cid` (events subscribed first, so no health event is missed) and wait until it is
    healthy; SelfDeployFailed (or a DockerError) when it is not."""
    send, receive = trio.open_memory_channel[ContainerEvent | EventsResumed](16)

    async def watch_events(task_status: trio.TaskStatus[None]) -> None:
        # The successor's label; _wait_healthy looks only at the events of `cid` itself.
        await run_events(docker, send, labels={SELF_HASH_LABEL: hash_}, task_status=task_status)

    async def start_and_wait() -> None:
        await docker.start(cid)
        log.info("self.started", container=name)
        await _wait_healthy(docker, cid, receive)

    await run_beside(start_and_wait, watch_events)


async def _wait_healthy(
    docker: DockerClient,
    cid: ContainerId,
    events: trio.MemoryReceiveChannel[ContainerEvent | EventsResumed],
) -> None:
    info = await docker.inspect(cid)
    if not info.running:
        raise SelfDeployFailed(f"it exited at once (code {info.exit_code})")
    if info.health == "healthy":
        return
    grace = SELF_NO_HEALTHCHECK_GRACE if info.health is None else SELF_HEALTH_TIMEOUT
    with trio.move_on_after(grace):
        async for event in events:
            if isinstance(event, EventsResumed):
                info = await docker.inspect(cid)  # missed events: look again
                if not info.running:
                    raise SelfDeployFailed(f"it exited (code {info.exit_code})")
                if info.health == "healthy":
                    return
                continue
            if event.container_id != cid:
                continue
            if event.action == "health_status" and event.health == "healthy":
                return
            if event.action in ("die", "destroy"):
                raise SelfDeployFailed(f"it exited ({event.action})")
            if event.health == "unhealthy":
                raise SelfDeployFailed("it turned unhealthy")
    if info.health is None:
        info = await docker.inspect(cid)
        if info.running:
            return  # no healthcheck: still up after the grace
        raise SelfDeployFailed(f"it exited (code {info.exit_code})")
    raise SelfDeployFailed(f"not healthy within {SELF_HEALTH_TIMEOUT:g} s")


@attrs.frozen(kw_only=True)
class HandOverPlan:
    """What the hand-over container needs to know (its command line)."""

    old: ContainerId
    new: ContainerId
    hash: str
    state_path: Path
    docker_url: str

    def argv(self) -> list[str]:
        return [
            "hand-over", "--old", self.old, "--new", self.new, "--self-hash", self.hash,
            "--state", str(self.state_path), "--docker", self.docker_url,
        ]  # fmt: skip


def hand_over_body(plan: HandOverPlan, own: Container, host: str) -> dict[str, Any]:
    """The hand-over container: this condo's own image and binds (the engine's socket and the
    state file's folder, at the same paths), removed once it ends."""
    return {
        "Image": own.image_id or own.image,
        "Entrypoint": ["condo"],
        "Cmd": plan.argv(),
        "Labels": {HAND_OVER_LABEL: host, SELF_HASH_LABEL: plan.hash},
        "Healthcheck": {"Test": ["NONE"]},  # it serves nothing
        "HostConfig": {"Binds": list(own.binds), "AutoRemove": True},
    }


class WantedSelf:
    """The newest valid self.edn, waiting for the self-deployer (latest value, no backlog).

    The spec watcher offers every snapshot's self.edn; while a deploy is under way only the
    newest offer is kept, and the deployer takes it when it is free again.
    """

    def __init__(self) -> None:
        self._spec: SelfSpec | None = None
        self._offered = trio.Event()

    def offer(self, spec: SelfSpec) -> None:
        self._spec = spec
        self._offered.set()

    def take_nowait(self) -> SelfSpec | None:
        spec, self._spec = self._spec, None
        self._offered = trio.Event()
        return spec

    async def take(self) -> SelfSpec:
        while (spec := self.take_nowait()) is None:
            await self._offered.wait()
        return spec


@attrs.frozen(kw_only=True)
class SelfContext:
    """What the self-deployer needs from run_condo."""

    docker: DockerClient
    host: str
    state_path: Path
    prefixes: tuple[Path, ...]  # the spec directories: the successor must see the same ones
    docker_url: str
    suspend: Callable[[], Awaitable[None]]
    resume: Callable[[], None]
    report: Callable[[SelfStatus], None]
    # From now on write nothing: the successor owns the state file.
    handed_over: Callable[[], None]
    # Exit condo (after handed_over: without writing the state file again).
    exit_condo: Callable[[], None]


@attrs.frozen
class HandOverStarted:
    """The hand-over container runs: it is to stop this condo and start `successor`."""

    helper: ContainerId
    successor: ContainerId


async def deploy_self(
    ctx: SelfContext, spec: SelfSpec, own: Container | None
) -> HandOverStarted | None:
    """Make the successor take over: None once it is healthy beside this condo; the hand-over
    container's id when it was started to stop this condo and start the successor.

    Raises SelfDeployFailed or DockerError, after removing the successor.
    """
    docker = ctx.docker
    name = spec.fixed_name or labels.generated_name("condo")
    image = str(spec.container.get("Image", ""))
    clash = clashing_ports(spec, own)
    if not await docker.image_present(image):
        await docker.pull(image)
    cid = await docker.create(self_body(spec, ctx.host, auto_remove=not clash), name=name)
    try:
        if clash and own is not None:
            log.info("self.stop_then_start", ports=sorted(clash), container=name)
            plan = HandOverPlan(
                old=own.id, new=cid, hash=spec.hash, state_path=ctx.state_path,
                docker_url=ctx.docker_url,
            )  # fmt: skip
            helper = await docker.create(
                hand_over_body(plan, own, ctx.host), name=f"{name}-hand-over"
            )
            try:
                await docker.start(helper)
            except DockerError:
                await _remove_quietly(docker, helper, f"{name}-hand-over")
                raise
            return HandOverStarted(helper=helper, successor=cid)
        await _start_and_wait_healthy(docker, cid, name, spec.hash)
        return None
    except BaseException:
        # Cancelled included: a successor must never outlive a deploy that did not finish.
        await _remove_quietly(docker, cid, name)
        raise


async def run_self_deployer(
    ctx: SelfContext,
    wanted: WantedSelf,
    *,
    failed_before: SelfStatus | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handle every new self.edn: deploy it, then hand over (exit), or resume on failure."""
    failed: set[str] = set()
    if failed_before is not None and failed_before.state == "failed":
        failed.add(failed_before.hash)  # a hand-over that failed before this condo restarted
        ctx.report(failed_before)
    task_status.started()
    spec: SelfSpec | None = None
    while True:
        if spec is None:
            spec = await wanted.take()
        spec = wanted.take_nowait() or spec  # a newer self.edn, offered meanwhile
        if spec.hash == running_hash() or spec.hash in failed:
            spec = None
            continue
        try:
            handed = await already_handed_over(ctx.docker, spec, ctx.host)
        except DockerError as exc:
            # The engine cannot say: ask again shortly (services run on meanwhile), unless a
            # newer self.edn arrives in between.
            log.warning("self.engine_unavailable", hash=spec.hash, error=str(exc))
            ctx.report(SelfStatus(spec.hash, "waiting", str(exc)))
            await trio.sleep(ENGINE_RETRY_DELAY)
            continue
        if handed:
            log.info("self.already_handed_over", hash=spec.hash)
            ctx.handed_over()
            ctx.exit_condo()
            return
        log.info("self.deploy_started", hash=spec.hash, running=running_hash())
        ctx.report(SelfStatus(spec.hash, "deploying"))
        await ctx.suspend()
        error: str
        try:
            own = await find_own_container(ctx.docker)
            unshared = unshared_paths(spec, own, (*ctx.prefixes, ctx.state_path.parent))
            if unshared:
                raise SelfDeployFailed(
                    "self.edn does not bind what this condo reads, so its successor would see "
                    "other specs or no state and retire the workloads: " + "; ".join(unshared)
                )
            helper = await deploy_self(ctx, spec, own)
        except (SelfDeployFailed, DockerError) as exc:
            error = str(exc)
        except Exception as exc:
            # A bug in condo must not leave every service suspended: resume, and show it.
            log.exception("self.crashed", hash=spec.hash)
            error = f"condo bug: {exc!r}"
        else:
            if helper is None:
                ctx.handed_over()
                log.info("self.handed_over", hash=spec.hash)
                ctx.exit_condo()
                return
            # The hand-over container stops this condo (SIGTERM: a clean exit, whose final
            # state write comes before the successor starts); until then the API answers.
            # Still here when it ended, or after the limit: it failed before stopping us.
            log.info("self.handing_over", hash=spec.hash, helper=helper.helper)
            error = await _hand_over_stalled(ctx.docker, helper)
            await _remove_quietly(ctx.docker, helper.helper, "the hand-over container")
            await _remove_quietly(ctx.docker, helper.successor, "the successor")
        log.error("self.deploy_failed", hash=spec.hash, error=error)
        failed.add(spec.hash)
        ctx.report(SelfStatus(spec.hash, "failed", error))
        ctx.resume()
        spec = None


async def _hand_over_stalled(docker: DockerClient, started: HandOverStarted) -> str:
    """Return once the hand-over container ended, or after HAND_OVER_STOP_LIMIT, without this
    condo having been stopped: why the hand-over failed."""
    with trio.move_on_after(HAND_OVER_STOP_LIMIT):
        while True:
            # A rare, bounded wait: looking once a second costs nothing worth an event stream.
            await trio.sleep(HAND_OVER_POLL_DELAY)
            try:
                info = await docker.inspect(started.helper)
            except ContainerNotFound:
                return "the hand-over container vanished before it stopped this condo"
            except DockerError:
                continue  # the engine is away for a moment: look again
            if not info.running:
                return (
                    f"the hand-over container exited ({info.exit_code}) "
                    "before it stopped this condo"
                )
    return f"the hand-over container did not stop this condo in {HAND_OVER_STOP_LIMIT:g} s"


# --- the hand-over container (`condo hand-over`) ------------------------------------------------


async def run_hand_over(docker: DockerClient, plan: HandOverPlan) -> int:
    """Stop the old condo, start the new one, keep it if healthy; else bring the old one back.

    Exit code 0 when the successor took over, 1 when the old condo was brought back.
    """
    log.info("hand_over.stopping_old", old=plan.old, new=plan.new)
    with trio.move_on_after(OLD_STOP_GRACE + CLEANUP_LIMIT, shield=True):
        await docker.stop(plan.old, grace=OLD_STOP_GRACE)
    try:
        await _start_and_wait_healthy(docker, plan.new, plan.new[:12], plan.hash)
    except (SelfDeployFailed, DockerError) as exc:
        log.error("hand_over.failed", error=str(exc))
        await _remove_quietly(docker, plan.new, plan.new[:12])
        await trio.to_thread.run_sync(
            functools.partial(_record_failure, plan.state_path, plan.hash, str(exc))
        )
        # Nobody else brings the old condo back: keep trying while the engine is away.
        if await _persist(
            "start the old condo", lambda: docker.start(plan.old), limit=BRING_BACK_LIMIT
        ):
            log.info("hand_over.old_restarted", old=plan.old)
        return 1
    await _remove_quietly(docker, plan.old, plan.old[:12])
    log.info("hand_over.done", new=plan.new)
    return 0


def _record_failure(path: Path, hash_: str, error: str) -> None:
    """Write `"self": {hash, "failed", error}` into the state file (the successor is gone and
    the old condo is stopped: nobody else writes it now), so the old condo does not retry."""
    data = persist.read_state_file(path)
    document = dict(data) if isinstance(data, dict) else {}
    document["self"] = SelfStatus(hash_, "failed", error).to_json()
    try:
        persist.write_state_bytes(path, persist.encode_state(document))
    except StateFileError as exc:
        log.error("hand_over.state_write_failed", error=str(exc))

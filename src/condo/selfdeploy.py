"""Self-deploy: condo replacing its own container with the one `self.edn` describes.

`self.edn` is a bare create-container body (no `:spec` wrapper). Its hash is compared with the
`CONDO_SELF` environment variable of the running condo; when they differ (or `CONDO_SELF` is not
set, as for a condo started by hand), this happens, in order:

1. Every service is suspended: drivers finish the Docker call in flight and stop; no workload is
   touched; the state file is written.
2. The new condo container is created from `self.edn`, with `CONDO_SELF=<hash>` and
   `CONDO_HOST=<this condo's host>` added to its env (the same host name means it adopts every
   workload from the shared state file and labels), the labels `condo.self=<host>` and
   `condo.self-hash=<hash>`, and `AutoRemove` (unless it has a RestartPolicy), so that once it
   is itself replaced it disappears.
3. condo waits for the new container to be healthy (its image's HEALTHCHECK against /healthz;
   without a healthcheck: still running after SELF_NO_HEALTHCHECK_GRACE seconds).
4. Healthy: this condo exits 0. Not healthy within SELF_HEALTH_TIMEOUT: the new container is
   removed and this condo resumes every service; that hash is not tried again until self.edn
   changes (the original exited 1 and left nothing running).

If a healthy condo with the wanted hash already runs for this host (e.g. this one was restarted by
its RestartPolicy after handing over), this condo exits 0 without deploying anything.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from condo.docker import ContainerEvent, ContainerId, DockerClient, EventsResumed, run_events
from condo.errors import ContainerNotFound, DockerError
from condo.spec import SelfSpec

log = structlog.get_logger(__name__)

SELF_ENV = "CONDO_SELF"
SELF_LABEL = "condo.self"
SELF_HASH_LABEL = "condo.self-hash"
SELF_HEALTH_TIMEOUT = 60.0
SELF_NO_HEALTHCHECK_GRACE = 5.0
SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


def running_hash() -> str | None:
    """The hash of the self.edn this condo was started from (None: started by hand)."""
    return os.environ.get(SELF_ENV) or None


def self_body(spec: SelfSpec, host: str) -> dict[str, Any]:
    """The create body of the new condo container."""
    body = dict(spec.container)
    env = [str(e) for e in body.get("Env") or []]
    env = [e for e in env if not e.startswith(f"{SELF_ENV}=")]
    env.insert(0, f"{SELF_ENV}={spec.hash}")
    if not any(e.startswith("CONDO_HOST=") for e in env):
        env.append(f"CONDO_HOST={host}")
    body["Env"] = env
    body["Labels"] = {
        **(body.get("Labels") or {}),
        SELF_LABEL: host,
        SELF_HASH_LABEL: spec.hash,
    }
    host_config = dict(body.get("HostConfig") or {})
    if not (host_config.get("RestartPolicy") or {}).get("Name"):
        host_config.setdefault("AutoRemove", True)
    body["HostConfig"] = host_config
    return body


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


async def deploy_self(docker: DockerClient, spec: SelfSpec, host: str) -> bool:
    """Start the new condo container and wait for it; True when it is healthy.

    On failure the new container is removed. Raises nothing but Cancelled.
    """
    name = spec.fixed_name or "condo_" + "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(10))
    image = str(spec.container.get("Image", ""))
    token = secrets.token_hex(8)
    body = self_body(spec, host)
    body["Labels"] = {**body["Labels"], "condo.self-deploy": token}
    send, receive = trio.open_memory_channel[ContainerEvent | EventsResumed](16)
    cid: ContainerId | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_events(
                    docker, send, labels={"condo.self-deploy": token}, task_status=task_status
                )
            )
            if not await docker.image_present(image):
                await docker.pull(image)
            cid = await docker.create(body, name=name)
            await docker.start(cid)
            log.info("self.started", container=name, image=image, hash=spec.hash)
            healthy = await _wait_healthy(docker, cid, receive)
            nursery.cancel_scope.cancel()
    except DockerError as exc:
        log.error("self.deploy_failed", error=str(exc))
        healthy = False
    if not healthy and cid is not None:
        with trio.move_on_after(30, shield=True):
            try:
                await docker.remove(cid)
            except DockerError as exc:  # already gone (AutoRemove), or the engine is down
                log.warning("self.cleanup_failed", container=name, error=str(exc))
    return healthy


async def _wait_healthy(
    docker: DockerClient,
    cid: ContainerId,
    events: trio.MemoryReceiveChannel[ContainerEvent | EventsResumed],
) -> bool:
    info = await docker.inspect(cid)
    if not info.running:
        return False
    if info.health == "healthy":
        return True
    grace = SELF_NO_HEALTHCHECK_GRACE if info.health is None else SELF_HEALTH_TIMEOUT
    with trio.move_on_after(grace):
        async for event in events:
            if isinstance(event, EventsResumed):
                info = await docker.inspect(cid)  # missed events: look again
                if not info.running:
                    return False
                if info.health == "healthy":
                    return True
                continue
            if event.container_id != cid:
                continue
            if event.action == "health_status" and event.health == "healthy":
                return True
            if event.action in ("die", "destroy") or event.health == "unhealthy":
                log.warning("self.unhealthy", action=event.action, health=event.health)
                return False
    if info.health is None:
        return (await docker.inspect(cid)).running  # no healthcheck: still up after the grace
    log.warning("self.health_timeout", timeout=SELF_HEALTH_TIMEOUT)
    return False


async def run_self_deployer(
    docker: DockerClient,
    host: str,
    wanted: trio.MemoryReceiveChannel[SelfSpec],
    *,
    suspend: Callable[[], Awaitable[None]],
    resume: Callable[[], None],
    exit_condo: Callable[[], None],
) -> None:
    """Handle every new self.edn: deploy it, then exit condo, or resume on failure."""
    failed: set[str] = set()
    async for spec in wanted:
        if spec.hash == running_hash() or spec.hash in failed:
            continue
        if await already_handed_over(docker, spec, host):
            log.info("self.already_handed_over", hash=spec.hash)
            exit_condo()
            return
        log.info("self.deploy_started", hash=spec.hash, running=running_hash())
        await suspend()
        if await deploy_self(docker, spec, host):
            log.info("self.handed_over", hash=spec.hash)
            exit_condo()
            return
        log.error("self.deploy_abandoned", hash=spec.hash)
        failed.add(spec.hash)
        resume()

"""The root of condo's task tree: everything `condo run` does, owned by one nursery.

    root nursery (run_condo)
    ├─ state writer    writes the newest state file, coalesced (condo.persist.StateWriter)
    ├─ consul          session keeper + publisher + watcher (condo.consul), when --expose consul
    ├─ docker events   the engine's events (subscribed before anything is inspected)
    ├─ signals         SIGTERM/SIGINT: shut down; SIGHUP: reload registry credentials
    ├─ event router    routes them to the services' mailboxes; a `create` of a service nobody
    │                  drives spawns a driver that retires it
    ├─ spec watcher    full snapshots of the PREFIXes (condo.specdir)
    ├─ self-deployer   self.edn: suspend, start the successor, exit or resume (condo.selfdeploy)
    ├─ leftovers       once every PREFIX was listed: services known only from the state file or
    │                  the engine's labels
    ├─ web             the HTTP API (condo.web), when --server is not off
    └─ services nursery
       └─ one supervised driver per service (condo.service), restarted with backoff on a bug

Invariants:
- A service has exactly one driver while it has a spec, a record or a container; removing it is
  a message (`Mailbox.set_spec(None)`), and the driver ends by itself once nothing is left.
- Shutdown (cancel of the root) lets every Docker call in flight finish (they are shielded),
  then writes the state file one last time; workloads keep running unless --stop-on-exit.
- This module is condo's single supervision boundary: an unexpected exception in a driver is
  logged with its traceback, shown in the API, and the driver restarts from the stored state.
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import structlog
import trio

from condo import fsm, labels, persist, record
from condo.config import Config
from condo.consul import ConsulRunning, Publisher, run_consul
from condo.consul import check_config as check_consul_config
from condo.docker import (
    ContainerEvent,
    ContainerSummary,
    DockerClient,
    EventsResumed,
    RegistryAuth,
    open_docker,
    run_events,
)
from condo.errors import ConfigError, DockerError, StateFileError
from condo.selfdeploy import SelfContext, SelfStatus, run_self_deployer
from condo.service import Mailbox, ServiceContext, run_service
from condo.spec import SelfSpec, ServiceSpec
from condo.specdir import SpecSnapshot, run_spec_watcher
from condo.store import Store, now
from condo.waiting import StateSource

log = structlog.get_logger(__name__)

EVENTS_BUFFER = 256
CRASH_FIRST_DELAY = 1.0
CRASH_MAX_DELAY = 60.0
FLUSH_LIMIT = 2.0  # write-ahead waits at most this long for a struggling disk
SHUTDOWN_WRITE_LIMIT = 10.0
LEFTOVERS_RETRY_DELAY = 2.0


@attrs.frozen(kw_only=True)
class Running:
    """What `run_condo` reports once it is up (for tests and the web app)."""

    store: Store
    docker: DockerClient
    config: Config
    writer: persist.StateWriter
    shutdown: Callable[[], None]
    # Every host's state (Consul's picture) when --expose consul; None when exposing is off.
    global_source: StateSource | None = None
    # This host's publisher (its per-service failures, for /metrics) when --expose consul.
    consul_publisher: Publisher | None = None


class Supervisor:
    """Spawns, feeds and supervises the service drivers."""

    def __init__(
        self,
        config: Config,
        docker: DockerClient,
        store: Store,
        writer: persist.StateWriter,
        records: dict[str, fsm.ServiceState],
    ) -> None:
        self._config = config
        self._docker = docker
        self._store = store
        self._writer = writer
        self._records = records
        self._mailboxes: dict[str, Mailbox] = {}
        self._services: trio.Nursery | None = None
        self._last_snapshot: SpecSnapshot | None = None
        self._leftovers: set[str] = set()  # found while suspended, retired on resume
        self._specs_complete = trio.Event()  # every PREFIX was listed at least once
        # Self-deploy: the latest valid self.edn goes to the deployer; suspension stops every
        # driver (after its Docker call in flight) until resume() respawns them.
        self._wanted_self: trio.MemorySendChannel[SelfSpec] | None = None
        self._suspended = False
        self._suspend_requested = trio.Event()
        self._services_stopped = trio.Event()
        self._resume_requested = trio.Event()

    # --- tasks ----------------------------------------------------------------------------------

    async def run_services(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The services nursery; lives until cancelled, closed while suspended."""
        first = True
        while True:
            async with trio.open_nursery() as nursery:
                self._services = nursery
                if first:
                    task_status.started()
                    first = False
                else:
                    # Only now: a snapshot that arrives between resume() and here is kept
                    # (on_snapshot) and replayed by _respawn, never given to a closed nursery.
                    self._suspended = False
                    self._respawn()
                await self._suspend_requested.wait()
                # Drivers finish the Docker call in flight (shielded) and stop; their states
                # stay in the store.
                nursery.cancel_scope.cancel()
            self._services = None
            self._mailboxes.clear()
            self._suspend_requested = trio.Event()
            self._services_stopped.set()
            await self._resume_requested.wait()
            self._resume_requested = trio.Event()

    async def suspend(self) -> None:
        """Stop every driver (no workload is touched) and write the state file."""
        self._suspended = True
        self._services_stopped = trio.Event()
        self._suspend_requested.set()
        await self._services_stopped.wait()
        with trio.move_on_after(FLUSH_LIMIT):
            await self._writer.flush()
        log.info("supervisor.suspended")

    def resume(self) -> None:
        """Respawn every driver from its stored state, and catch up with the spec files."""
        self._resume_requested.set()
        log.info("supervisor.resumed")

    def want_self(self, channel: trio.MemorySendChannel[SelfSpec]) -> None:
        """Send every valid self.edn to `channel` (the self-deployer)."""
        self._wanted_self = channel

    def _respawn(self) -> None:
        self._records = {name: entry.state for name, entry in self._store.entries.items()}
        if self._last_snapshot is not None:
            self.on_snapshot(self._last_snapshot)
        for name in [*self._records, *self._leftovers]:
            if name not in self._mailboxes:
                mailbox = self._spawn(name)
                if self._specs_complete.is_set():
                    mailbox.set_spec(None)  # (else kept as recorded: see adopt_leftovers)
        self._leftovers.clear()

    async def run_event_router(
        self, receive: trio.MemoryReceiveChannel[ContainerEvent | EventsResumed]
    ) -> None:
        """Route the engine's events to the mailboxes of the services they are about."""
        async for item in receive:
            if isinstance(item, EventsResumed):
                log.info("docker.events_resumed")
                for mailbox in self._mailboxes.values():
                    mailbox.request_resync()
                continue
            service = item.attributes.get(labels.SERVICE, "")
            target = self._mailboxes.get(service)
            event = _translate(item)
            if target is not None and event is not None:
                target.put(event)
            elif (
                target is None
                and item.action == "create"
                and service
                and self._specs_complete.is_set()
            ):
                # A container of a service nobody drives (a create the engine carried out
                # after condo gave up on it, or after its spec was removed): a leftover.
                log.info("supervisor.leftover", service=service, container=item.container_id)
                self._retire_leftover(service)

    async def adopt_leftovers(self) -> None:
        """Give a driver to every service known only from the state file or the engine.

        Their spec files are gone (perhaps while condo was down): the drivers retire them.
        """
        if not self._specs_complete.is_set():
            # A PREFIX was never listed (an unmounted volume at start-up): the services it may
            # hold run on as recorded, and nothing is retired until every PREFIX was seen.
            log.warning("supervisor.leftovers_deferred", reason="a spec directory is unlisted")
            for name in list(self._records):
                if name not in self._mailboxes and self._services is not None:
                    self._spawn(name)
            await self._specs_complete.wait()
        for name in list(self._records):
            self._retire_leftover(name)
        for row in await self._list_own_containers():
            service = row.labels.get(labels.SERVICE)
            if service and service not in self._mailboxes:
                log.info("supervisor.leftover", service=service, container=row.name)
                self._retire_leftover(service)

    def _retire_leftover(self, name: str) -> None:
        if name in self._mailboxes:
            return
        if self._services is None:
            self._leftovers.add(name)  # suspended for a self-deploy: spawned on resume
            return
        self._spawn(name).set_spec(None)

    async def _list_own_containers(self) -> list[ContainerSummary]:
        """Every container of this host, waiting as long as the engine cannot answer."""
        while True:
            try:
                return await self._docker.list_containers(labels=labels.owned_by(self._config.host))
            except DockerError as exc:
                log.warning("supervisor.leftovers_unlisted", error=str(exc))
                await trio.sleep(LEFTOVERS_RETRY_DELAY)

    # --- spec snapshots -------------------------------------------------------------------------

    def on_snapshot(self, snapshot: SpecSnapshot) -> None:
        """A new full picture of the spec directories: tell each service what it is now."""
        self._last_snapshot = snapshot
        if isinstance(snapshot.self_spec, SelfSpec) and self._wanted_self is not None:
            # WouldBlock: the deployer is busy; resume() offers the latest self.edn again.
            with contextlib.suppress(trio.WouldBlock):
                self._wanted_self.send_nowait(snapshot.self_spec)
        if self._suspended or self._services is None:
            return  # replayed by _respawn once the services nursery is open again
        for name, entry in snapshot.entries.items():
            self._store.set_spec_error(name, entry.error, str(entry.path))
            mailbox = self._mailboxes.get(name) or self._spawn(name, entry.spec)
            if entry.spec is not None:
                mailbox.set_spec(entry.spec)
            # An invalid file changes nothing that runs: the driver keeps its last good spec.
        if not snapshot.complete:
            return  # a missing entry may be in a PREFIX never listed: it says nothing
        self._specs_complete.set()
        for name, mailbox in self._mailboxes.items():
            if name not in snapshot.entries:
                self._store.set_spec_error(name, None, None)
                mailbox.set_spec(None)

    def stop_all(self) -> None:
        """--stop-on-exit: retire every service (their drivers end when done)."""
        for mailbox in self._mailboxes.values():
            mailbox.set_spec(None)

    async def wait_all_finished(self) -> None:
        while self._mailboxes:
            await self._store.wait_changed(self._store.version)

    # --- drivers --------------------------------------------------------------------------------

    def _spawn(self, name: str, spec: ServiceSpec | None = None) -> Mailbox:
        assert self._services is not None, "run_services must be started first"
        mailbox = Mailbox()
        # First thing a driver does: reconcile its record with what the engine really has.
        mailbox.request_resync()
        self._mailboxes[name] = mailbox
        # Without a record, the spec is known before the first reconciliation, so that a
        # running container made from it is adopted (fsm._on_observed), never duplicated.
        initial = self._records.pop(name, None) or fsm.ServiceState(desired=spec)
        self._services.start_soon(self._supervise, name, mailbox, initial, name=f"service {name}")
        return mailbox

    async def _supervise(self, name: str, mailbox: Mailbox, initial: fsm.ServiceState) -> None:
        ctx = ServiceContext(
            name=name,
            host=self._config.host,
            engine=self._docker,
            store=self._store,
            flush_state=self._flush_state,
        )
        delay = CRASH_FIRST_DELAY
        state = initial
        while True:
            try:
                await run_service(ctx, mailbox, state)
                break
            except Exception as exc:
                log.exception("service.crashed", service=name, restart_in=delay)
                state = self._store.entries[name].state
                failure = fsm.Failure(message=f"condo bug: {exc!r}", at=now().wall)
                self._store.set_state(name, attrs.evolve(state, error=failure))
            await trio.sleep(delay)
            delay = min(delay * 2, CRASH_MAX_DELAY)
            state = self._store.entries[name].state
            mailbox.request_resync()
            mailbox.resend_spec()
        # Finished: the spec is gone and so is every container. (A cancelled driver, at
        # shutdown, never gets here: its record must survive into the state file.)
        if self._mailboxes.get(name) is mailbox:
            del self._mailboxes[name]
            entry = self._store.entries.get(name)
            if entry is not None and entry.spec_error is None:
                self._store.drop(name)

    async def _flush_state(self) -> None:
        """Write-ahead before a Docker call; bounded, so a failing disk never stops supervision."""
        if self._writer.last_error is not None:
            return  # reported loudly by the writer and /healthz; keep supervising
        with trio.move_on_after(FLUSH_LIMIT):
            await self._writer.flush()


def _translate(event: ContainerEvent) -> fsm.Event | None:
    cid = event.container_id
    match event.action:
        case "health_status" if event.health == "healthy":
            return fsm.ContainerHealthy(cid)
        case "health_status" if event.health == "unhealthy":
            return fsm.ContainerUnhealthy(cid)
        case "die":
            code = event.attributes.get("exitCode", "0")
            return fsm.ContainerDied(id=cid, exit_code=int(code) if code.isdigit() else -1)
        case "start":
            return fsm.ContainerRestarted(cid)
        case "destroy":
            return fsm.ContainerDestroyed(cid)
        case "create":
            return fsm.ContainerCreated(cid)
        case _:
            return None


async def _run_signals(stopping: trio.Event, auth: RegistryAuth) -> None:
    """SIGTERM/SIGINT: shut down gracefully; SIGHUP: re-read the registry credentials."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    auth.reload()
                except ConfigError as exc:
                    # A half-edited or broken config: keep the credentials that worked.
                    log.error("condo.auth_reload_failed", error=str(exc))
                    continue
                log.info("condo.auth_reloaded")
            else:
                log.info("condo.signal", signal=signal.Signals(signum).name)
                stopping.set()


@attrs.frozen
class Restored:
    """What the state file gives a starting condo (nothing, for a missing or foreign file)."""

    records: dict[str, fsm.ServiceState] = attrs.Factory(dict)
    self_status: SelfStatus | None = None


def load_state(config: Config) -> Restored:
    """The services' states and the last self-deploy, from one read of the state file;
    unreadable records are dropped (and logged).

    A file of another host or version is moved aside whole (`<file>.foreign-<time>`): its
    records describe somebody else's containers. Dropping a record is safe: the engine's labels
    still name this host's containers, and the driver rebuilds the service from them.
    """
    data = persist.read_state_file(config.state_path)
    if not isinstance(data, dict):
        return Restored()
    reason = record.foreign_reason(data, config.host)
    if reason is not None:
        persist.move_aside(config.state_path, reason, kind="foreign")
        return Restored()
    at = now()
    records: dict[str, fsm.ServiceState] = {}
    for name, entry in data["services"].items():
        try:
            records[str(name)] = record.from_record(entry, at)
        except record.RecordError as exc:
            log.warning("state.record_dropped", service=name, error=str(exc))
    return Restored(records, SelfStatus.from_json(data.get("self")))


def load_records(config: Config) -> dict[str, fsm.ServiceState]:
    """The services' states from the state file (see `load_state`)."""
    return load_state(config).records


def state_document(config: Config, store: Store) -> Callable[[], dict[str, Any]]:
    def snapshot() -> dict[str, Any]:
        document = record.state_document(config.host, store.records())
        if store.self_deploy is not None:
            # A failed self-deploy is remembered across restarts (not retried until it changes).
            document["self"] = dict(store.self_deploy)
        return document

    return snapshot


ServeWeb = Callable[[Running, trio.Event], Awaitable[None]]
# How run_condo reaches the engine: open_docker, or a test's stand-in (tests/faultsim).
OpenEngine = Callable[[str, RegistryAuth], AbstractAsyncContextManager[DockerClient]]


def _open_docker(url: str, auth: RegistryAuth) -> AbstractAsyncContextManager[DockerClient]:
    return open_docker(url, auth=auth)


async def run_condo(
    config: Config,
    *,
    web: ServeWeb | None = None,
    handle_signals: bool = False,
    open_engine: OpenEngine = _open_docker,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run condo until cancelled (or `Running.shutdown()`); then persist and return."""
    if config.expose == "consul":
        check_consul_config(config)  # a ConfigError now, not from inside the root nursery
    auth = RegistryAuth.load(config.docker_config)
    store = Store(config.host)
    restored = load_state(config)
    writer = persist.StateWriter(config.state_path, state_document(config, store))
    store.subscribe(writer.mark_dirty)
    stopping = trio.Event()
    # After a self-deploy hand-over the successor owns the state file: this condo writes nothing.
    writing = trio.CancelScope()
    handed_over = False

    def hand_over() -> None:
        nonlocal handed_over
        handed_over = True
        writing.cancel()

    async def run_writer(task_status: trio.TaskStatus[None]) -> None:
        with writing:
            await writer.run(task_status=task_status)

    async with open_engine(config.docker_url, auth) as docker:
        supervisor = Supervisor(config, docker, store, writer, restored.records)
        try:
            async with trio.open_nursery() as root:
                await root.start(run_writer)
                global_source: StateSource | None = None
                consul_publisher: Publisher | None = None
                if config.expose == "consul":
                    consul: ConsulRunning = await root.start(run_consul, config, store)
                    global_source, consul_publisher = consul.source, consul.publisher
                running = Running(
                    store=store,
                    docker=docker,
                    config=config,
                    writer=writer,
                    shutdown=stopping.set,
                    global_source=global_source,
                    consul_publisher=consul_publisher,
                )
                send, receive = trio.open_memory_channel[ContainerEvent | EventsResumed](
                    EVENTS_BUFFER
                )
                # Subscribed before any driver inspects, so that no event falls between the two.
                await root.start(
                    lambda task_status: run_events(
                        docker, send, labels=labels.owned_by(config.host), task_status=task_status
                    )
                )
                if handle_signals:
                    root.start_soon(_run_signals, stopping, auth)
                root.start_soon(supervisor.run_event_router, receive)
                await root.start(supervisor.run_services)
                # Before the first scan: a self.edn present at start-up is deployed too.
                wanted_self, self_specs = trio.open_memory_channel[SelfSpec](1)
                supervisor.want_self(wanted_self)
                await root.start(
                    lambda task_status: run_spec_watcher(
                        config.prefixes,
                        supervisor.on_snapshot,
                        rescan_interval=config.rescan_interval,
                        task_status=task_status,
                    )
                )
                self_context = SelfContext(
                    docker=docker,
                    host=config.host,
                    state_path=config.state_path,
                    prefixes=config.prefixes,
                    docker_url=config.docker_url,
                    suspend=supervisor.suspend,
                    resume=supervisor.resume,
                    report=lambda status: store.set_self_deploy(status.to_json()),
                    handed_over=hand_over,
                    exit_condo=stopping.set,
                )
                await root.start(
                    functools.partial(
                        run_self_deployer,
                        self_context,
                        self_specs,
                        failed_before=restored.self_status,
                    )
                )
                root.start_soon(supervisor.adopt_leftovers)
                if web is not None:
                    root.start_soon(web, running, stopping)
                log.info(
                    "condo.started", host=config.host, prefixes=[str(p) for p in config.prefixes]
                )
                task_status.started(running)
                await stopping.wait()
                if config.stop_on_exit:
                    log.info("condo.stopping_workloads")
                    supervisor.stop_all()
                    await supervisor.wait_all_finished()
                root.cancel_scope.cancel()
        finally:
            if handed_over:
                log.info("condo.handed_over")  # the successor owns the state file now
            else:
                with trio.move_on_after(SHUTDOWN_WRITE_LIMIT, shield=True):
                    try:
                        payload = persist.encode_state(state_document(config, store)())
                        await trio.to_thread.run_sync(
                            persist.write_state_bytes, config.state_path, payload
                        )
                    except StateFileError as exc:
                        log.error("state.final_write_failed", error=str(exc))
            log.info("condo.stopped")

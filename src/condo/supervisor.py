"""The `Supervisor`: one driver per service, fed with specs and events, restarted on a bug.

It owns the services nursery and what reaches it (condo.run wires it into the root task tree):
    services nursery (run_services)
    └─ one supervised driver per service (condo.service), restarted with backoff on a bug
    event router (run_event_router)  the engine's events to the services' mailboxes; a `create`
                                     of a service nobody drives spawns a driver that retires it
    leftovers (adopt_leftovers)      once every PREFIX was listed: services known only from the
                                     state file or the engine's labels
    on_snapshot                      the spec watcher's full pictures of the PREFIXes
    suspend / resume                 for a self-deploy (condo.selfdeploy calls them)

Invariants:
- A service has exactly one driver while it has a spec, a record or a container; removing it is
  a message (`Mailbox.set_spec(None)`), and the driver ends by itself once nothing is left.
- This module is condo's single supervision boundary: an unexpected exception in a driver is
  logged with its traceback, shown in the API, and the driver restarts from the stored state.
"""

from __future__ import annotations

import attrs
import structlog
import trio

from condo import fsm, labels, persist
from condo.config import Config
from condo.docker import ContainerEvent, ContainerSummary, DockerClient, EventsResumed
from condo.errors import DockerError
from condo.service import Mailbox, ServiceContext, run_service
from condo.spec import ServiceSpec
from condo.specdir import SpecSnapshot
from condo.store import Store, now

log = structlog.get_logger(__name__)

CRASH_FIRST_DELAY = 1.0
CRASH_MAX_DELAY = 60.0
FLUSH_LIMIT = 2.0  # write-ahead waits at most this long for a struggling disk
LEFTOVERS_RETRY_DELAY = 2.0


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
        # Self-deploy (condo.selfdeploy calls suspend/resume): suspension stops every driver
        # (after its Docker call in flight) until resume() respawns them.
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
        # That was the last write while suspended: a successor may read the file from now on,
        # and must never see it overwritten by this condo (resume() or close() write again).
        self._writer.hold()
        log.info("supervisor.suspended")

    def resume(self) -> None:
        """Respawn every driver from its stored state, and catch up with the spec files."""
        self._resume_requested.set()
        self._writer.release()
        log.info("supervisor.resumed")

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
        self._store.mark_settled()

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
        if self._suspended or self._services is None:
            return  # replayed by _respawn once the services nursery is open again
        for name, entry in snapshot.entries.items():
            self._store.set_spec_error(name, entry.error, str(entry.path))
            mailbox = self._mailboxes.get(name) or self._spawn(name, entry.spec)
            if entry.spec is not None:
                mailbox.offer_spec(entry.spec)
            # An invalid file changes nothing that runs: the driver keeps its last good spec.
        if not snapshot.complete:
            return  # a missing entry may be in a PREFIX never listed: it says nothing
        self._specs_complete.set()
        for name, mailbox in self._mailboxes.items():
            if name not in snapshot.entries:
                self._store.set_spec_error(name, None, None)
                mailbox.offer_spec(None)

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
        # In the store from now on (the driver starts later): once the store is settled, every
        # service this host runs has an entry (Consul's host record relies on it).
        if name not in self._store.entries:
            self._store.set_state(name, initial)
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

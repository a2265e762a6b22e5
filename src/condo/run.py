"""`condo run`: the root of condo's task tree, and the one place that wires its parts together.

    root nursery (run_condo)
    ├─ signals         SIGTERM/SIGINT: shut down; SIGHUP: reload registry credentials; beside
    │                  the others, until the final write (a second SIGTERM is not fatal)
    ├─ state writer    the newest state file, coalesced (condo.persist.StateWriter)
    ├─ consul          session keeper + publisher + watcher (condo.consul), when --expose consul
    ├─ docker events   the engine's events (subscribed before anything is inspected)
    ├─ event router    the events to the services' mailboxes (condo.supervisor)
    ├─ services        one supervised driver per service (condo.supervisor, condo.service)
    ├─ history         the deploy history's file and its digest lookups (condo.history)
    ├─ proxy           `:proxy`: the NAT table, HAProxy's listeners and servers follow the store
    │                  (condo.proxy)
    ├─ spec watcher    full snapshots of the PREFIXes (condo.specdir): specs to the supervisor,
    │                  self.edn to the self-deployer
    ├─ self-deployer   self.edn: suspend, start the successor, exit or resume (condo.selfdeploy)
    ├─ leftovers       services known only from the state file or the engine's labels
    ├─ notifier        deploy notices to each --notify URL (condo.notify), when given
    └─ web             the HTTP API (condo.web), when --server is not off

Every arrow points one way: the supervisor knows neither the self-deployer nor the web app; the
self-deployer reaches the supervisor through the two callbacks of its `SelfContext`; the web app
reads condo through `Running` (its `Condo` port). This is the only module that imports both the
supervisor and the web app (an import-linter contract keeps it so).

Shutdown (cancel of the root) lets every Docker call in flight finish (they are shielded), then
writes the state file one last time (`StateWriter.close`); workloads keep running unless
--stop-on-exit.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import attrs
import structlog
import trio

from condo import labels, persist, record
from condo.config import Config
from condo.consul import ConsulRunning, Publisher, run_consul
from condo.consul import check_config as check_consul_config
from condo.docker import ContainerEvent, DockerClient, EventsResumed, RegistryAuth, open_docker
from condo.docker import run_events as run_docker_events
from condo.errors import ConfigError
from condo.history import History, open_history
from condo.notify import Notifier, run_notifier
from condo.proxy.haproxy import HAProxy, ProxyContainer
from condo.proxy.nat import NatTable
from condo.proxy.reconcile import ProxyReconciler, proxy_directory, run_proxy
from condo.selfdeploy import (
    SelfContext,
    SelfStatus,
    WantedSelf,
    find_own_container,
    run_self_deployer,
)
from condo.spec import SelfSpec
from condo.specdir import SpecSnapshot, run_spec_watcher
from condo.store import Store, now
from condo.supervisor import Supervisor
from condo.tasks import run_beside
from condo.waiting import HostDirectory, StateSource
from condo.web import ApiServer

log = structlog.get_logger(__name__)

EVENTS_BUFFER = 256
SHUTDOWN_WRITE_LIMIT = 10.0
SUSPEND_FLUSH_LIMIT = 5.0


@attrs.frozen(kw_only=True)
class Running:
    """What `run_condo` reports once it is up (for tests and the web app)."""

    store: Store
    docker: DockerClient
    config: Config
    writer: persist.StateWriter
    shutdown: Callable[[], None]
    history: History
    # Every host's state (Consul's picture) when --expose consul; None when exposing is off.
    global_source: StateSource | None = None
    # This host's publisher (its per-service failures, for /metrics) when --expose consul.
    consul_publisher: Publisher | None = None
    # The hosts' records (`condo forget`) when --expose consul.
    host_directory: HostDirectory | None = None
    # The deploy notices' receivers (their counts, for /metrics) when --notify is given.
    notifier: Notifier | None = None
    # The :proxy listeners' connections (for /metrics).
    proxy: ProxyReconciler | None = None


# The web task: serves the API of a running condo until `stopping` (condo.web.ApiServer).
ServeWeb = Callable[[Running, trio.Event], Awaitable[None]]
# How run_condo reaches the engine: open_docker, or a test's stand-in (tests/faultsim).
OpenEngine = Callable[[str, RegistryAuth], AbstractAsyncContextManager[DockerClient]]


def _open_docker(url: str, auth: RegistryAuth) -> AbstractAsyncContextManager[DockerClient]:
    return open_docker(url, auth=auth)


async def serve(config: Config) -> None:
    """`condo run`: bind the API first (a taken or bad --server is a ConfigError before anything
    starts), then run until a signal."""
    web = await ApiServer.listen(config.server) if config.server is not None else None
    try:
        await run_condo(config, web=web, handle_signals=True)
    finally:
        if web is not None:
            web.close()  # only frees the socket if the server never started


def load_state(config: Config) -> record.Restored:
    """The services' states and the last self-deploy, from one read of the state file.

    A file of another host or version is moved aside whole (`<file>.foreign-<time>`): its
    records describe somebody else's containers. Dropping an unreadable record is safe: the
    engine's labels still name this host's containers, and the driver rebuilds the service.
    """
    data = persist.read_state_file(config.state_path)
    if data is None:
        return record.Restored()
    try:
        restored = record.read_document(data, config.host, now())
    except record.ForeignDocument as exc:
        persist.move_aside(config.state_path, exc.reason, kind="foreign")
        return record.Restored()
    for name, error in restored.dropped.items():
        log.warning("state.record_dropped", service=name, error=error)
    return restored


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
    stopping = trio.Event()
    root = functools.partial(
        _run_root, config, auth, stopping, web=web, open_engine=open_engine, task_status=task_status
    )
    if not handle_signals:
        await root()
        return
    # Beside the root, not in it: the handlers stay installed until the final write is done.
    # Cancelled with the root, a second SIGTERM during shutdown (while the Docker calls in flight
    # finish) would meet the default action and kill condo before it persists.
    await run_beside(root, functools.partial(_run_signals, stopping, auth), name="signals")


async def _run_root(
    config: Config,
    auth: RegistryAuth,
    stopping: trio.Event,
    *,
    web: ServeWeb | None,
    open_engine: OpenEngine,
    task_status: trio.TaskStatus[Running],
) -> None:
    """The root nursery, until `stopping`; then the final write."""
    store = Store(config.host)
    restored = load_state(config)
    writer = persist.StateWriter(config.state_path, store.state_bytes)
    store.subscribe(writer.mark_dirty)
    history = open_history(config.state_path, config.host)
    store.on_transition(history.on_transition)
    notifier: Notifier | None = None
    if config.notify_urls:
        # The notices are the history's changes told: one set of rules for both.
        secrets = (config.api_token or "", config.consul_token or "")
        notifier = Notifier(config.host, config.notify_urls, secrets=secrets)
        history.listen(notifier.on_step)
    wanted_self = WantedSelf()

    async with open_engine(config.docker_url, auth) as docker:
        supervisor = Supervisor(config, docker, store, writer, restored.records)
        # condo in a container: HAProxy in a container of its own (a process would die with
        # condo's container); else a detached host process. Its NAT rules would be those of
        # its own network namespace: only with host networking are they the host's.
        own = await find_own_container(docker)
        launcher = None
        nat_refused = None
        if own is not None:
            launcher = ProxyContainer(docker, own.image_id or own.image, own.binds, config.host)
            if own.network_mode != "host":
                nat_refused = "condo runs in a container without --network host"
        proxy = ProxyReconciler(
            HAProxy(proxy_directory(config.state_path), launcher=launcher),
            docker,
            NatTable(config.host, proxy_directory(config.state_path) / "nat-table"),
            choice=config.proxy_plane,
            nat_refused=nat_refused,
        )

        def on_snapshot(snapshot: SpecSnapshot) -> None:
            if isinstance(snapshot.self_spec, SelfSpec):
                wanted_self.offer(snapshot.self_spec)
            supervisor.on_snapshot(snapshot)

        try:
            async with trio.open_nursery() as root:
                await root.start(writer.run, name="state writer")
                consul: ConsulRunning | None = None
                if config.expose == "consul":
                    consul = await root.start(run_consul, config, store, name="consul")
                running = Running(
                    store=store,
                    docker=docker,
                    config=config,
                    writer=writer,
                    shutdown=stopping.set,
                    history=history,
                    global_source=None if consul is None else consul.source,
                    consul_publisher=None if consul is None else consul.publisher,
                    host_directory=None if consul is None else consul.source,
                    notifier=notifier,
                    proxy=proxy,
                )
                send, receive = trio.open_memory_channel[ContainerEvent | EventsResumed](
                    EVENTS_BUFFER
                )
                # Subscribed before any driver inspects, so that no event falls between the two.
                await root.start(
                    functools.partial(
                        run_docker_events, docker, send, labels=labels.owned_by(config.host)
                    ),
                    name="docker events",
                )
                root.start_soon(supervisor.run_event_router, receive, name="event router")
                await root.start(supervisor.run_services, name="services")
                await root.start(functools.partial(history.run, docker), name="history")
                await root.start(functools.partial(run_proxy, store, docker, proxy), name="proxy")
                # Before the self-deployer: a self.edn present at start-up is offered too.
                await root.start(
                    functools.partial(
                        run_spec_watcher,
                        config.prefixes,
                        on_snapshot,
                        rescan_interval=config.rescan_interval,
                    ),
                    name="spec watcher",
                )
                self_context = SelfContext(
                    docker=docker,
                    host=config.host,
                    state_path=config.state_path,
                    prefixes=config.prefixes,
                    docker_url=config.docker_url,
                    suspend=functools.partial(_suspend, supervisor, history),
                    resume=functools.partial(_resume, supervisor, history),
                    report=lambda status: store.set_self_deploy(status.to_json()),
                    handed_over=functools.partial(_hand_over, writer, history),
                    exit_condo=stopping.set,
                )
                await root.start(
                    functools.partial(
                        run_self_deployer,
                        self_context,
                        wanted_self,
                        failed_before=SelfStatus.from_json(restored.self_deploy),
                    ),
                    name="self-deployer",
                )
                root.start_soon(supervisor.adopt_leftovers, name="leftovers")
                if notifier is not None:
                    await root.start(run_notifier, notifier, name="notifier")
                if web is not None:
                    root.start_soon(web, running, stopping, name="web")
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
            await writer.close(SHUTDOWN_WRITE_LIMIT)
            await history.close(SHUTDOWN_WRITE_LIMIT)
            log.info("condo.stopped")


# The history file follows the state file through a self-deploy: held while suspended (a successor
# may be reading it), silent once handed over.


async def _suspend(supervisor: Supervisor, history: History) -> None:
    await supervisor.suspend()
    if history.writer is not None:
        with trio.move_on_after(SUSPEND_FLUSH_LIMIT):
            await history.writer.flush()
        history.writer.hold()


def _resume(supervisor: Supervisor, history: History) -> None:
    if history.writer is not None:
        history.writer.release()
    supervisor.resume()


def _hand_over(writer: persist.StateWriter, history: History) -> None:
    writer.hand_over()
    if history.writer is not None:
        history.writer.hand_over()


async def _run_signals(
    stopping: trio.Event, auth: RegistryAuth, task_status: trio.TaskStatus[None]
) -> None:
    """SIGTERM/SIGINT: shut down gracefully (once: a repeated one changes nothing); SIGHUP:
    re-read the registry credentials."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
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

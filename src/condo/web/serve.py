"""Serving the API: hypercorn's Trio worker inside condo's root nursery (no threads, no asyncio).

Owns: the listening socket (`ApiServer.listen`, bound before serving so that a bad `--server` is a
start-up error and port 0 reveals its real port at once), the hypercorn configuration, the wiring
of the app to a running condo (metrics subscriptions, the engine's health, the state sources, the
allowed Host names, the caps on waits and feeds sized to the open-files limit), and the shutdown
sequence.

Shutdown (the `stopping` event, which SIGTERM sets, or cancellation of the web task):
1. `Closing.close()` wakes every long-poll (503) and websocket (close 1001) at once;
2. hypercorn's shutdown trigger fires: it stops accepting and waits for the open connections;
3. all of it runs shielded from the root's cancellation under a `DRAIN_LIMIT` deadline, so the
   answers from step 1 reach their clients even though condo cancels the root right away, and
   the web task still ends within `DRAIN_LIMIT` seconds.
Every HTTP answer given once closing carries `Connection: close`: hypercorn's own close of a
finished keep-alive connection runs in quart-trio's already-cancelled connection scope and is
lost, so without it each such connection would hold shutdown for the whole graceful timeout;
with it, the client hangs up at once.
hypercorn shields its socket writes, so a client that stopped reading could hold a write (and
shutdown) forever; accepted sockets therefore carry TCP_USER_TIMEOUT = `STALL_LIMIT`: the kernel
drops a connection whose sent data has not moved for that long.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Protocol

import hypercorn.trio
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from condo.config import DEFAULT_SERVER, Bind, Config, parse_server
from condo.errors import ConfigError
from condo.fds import RESERVE, fd_limit, web_caps
from condo.history import History
from condo.metrics import DockerCall, Metrics, NotifyReceivers, ProxyListeners, ServiceMetrics
from condo.store import Store
from condo.waiting import HostDirectory, StateSource
from condo.web.app import WebContext, build_app
from condo.web.assets import StaticFiles
from condo.web.door import Door
from condo.web.health import EngineHealth
from condo.web.hosts import AllowedHosts
from condo.web.lifecycle import Closing
from condo.web.local import LocalSource

log = structlog.get_logger(__name__)

GRACEFUL_TIMEOUT = 0.5  # hypercorn's wait for open connections once told to stop
DRAIN_LIMIT = 0.8  # the whole shutdown of the web task, from `stopping` to return
STALL_LIMIT = 5.0  # TCP_USER_TIMEOUT: a peer that takes no data for this long is dropped
MAX_HEADERS = 16 * 1024  # request line + headers; beyond it hypercorn answers 431
MAX_WEBSOCKET_MESSAGE = 64 * 1024
BACKLOG = 128
HOUSEKEEPING_LIMIT = 1.0  # closing a connection, or arming its keep-alive timer
DOOR = "condo_door"  # the hypercorn config's attribute that names its front door


class StateFileStatus(Protocol):
    """condo.persist.StateWriter, as far as /healthz cares."""

    @property
    def last_error(self) -> BaseException | None: ...


class EngineProbe(Protocol):
    """condo.docker.DockerClient, as far as the web app cares."""

    async def ping(self) -> str: ...
    def add_call_observer(self, observer: Callable[[DockerCall], None]) -> Callable[[], None]: ...


class PublishFailures(Protocol):
    """condo.consul.Publisher, as far as /metrics cares."""

    def add_failure_observer(
        self, observer: Callable[[str, str | None], None]
    ) -> Callable[[], None]: ...


class Condo(Protocol):
    """What the web server needs of a running condo (condo.run.Running)."""

    @property
    def store(self) -> Store: ...
    @property
    def docker(self) -> EngineProbe: ...
    @property
    def config(self) -> Config: ...
    @property
    def writer(self) -> StateFileStatus: ...
    @property
    def history(self) -> History: ...
    @property
    def global_source(self) -> StateSource | None:
        """Every host's state (condo.consul) when exposing to Consul, else None."""
        ...

    @property
    def host_directory(self) -> HostDirectory | None:
        """The hosts' records (`DELETE /v1/hosts/HOST`) when exposing to Consul, else None."""
        ...

    @property
    def consul_publisher(self) -> PublishFailures | None:
        """This host's Consul publisher when exposing to Consul, else None."""
        ...

    @property
    def notifier(self) -> NotifyReceivers | None:
        """The --notify receivers' deliveries when --notify is given, else None."""
        ...

    @property
    def proxy(self) -> ProxyListeners | None:
        """The `:proxy` listeners' connection counts (None in tests without a proxy)."""
        ...


class ApiServer:
    """The API server of one condo: a bound socket, then (called by run_condo) the serving task.

    Usage::

        web = await ApiServer.listen(config.server)     # ConfigError when it cannot bind
        try:
            await run_condo(config, web=web)             # web(running, stopping) serves
        finally:
            web.close()                                  # only matters if it never served
    """

    def __init__(self, sock: socket.socket, name: str | None = None) -> None:
        self._socket: socket.socket | None = sock
        host, port = sock.getsockname()[:2]
        self.host: str = host
        self.port: int = port
        # The --server host as given (a name, maybe): clients may use it as their Host.
        self.names: tuple[str, ...] = (host,) if name is None else (host, name)

    @classmethod
    async def listen(cls, bind: Bind) -> ApiServer:
        """Bind (and listen on) `bind`; port 0 picks a free port (see `.port`)."""
        try:
            infos = await trio.socket.getaddrinfo(
                bind.host, bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:  # gaierror: an unknown host name
            raise ConfigError(f"--server {bind}: cannot listen: {exc.strerror or exc}") from None
        problems: list[str] = []
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if bind.reuse_port:  # opt-in: otherwise a second condo on the port must fail
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux; inherited by accepted sockets
                    sock.setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(STALL_LIMIT * 1000)
                    )
                sock.bind(address)
                sock.listen(BACKLOG)
            except OSError as exc:  # not permitted, no such address: try the next one
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    # Taken (another condo?): never fall back to another address of the name,
                    # or two condos would each answer half the clients.
                    raise ConfigError(
                        f"--server {bind}: cannot listen: {exc.strerror or exc}"
                    ) from None
                problems.append(exc.strerror or str(exc))
                continue
            return cls(sock, bind.host)
        raise ConfigError(f"--server {bind}: cannot listen: {'; '.join(problems) or 'no address'}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Release the socket if it was never served (serving closes it itself)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __call__(self, running: Condo, stopping: trio.Event) -> None:
        """Serve the API for `running` until `stopping` is set (or the task is cancelled)."""
        if self._socket is None:
            raise RuntimeError("this ApiServer was already served or closed")
        # hypercorn adopts the descriptor (fd://) and closes it when it stops.
        fd = self._socket.detach()
        self._socket = None
        store = running.store
        metrics = Metrics()
        service_metrics = ServiceMetrics(metrics, store)
        service_metrics.sync()
        store.subscribe(service_metrics.on_change)
        remove_observer = running.docker.add_call_observer(metrics.observe_docker_call)
        publisher = running.consul_publisher
        remove_publish_observer = (
            publisher.add_failure_observer(metrics.observe_consul_publish) if publisher else None
        )
        metrics.notify.source = running.notifier
        metrics.proxy.source = running.proxy
        metrics.consul_following.source = running.global_source
        writer = running.writer
        config = running.config
        limit = fd_limit()
        caps = web_caps(limit, config.max_waits, config.max_feeds)
        allowed = AllowedHosts.of(self.names, config.allowed_hosts)
        log.info(
            "web.limits",
            open_files=limit,
            reserve=RESERVE,
            max_waits=caps.waits,
            max_feeds=caps.feeds,
            allowed_hosts=sorted(allowed.names),
        )
        context = WebContext(
            store=store,
            local=LocalSource(store),
            global_source=running.global_source,
            host_directory=running.host_directory,
            health=EngineHealth(running.docker.ping),
            state_file_error=lambda: writer.last_error,
            metrics=metrics,
            closing=Closing(),
            static=await trio.to_thread.run_sync(StaticFiles.scan),
            api_token=config.api_token,
            allowed_hosts=allowed,
            max_waits=caps.waits,
            max_feeds=caps.feeds,
            history=running.history,
        )
        quart = build_app(context)
        app = closing_connections(quart, context.closing)
        door: Door = quart.extensions["condo.door"]
        try:
            await serve_app(app, hypercorn_config(fd), context.closing, stopping, door=door)
        finally:
            remove_observer()
            if remove_publish_observer is not None:
                remove_publish_observer()


async def serve_web(running: Condo, stopping: trio.Event) -> None:
    """The `web` task for run_condo: serve on `running.config.server` (default 127.0.0.1:4280)."""
    bind = running.config.server or parse_server(DEFAULT_SERVER)
    assert bind is not None
    server = await ApiServer.listen(bind)
    try:
        await server(running, stopping)
    finally:
        server.close()


def hypercorn_config(fd: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    # hypercorn's own complaints go through stdlib logging, which condo.logs renders.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.h11_max_incomplete_size = MAX_HEADERS
    config.h2_max_header_list_size = MAX_HEADERS
    config.websocket_max_message_size = MAX_WEBSOCKET_MESSAGE
    config.include_server_header = False
    return config


def closing_connections(app: ASGIFramework, closing: Closing) -> ASGIFramework:
    """`app`, with `Connection: close` on every HTTP answer that starts once `closing`."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and closing.closed:
                headers = [*message["headers"], (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped


def _close_answered_connections() -> None:
    """Make hypercorn's connection housekeeping happen after an answer, and never cut one.

    hypercorn closes a connection whose answer said `Connection: close` (or an HTTP/1.0 one),
    and arms its keep-alive timeout on an idle one, from inside the app's task, which
    quart-trio has already cancelled by then: the close raises Cancelled before the socket is
    closed, and the idle timer is never armed. Such a client (a refused long-poll included)
    would hold its descriptor for as long as it likes. Shielded, with a bound, both happen.
    Data writes are left alone (hypercorn shields them itself; TCP_USER_TIMEOUT bounds them).

    hypercorn's close (`TCPServer._close`: send_eof, then aclose) does not take the lock its
    data writes take. When the reading task closes (the client sent more after an answer that
    said `Connection: close` — its 1,000th on one keep-alive connection — or hung up) while the
    app task is between writes of an answer, the app's next write meets the half-closed stream
    busy in send_eof: BusyResourceError, "Error in ASGI Framework", and the rest of the answer
    is lost. The close therefore waits for the write in flight (bounded and shielded, like the
    rest); a write that comes after it finds the stream closed, which hypercorn handles quietly.
    Idempotent; patched once per process, since hypercorn offers no hook for it.
    """
    if getattr(TCPServer.protocol_send, "_condo_shielded", False):
        return
    original = TCPServer.protocol_send

    async def protocol_send(self: TCPServer, event: Event) -> None:
        if isinstance(event, RawData):
            await original(self, event)
            return
        with trio.move_on_after(HOUSEKEEPING_LIMIT, shield=True):
            await original(self, event)

    async def close(self: TCPServer) -> None:
        with trio.move_on_after(HOUSEKEEPING_LIMIT, shield=True):
            async with self.send_lock:
                # Gone already, or a TLS stream (no half-close): aclose does it all.
                with contextlib.suppress(
                    trio.BrokenResourceError,
                    trio.BusyResourceError,
                    trio.ClosedResourceError,
                    AttributeError,
                ):
                    await self.stream.send_eof()
        await self.stream.aclose()

    protocol_send._condo_shielded = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    TCPServer._close = close  # type: ignore[method-assign]


def _front_door() -> None:
    """Let a served app's `Door` look at each new connection before hypercorn builds anything
    for it (hypercorn offers no hook for it: its TCPServer.run is wrapped, once per process).
    The door of a server is its hypercorn config's `DOOR` attribute."""
    if getattr(TCPServer.run, "_condo_door", False):
        return
    original = TCPServer.run

    async def run(self: TCPServer) -> None:
        door: Door | None = getattr(self.config, DOOR, None)
        if door is not None and await door.admit(self):
            return  # the door holds the connection now
        await original(self)

    run._condo_door = True  # type: ignore[attr-defined]
    TCPServer.run = run  # type: ignore[method-assign]


async def serve_app(
    app: ASGIFramework,
    config: HypercornConfig,
    closing: Closing,
    stopping: trio.Event,
    *,
    door: Door | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run hypercorn (and `door`, in front of it) until `stopping` (or cancellation); then drain
    within DRAIN_LIMIT."""
    _close_answered_connections()
    front = door if door is not None and Door.available() else None
    if front is not None:
        _front_door()
        setattr(config, DOOR, front)
    shutdown = trio.Event()
    # Shielded so that the root's cancel (right after `stopping`) does not cut the answers that
    # `closing` just produced; the deadline set below bounds it instead.
    drain = trio.CancelScope(shield=True)

    async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
        with drain:
            async with trio.open_nursery() as nursery:
                if front is not None:
                    await nursery.start(front.run)
                urls = await nursery.start(
                    partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown.wait)
                )
                task_status.started(urls)

    async with trio.open_nursery() as nursery:
        try:
            urls: list[str] = await nursery.start(serve)
            log.info("web.listening", urls=urls)
            task_status.started(urls)
            await stopping.wait()
        finally:
            # Stopping or cancelled: either way, wake the waiters, stop hypercorn, bound it all.
            closing.close()
            shutdown.set()
            drain.deadline = trio.current_time() + DRAIN_LIMIT
    log.info("web.stopped")

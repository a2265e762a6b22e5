"""The HAProxy process behind `:proxy`: its files, its start or adoption, its admin socket.

This is the only code that touches HAProxy. The process is not condo's: it runs in master-worker
mode, started detached (`-D`, its own session) on the host by `condo run`, or as a container of
condo's own image with host networking by a condo that runs in a container (`ProxyContainer`),
so a `kill -9`, a SIGTERM, a restart or a self-deploy of condo never touches it or its
connections; a condo that starts finds it by its admin socket, and adopts it. Its files live in
one directory beside the state file (`<state>.proxy/`): `haproxy.cfg`, `haproxy.pid` (the
master), `master.sock`, `admin.sock`, `haproxy.log` (a host process's stderr; a container's is
its log), `haproxy.loaded` (the listeners the running worker loaded: written once it answers).

Servers change over the admin socket with no reload (`add server`, `enable server`, `disable
server`, `del server`). A listener cannot be added that way in HAProxy 2.6: a change of
listeners rewrites the config, which also holds the servers of the moment, and reloads the
master (its `reload` command on the master socket): the new worker takes the listening sockets
over from the old one (`expose-fd listeners`: no connection is refused) and the old worker keeps
its open connections until they end.

Each backend also holds a `hold` server, a backup at an address where nothing listens: while no
container is ready, a connection is sent there, refused, and retried (one second apart,
redispatched each time) until a ready server appears or its retries run out. That is how a
connection arriving in a `[:Before]` gap waits instead of being refused.

Invariants:
- Every admin command is one connection, bounded by `COMMAND_LIMIT`; every failure to start,
  reload or ask is a `ProxyError` (never an OSError or a Trio error).
- A config is checked by `haproxy -c` before it replaces the running one: a bad one never
  reaches the master.
- One HAProxy per directory: a master of this config that lives but does not answer (stopped,
  hung) is waited for, never doubled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import structlog
import trio

from condo.docker.models import ContainerId
from condo.errors import ContainerNotFound, DockerError, ProxyError

log = structlog.get_logger(__name__)

COMMAND_LIMIT = 5.0
START_LIMIT = 10.0
HOLD_ADDRESS = "127.0.0.1:1"  # tcpmux's port: nothing listens there, a connect is refused
SERVER_HOST = "127.0.0.1"
SIGNATURE_PREFIX = "# condo-listeners: "
PROXY_LABEL = "condo.proxy"  # on HAProxy's container: the host it proxies for
# Retries a held connection gets beyond its health timeout: one second apart, so a connection
# arriving at the start of a gap outlasts a candidate that turns healthy at its deadline.
HOLD_EXTRA_RETRIES = 3
# HAProxy 2.6 refuses a unix socket path longer than this (sun_path less its temporary suffix).
SOCKET_PATH_LIMIT = 97

ServerState = Literal["ready", "drain"]


@attrs.frozen
class ServerLine:
    """A server of a backend: a container's port on 127.0.0.1."""

    name: str
    port: int
    state: ServerState


@attrs.frozen
class Frontend:
    """One listener and its backend."""

    name: str  # also its backend's name (frontends and backends are separate namespaces)
    bind: str  # "HOST:PORT", "[V6]:PORT" or ":PORT" (every interface)
    mode: Literal["tcp", "http"]
    hold_timeout: float
    servers: tuple[ServerLine, ...] = ()

    @property
    def retries(self) -> int:
        return math.ceil(self.hold_timeout) + HOLD_EXTRA_RETRIES

    def signature(self) -> list[object]:
        """What only a reload can change (the servers change over the socket)."""
        return [self.name, self.bind, self.mode, self.retries]


@attrs.frozen
class ServerStatus:
    """A server as `show servers state` reports it."""

    backend: str
    name: str
    port: int
    ready: bool  # no maintenance flag (forced or from the config)


@attrs.frozen
class FrontendStats:
    current: int  # open connections
    total: int  # connections since the worker started (a reload's new worker starts at 0)


def signature(frontends: Sequence[Frontend]) -> str:
    return json.dumps(sorted(f.signature() for f in frontends), separators=(",", ":"))


def render_config(directory: Path, frontends: Sequence[Frontend]) -> str:
    """The whole `haproxy.cfg` for these listeners and their servers of the moment."""
    lines = [
        "# Written by condo (condo.proxy) on every change of listeners: do not edit.",
        SIGNATURE_PREFIX + signature(frontends),
        "global",
        f"    stats socket {directory / 'admin.sock'} mode 600 level admin expose-fd listeners",
        "    stats timeout 1m",
        # A port another process holds is refused, never shared: with SO_REUSEPORT a second
        # HAProxy (another condo's, one left stopped) would take a share of its connections.
        # A reload does not need it: the new worker takes the listening sockets over.
        "    noreuseport",
        "defaults",
        "    timeout connect 2s",
        # Long-lived TCP and WebSocket connections: a connection ends when its peers end it,
        # or when the drained container is stopped.
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout tunnel 1h",
        "    option redispatch 1",
    ]
    for f in sorted(frontends, key=lambda f: f.name):
        lines += [
            f"frontend {f.name}",
            f"    bind {f.bind}",
            f"    mode {f.mode}",
            f"    default_backend {f.name}",
            f"backend {f.name}",
            f"    mode {f.mode}",
            "    balance roundrobin",
            f"    retries {f.retries}",
            f"    server hold {HOLD_ADDRESS} backup",
        ]
        if f.mode == "tcp":
            # Bytes that need no look move kernel to kernel (splice): measured 1.2x and 1.3x the
            # requests/s of a copy in two sittings on a 2-core machine (small HTTP answers).
            lines.insert(len(lines) - 1, "    option splice-auto")
        for s in f.servers:
            # A draining server is in maintenance: no new connection, open ones continue (condo
            # uses no persistence, so this is HAProxy's drain without its sticky sessions).
            disabled = " disabled" if s.state == "drain" else ""
            lines.append(f"    server {s.name} {SERVER_HOST}:{s.port}{disabled}")
    return "\n".join(lines) + "\n"


class HAProxy:
    """The HAProxy of one condo: its directory, its master's pid, its admin socket."""

    def __init__(
        self, directory: Path, binary: str = "haproxy", launcher: Launcher | None = None
    ) -> None:
        # Absolute: HAProxy reads a socket path without a "/" as HOST:PORT (`--state x.json`).
        self.directory = directory.absolute()
        self.binary = binary
        self.launcher: Launcher = launcher or HostProcess()
        self.config = self.directory / "haproxy.cfg"
        self.pidfile = self.directory / "haproxy.pid"
        self.master_socket = self.directory / "master.sock"
        self.admin_socket = self.directory / "admin.sock"
        self.logfile = self.directory / "haproxy.log"
        # The signature of the listeners the running worker loaded (written once it answers).
        self.loaded = self.directory / "haproxy.loaded"

    def socket_problem(self) -> str | None:
        """Why HAProxy cannot make its sockets in this directory (a path too long), or None."""
        return socket_path_problem(self.directory)

    # --- the process ----------------------------------------------------------------------

    def master_pid(self) -> int | None:
        """The master's pid from the pid file, if that process is this directory's HAProxy
        and alive: not a zombie its parent has not reaped yet, not another process that got
        the pid since (a reboot), not the pid of another pid namespace (a container's)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # no file, garbage in it, no such process
            return None
        state = stat.rpartition(")")[2].split()[:1]
        if state in (["Z"], ["X"]) or os.fsencode(self.config) not in argv:
            return None
        return pid

    def unanswering(self) -> str | None:
        """Why no HAProxy may be started (when none answers on the admin socket): the master
        of this directory runs, hung or stopped (SIGSTOP), not dead. A second one would leave
        it holding its ports, and once it goes on, its connections with old routes."""
        if (pid := self.master_pid()) is None:
            return None
        return (
            f"haproxy (pid {pid}) runs but does not answer on {self.admin_socket}: condo waits"
            f" for it (kill {pid} and condo starts another)"
        )

    async def running_signature(self) -> str | None:
        """The listeners' signature of the running HAProxy (the one it loaded, as condo saw it
        answer after a start or a reload), or None when no HAProxy of this directory answers:
        one to adopt as it is, or to replace. The config file's own would lie: condo killed
        between writing it and the reload, or a reload that did not take (a listen address
        another process holds: the old worker runs on) leave a config the worker never read."""
        try:
            await self.command("show info")
        except ProxyError:
            return None
        try:
            return await trio.to_thread.run_sync(self.loaded.read_text)
        except OSError:  # none recorded: a reload puts the wanted listeners in place
            return ""

    async def start(self, frontends: Sequence[Frontend]) -> None:
        """Write the config and start a master-worker HAProxy (by the launcher: a detached host
        process, or a container); return once its admin socket answers."""
        if (problem := self.socket_problem()) is not None:
            raise ProxyError(problem)
        await trio.to_thread.run_sync(lambda: self.directory.mkdir(mode=0o700, exist_ok=True))
        if (problem := self.unanswering()) is not None:
            raise ProxyError(problem)
        await self._write_checked(frontends)
        await trio.to_thread.run_sync(lambda: self.loaded.unlink(missing_ok=True))
        for stale in (self.admin_socket, self.master_socket):
            stale.unlink(missing_ok=True)
        await self.launcher.launch(self)
        await self._wait_answering(None)
        await self._record_loaded(frontends)
        log.info("proxy.started", launcher=self.launcher.kind, directory=str(self.directory))

    async def reload(self, frontends: Sequence[Frontend]) -> None:
        """Write the config and reload the master (its `reload` command on the master socket:
        the same for a host process and a container): new listeners, closed ones, the same
        connections. Returns once the new worker answers."""
        before = await self._worker_pid()
        if before is None:
            raise ProxyError("no HAProxy answers: nothing to reload")
        await self._write_checked(frontends)
        await self.command("reload", socket=self.master_socket)
        try:
            await self._wait_answering(before)
        except ProxyError as exc:
            # A master whose new config fails (a listen address another process holds) keeps
            # its old worker, and that one keeps answering: the reload did not take.
            raise ProxyError(
                f"haproxy's reload did not take, its worker runs on with the listeners it had"
                f" (a listen address another process holds?): {exc}"
            ) from exc
        await self._record_loaded(frontends)
        log.info("proxy.reloaded", listeners=len(frontends))

    def left_out(
        self, frontends: Sequence[Frontend], *, running: Collection[str]
    ) -> dict[str, str]:
        """The new listeners (not among the `running` frontends' names) whose address another
        process holds: name → why. A reload into one fails, and on its way HAProxy 2.6 refuses
        on every listener for seconds (measured: 2.5 s). Known for a host process only (a
        condo in a container has a network namespace of its own): {} for a container."""
        if self.launcher.kind != "process":
            return {}
        found = {}
        for frontend in frontends:
            if frontend.name not in running and (problem := bind_problem(frontend.bind)):
                found[frontend.name] = problem
        return found

    async def stop(self) -> None:
        """Stop the master and its workers (tests; condo itself never stops its proxy)."""
        await self.launcher.stop(self)

    async def _write_checked(self, frontends: Sequence[Frontend]) -> None:
        text = render_config(self.directory, frontends)
        candidate = self.directory / "haproxy.cfg.new"
        await trio.to_thread.run_sync(candidate.write_text, text)
        try:
            result = await trio.run_process(
                [self.binary, "-c", "-f", str(candidate)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as exc:
            raise ProxyError(self.cannot_run(exc)) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").splitlines()
            alerts = [line for line in output if "ALERT" in line][:2] or output[-2:]
            raise ProxyError(f"haproxy refused its config: {' '.join(alerts)}")
        await trio.to_thread.run_sync(os.replace, candidate, self.config)

    async def _record_loaded(self, frontends: Sequence[Frontend]) -> None:
        temporary = self.directory / "haproxy.loaded.new"
        await trio.to_thread.run_sync(temporary.write_text, signature(frontends))
        await trio.to_thread.run_sync(os.replace, temporary, self.loaded)

    async def _worker_pid(self) -> str | None:
        try:
            info = await self.command("show info")
        except ProxyError:
            return None
        found = re.search(r"^Pid: (\d+)$", info, re.MULTILINE)
        return found.group(1) if found else None

    async def _wait_answering(self, old_worker: str | None) -> None:
        """Wait until a worker other than `old_worker` answers on the admin socket."""
        with trio.move_on_after(START_LIMIT):
            while True:
                worker = await self._worker_pid()
                if worker is not None and worker != old_worker:
                    return
                await trio.sleep(0.05)
        raise ProxyError(f"haproxy did not answer in {START_LIMIT:g} s: {self.log_tail()}")

    def cannot_run(self, exc: OSError) -> str:
        return (
            f"cannot run {self.binary} ({exc.strerror or exc}): :proxy needs HAProxy 2.6 on the"
            " host (apt-get install haproxy)"
        )

    def log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    # --- the admin socket -------------------------------------------------------------------

    def argv(self, *, daemon: bool) -> list[str]:
        """The master's command line (`daemon`: fork to the background, for a host process)."""
        argv = [self.binary, "-W", "-D" if daemon else "-db", "-f", str(self.config)]
        return [*argv, "-p", str(self.pidfile), "-S", str(self.master_socket)]

    async def command(self, line: str, *, socket: Path | None = None) -> str:
        """One admin command (or master command, on `socket`), its whole answer."""
        try:
            with trio.fail_after(COMMAND_LIMIT):
                stream = await trio.open_unix_socket(str(socket or self.admin_socket))
                async with stream:
                    await stream.send_all(line.encode() + b"\n")
                    chunks = []
                    while chunk := await stream.receive_some(65536):
                        chunks.append(chunk)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise ProxyError(f"haproxy admin socket: {line.split()[0]}: {exc!r}") from exc
        return b"".join(chunks).decode(errors="replace")

    async def servers(self) -> dict[str, dict[str, ServerStatus]]:
        """Every backend's servers, `hold` included."""
        text = await self.command("show servers state")
        found: dict[str, dict[str, ServerStatus]] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 19 or line.startswith("#"):
                continue
            backend, name, admin = fields[1], fields[3], int(fields[6])
            # srv_admin_state: 0x01 forced maintenance, 0x02 inherited, 0x04 from the config.
            status = ServerStatus(backend, name, int(fields[18]), ready=admin & 0x07 == 0)
            found.setdefault(backend, {})[name] = status
        return found

    async def frontend_stats(self) -> dict[str, FrontendStats]:
        """Open and total connections of each frontend of the current worker."""
        text = await self.command("show stat -1 1 -1")
        header: list[str] = []
        stats: dict[str, FrontendStats] = {}
        for line in text.splitlines():
            if line.startswith("# "):
                header = line[2:].split(",")
                continue
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("svname") == "FRONTEND":
                stats[row["pxname"]] = FrontendStats(
                    current=int(row.get("scur") or 0), total=int(row.get("stot") or 0)
                )
        return stats

    async def apply(self, command: str) -> str:
        """A server change; its answer (HAProxy answers errors in words, not codes)."""
        return (await self.command(command)).strip()


class Launcher(Protocol):
    """How the HAProxy master is started: it must outlive condo's process."""

    kind: str

    async def launch(self, proxy: HAProxy) -> None:
        """Start the master of `proxy`'s config (written already); ProxyError when it cannot."""
        ...

    async def stop(self, proxy: HAProxy) -> None: ...


class HostProcess:
    """HAProxy as a detached host process (`condo run` on the host): its own session, so
    nothing sent to condo's process group reaches it."""

    kind = "process"

    async def launch(self, proxy: HAProxy) -> None:
        with open(proxy.logfile, "ab") as stderr:  # noqa: ASYNC230 (a local file, opened once)
            try:
                # The launcher exits once the daemon forked.
                result = await trio.run_process(
                    proxy.argv(daemon=True),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    check=False,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ProxyError(proxy.cannot_run(exc)) from exc
        if result.returncode != 0:
            raise ProxyError(f"haproxy exited {result.returncode}: {proxy.log_tail()}")

    async def stop(self, proxy: HAProxy) -> None:
        pid = proxy.master_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


class ProxyEngine(Protocol):
    """The part of the Docker client a proxy container needs (condo.docker.DockerClient)."""

    async def create(self, body: Mapping[str, Any], *, name: str) -> ContainerId: ...
    async def start(self, cid: ContainerId) -> None: ...
    async def remove(self, cid: ContainerId) -> None: ...


@attrs.frozen
class ProxyContainer:
    """HAProxy as a container of condo's own image (condo in a container: a process it
    started would die with its container, e.g. when a self-deploy replaces it). Host
    networking: it listens on the host's ports and reaches the ports published on 127.0.0.1.
    It gets condo's own binds, so the proxy directory (beside the state file) is the same path
    in both containers, and HAProxy's sockets there are condo's way in."""

    engine: ProxyEngine
    image: str  # condo's own image (its id: a tag moved meanwhile does not matter)
    binds: tuple[str, ...]
    host: str
    kind = "container"

    @property
    def name(self) -> str:
        return f"condo-proxy-{self.host}"

    def body(self, proxy: HAProxy) -> dict[str, Any]:
        argv = proxy.argv(daemon=False)
        return {
            "Image": self.image,
            "Entrypoint": argv[:1],
            "Cmd": argv[1:],
            "Labels": {PROXY_LABEL: self.host},
            # condo's image checks condo's API: nothing of HAProxy's.
            "Healthcheck": {"Test": ["NONE"]},
            "HostConfig": {
                "NetworkMode": "host",
                "Binds": list(self.binds),
                # Restarted by the engine (a crash, the engine's restart); never by condo's end.
                "RestartPolicy": {"Name": "unless-stopped"},
            },
        }

    async def launch(self, proxy: HAProxy) -> None:
        try:
            # One that runs but does not answer (or a stopped one) is replaced.
            with contextlib.suppress(ContainerNotFound):
                await self.engine.remove(ContainerId(self.name))
            cid = await self.engine.create(self.body(proxy), name=self.name)
            await self.engine.start(cid)
        except DockerError as exc:
            raise ProxyError(f"cannot start the proxy container {self.name}: {exc}") from exc

    async def stop(self, proxy: HAProxy) -> None:
        with contextlib.suppress(ContainerNotFound):
            await self.engine.remove(ContainerId(self.name))


def socket_path_problem(directory: Path) -> str | None:
    """Why HAProxy could not make its sockets in `directory` (the proxy directory of a state
    file): the longest socket path is over HAProxy's limit. None when it fits."""
    longest = directory.absolute() / "master.sock"
    size = len(os.fsencode(longest))
    if size <= SOCKET_PATH_LIMIT:
        return None
    return (
        f"the proxy's socket path {longest} is {size} bytes, HAProxy allows {SOCKET_PATH_LIMIT}:"
        " give condo a --state file in a shorter directory"
    )


def bind_problem(bind: str) -> str | None:
    """Why HAProxy could not listen at `bind` (a `bind_address`) now, or None: the same bind as
    HAProxy's (SO_REUSEADDR; no SO_REUSEPORT: `noreuseport`), tried and let go."""
    host, _, port = bind.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", int(port)))  # ":PORT": every interface
        except OSError as exc:
            return f"cannot bind socket [{bind}]: {exc.strerror} (another process holds it?)"
    return None


def bind_address(host: str, port: int) -> str:
    if not host:
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def frontend_name(host: str, port: int) -> str:
    """A name HAProxy accepts, unique per listen address."""
    return "l_" + re.sub(r"[^A-Za-z0-9]", "_", host or "any") + f"_{port}"

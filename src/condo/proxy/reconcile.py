"""The proxy task: keeps condo's data planes equal to the routes the services' states call for.

Level-triggered: on every change of the store (and every `RETRY_DELAY` while something is left
to do: a drained server with open connections, a failed command) it computes the wanted
listeners and servers from scratch (condo.routes), chooses each listener's data plane
(`choose_plane`: the kernel's NAT for a `:tcp` listener when condo can use nftables, else
HAProxy), looks each routed container's published 127.0.0.1 port up on the engine, and brings
both planes there: condo's nftables table rewritten whole (condo.proxy.nat), then HAProxy (a
reload when its listeners differ, admin commands for the servers). The NAT goes first: a
listener that moves to it is taken over before HAProxy lets it go. The task waits until the
store is settled first: before that, a service missing from the store may only not be restored
yet, and closing its listener would refuse connections across a restart of condo.

Nothing here starts HAProxy until a listener is wanted on it; a HAProxy of this state file that
runs already is adopted as it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import structlog
import trio

from condo.docker.models import Container
from condo.errors import ContainerNotFound, DockerError, ProxyError
from condo.proxy import haproxy, nat
from condo.proxy.counts import ConnectionCounts
from condo.routes import Route, desired_routes
from condo.spec import ProxyListener
from condo.store import Store

log = structlog.get_logger(__name__)

RETRY_DELAY = 1.0
# A reload of HAProxy in a container that did not take (a listen address another process holds
# is found only by the reload, which refuses on every listener for seconds on its way) is tried
# again this much later, or as soon as the wanted listeners change.
RELOAD_BACKOFF = 60.0
STATS_DELAY = 5.0
WATCH_DELAY = 0.2  # how often a host process's master is looked for between passes
_AGREED = ("New server registered", "no need to change", "IP changed", "port changed")

Plane = Literal["nat", "haproxy"]
PlaneChoice = Literal["auto", "haproxy"]  # `condo run --proxy-plane`


def choose_plane(listener: ProxyListener, nat_usable: bool) -> Plane:
    """The data plane of one listener: the kernel's NAT for `:tcp` (IPv4) when condo can use
    nftables (it forwards in the kernel, with no copy); HAProxy for `:http` (a request at a
    time), for IPv6, and when the NAT cannot be used or `--proxy-plane haproxy` says so."""
    if nat_usable and listener.mode == "tcp" and nat.usable(listener.host):
        return "nat"
    return "haproxy"


class ContainerLookup(Protocol):
    """The part of the Docker client the proxy uses (condo.docker.DockerClient)."""

    async def inspect(self, cid_or_name: str) -> Container: ...


def proxy_directory(state_path: Path) -> Path:
    """Where the proxy's files live: beside the state file (contract: `<state>.proxy/`)."""
    return state_path.with_name(state_path.name + ".proxy")


class ProxyReconciler:
    """One pass at a time: wanted routes → the NAT table and HAProxy. Remembers what it knows
    of both."""

    def __init__(
        self,
        proxy: haproxy.HAProxy,
        engine: ContainerLookup,
        table: nat.NatTable | None = None,
        *,
        choice: PlaneChoice = "auto",
        nat_refused: str | None = None,
    ) -> None:
        self.proxy = proxy
        self._engine = engine
        # The NAT: None without a table; `nat_refused` says why it cannot be used here (condo
        # in a container without host networking); `--proxy-plane haproxy` uses it for
        # nothing, but still empties a table a condo before wrote.
        self.table = table
        self.choice: PlaneChoice = choice
        self._nat_refused = nat_refused
        self._nat_why_not: str | None = None  # the last check's answer
        self._nat_checked = False
        self._nat_failed = False  # a NAT step of the last pass failed
        self.planes: dict[str, Plane] = {}  # listen → its data plane, as of the last pass
        # counter name → (service, listen): the listeners the NAT carries, as of the last pass
        self._nat_services: dict[str, tuple[str, str]] = {}
        self._nat_carried: set[str] = set()  # the listeners the table held, as last read
        self._nat_keys: dict[str, tuple[str, str]] = {}  # every NAT counter's listener, ever
        self._nat_open: dict[str, int] = {}
        self._nat_ports: dict[str, tuple[str, int, nat.Replies]] = {}
        self._signature: str | None = None  # of the running HAProxy's listeners, once known
        self._master: int | None = None  # its master's pid, a host process's, once known
        # The last reload that did not take: its listeners' signature, when, and why.
        self._refused: tuple[str, float, ProxyError] | None = None
        # frontend name → (service, listen), for the metrics
        self._services: dict[str, tuple[str, str]] = {}
        self.stats: dict[str, haproxy.FrontendStats] = {}
        self.counts = ConnectionCounts()  # accepted, per listener, never backwards

    def gone(self) -> bool:
        """The master of the HAProxy this reconciler started or adopted is gone (known for a
        host process only: a container's pid is of another namespace)."""
        return self._master is not None and self.proxy.master_pid() != self._master

    def forget(self) -> None:
        """Look for the running HAProxy again at the next pass (after a failure); when the NAT
        failed, check it again and read and write its table whole too."""
        self._forget_haproxy()
        if self._nat_failed:
            self._nat_failed = False
            self._nat_checked = False
            if self.table is not None:
                self.table.forget()

    def _forget_haproxy(self) -> None:
        self._signature = None
        self._master = None

    def connections(self) -> Mapping[tuple[str, str], tuple[int, int]]:
        """(service, listen) → (open, accepted), as of the last pass (condo.metrics' port)."""
        found = {}
        for name, key in self._services.items():
            stats = self.stats.get(name)
            if stats is not None:
                found[key] = (stats.current, self.counts.accepted(key))
        for name, key in self._nat_services.items():
            found[key] = (self._nat_open.get(name, 0), self.counts.accepted(key))
        return found

    async def _nat_usable(self) -> bool:
        """Whether the NAT carries `:tcp` listeners (checked once: `nft -c` of the table)."""
        if self.table is None or self._nat_refused is not None:
            return False
        if not self._nat_checked:
            self._nat_why_not = await self.table.check()
            self._nat_checked = True
            if self._nat_why_not is not None:
                log.info("proxy.nat_unusable", reason=self._nat_why_not)
        return self._nat_why_not is None

    async def _read_stats(self) -> None:
        self.stats = await self.proxy.frontend_stats()
        for name, key in self._services.items():
            stats = self.stats.get(name)
            if stats is None:
                continue
            # (A count lower than the last: a new worker condo did not start, counted anew.)
            self.counts.read("haproxy", name, key, stats.total)

    async def reconcile(self, routes: Sequence[Route]) -> bool:
        """One pass; True when something is left for a later pass."""
        # No listener, and no rule of condo's to remove: nftables is left alone (no `nft` run).
        may_hold = self.table is not None and self.table.may_hold_rules()
        nat_usable = await self._nat_usable() if routes or may_hold else False
        nat_wanted = nat_usable and self.choice == "auto"
        carried: set[str] = set()
        if nat_usable:
            assert self.table is not None
            with self._nat_step():
                carried = await self.table.carried()
            self._nat_carried = carried
        # nftables became unusable (nft gone, CAP_NET_ADMIN lost) while the table holds rules:
        # the kernel keeps applying them, before any HAProxy listener sees a local connection.
        # Those listeners stay the NAT's (as they are, said so); HAProxy takes only the others.
        stuck = set() if nat_usable or self._nat_why_not is None else self._nat_carried
        if stuck:
            self._nat_failed = True  # checked again at the next pass
            routes = [r for r in routes if _counter(r) not in stuck]
        if nat_usable and any(self._taken_now(r, carried) for r in routes):
            assert self.table is not None
            with self._nat_step():
                await self.table.counters()  # what other condos' tables carry, read afresh
        planes: dict[str, Plane] = {}
        claimed: list[str] = []  # addresses another condo's NAT carries
        for route in routes:
            plane = choose_plane(route.listener, nat_wanted)
            # A rule would take the connections of a process that holds the address (condo's
            # own API port, another program's): such a listener is HAProxy's, which leaves it
            # out and says why. One the NAT or condo's HAProxy carries already is condo's own.
            if plane == "nat" and self._held_elsewhere(route, carried):
                plane = "haproxy"
            # Another condo's table (another --host) carries the address: its rule would take
            # the connections of either plane of this condo. Left out, said so; one this condo
            # carries already (both took it at once) is kept, and said so too.
            other = None
            if nat_usable and self.table is not None:
                other = self.table.claimed_elsewhere(_counter(route))
            if other is not None:
                claimed.append(
                    f"{route.listener.listen} is carried by another condo's NAT (table ip {other})"
                )
                if self._taken_now(route, carried):
                    continue
            planes[route.listener.listen] = plane
        on_nat = [r for r in routes if planes.get(r.listener.listen) == "nat"]
        on_haproxy = [r for r in routes if planes.get(r.listener.listen) == "haproxy"]
        if stuck:
            stuck_listens = sorted(
                listen for name, (_, listen) in self._nat_keys.items() if name in stuck
            )
            planes.update(dict.fromkeys(stuck_listens, "nat"))
            claimed.append(
                f"cannot change the NAT ({self._nat_why_not}): its rules for"
                f" {', '.join(stuck_listens)} stay as they were"
            )
        elif self._nat_why_not is not None and self.table and self.table.marked():
            # Rules a condo before this one wrote (its marker), which nothing can read or
            # change now: HAProxy carries the listeners, the kernel may still take some.
            self._nat_failed = True
            claimed.append(
                f"cannot read or change the NAT ({self._nat_why_not}) that a condo before this"
                f" one wrote (<state>.proxy/nat-table): its rules may take listeners' connections"
            )
        self.planes = planes
        # A listener changes planes without a refused connection: the one that takes it has it
        # before the other lets it go. The NAT is written first (it takes listeners over from
        # HAProxy); one that moves to HAProxy keeps its NAT rule until HAProxy listens.
        looked: dict[str, Container | None] = {}  # one inspect per container and pass
        moving: list[Route] = []
        if nat_usable:
            assert self.table is not None
            with self._nat_step():
                moving = [r for r in on_haproxy if _counter(r) in carried]
                await self._reconcile_nat([*on_nat, *moving], looked)
        try:
            pending = await self._reconcile_haproxy(on_haproxy, looked)
        except ProxyError as exc:
            raise ProxyError("; ".join([str(exc), *claimed])) from exc
        if moving:
            with self._nat_step():
                await self._reconcile_nat(on_nat, looked)
        if claimed:
            raise ProxyError("; ".join(claimed))
        return pending

    def _taken_now(self, route: Route, carried: set[str]) -> bool:
        """Whether this pass would make the listener condo's: neither its NAT nor its HAProxy
        carries it yet."""
        listener = route.listener
        return _counter(route) not in carried and (
            haproxy.frontend_name(listener.host, listener.port) not in self.stats
        )

    def _held_elsewhere(self, route: Route, carried: set[str]) -> bool:
        listener = route.listener
        if _counter(route) in carried:
            return False
        if haproxy.frontend_name(listener.host, listener.port) in self.stats:
            return False  # condo's HAProxy holds it: the NAT takes it over from there
        return haproxy.bind_problem(haproxy.bind_address(listener.host, listener.port)) is not None

    @contextlib.contextmanager
    def _nat_step(self) -> Iterator[None]:
        """A NAT step that fails makes the next pass check and read the NAT afresh (a HAProxy
        failure does not: the table is right, and is left alone)."""
        try:
            yield
        except BaseException:
            self._nat_failed = True
            raise

    async def _reconcile_nat(
        self, routes: Sequence[Route], looked: dict[str, Container | None]
    ) -> None:
        assert self.table is not None
        rules = []
        services: dict[str, tuple[str, str]] = {}
        ports: dict[str, tuple[str, int, nat.Replies]] = {}
        for route in routes:
            listener = route.listener
            name = _counter(route)
            local: int | None = None
            remote: tuple[str, int] | None = None
            replies: set[tuple[str, int]] = set()
            for server in route.servers:
                published = await self._published_port(server.container, server.target, looked)
                if published is None:
                    continue
                info = looked[server.container]
                address = "" if info is None else info.ip_address
                replies.add(("127.0.0.1", published))
                if address:
                    replies.add((address, server.target))
                if server.state == "ready" and local is None:
                    local = published
                    remote = (address, server.target) if address else None
            rules.append(nat.NatRule(name, listener.host, listener.port, local, remote))
            services[name] = (route.service, listener.listen)
            ports[name] = (listener.host, listener.port, frozenset(replies))
        await self.table.apply(rules)
        self._nat_carried = {rule.counter for rule in rules}
        self._nat_services, self._nat_ports = services, ports
        self._nat_keys.update(services)
        await self._read_nat_counts()
        if self.table.lost:  # deleted by hand since the write: written again at once
            await self.table.apply(rules)
            await self._read_nat_counts()

    async def _read_nat_counts(self) -> None:
        if not self._nat_services:
            return
        counts = await self.table.counters() if self.table is not None else {}
        for name, key in self._nat_services.items():
            # (A count lower than the last: the table was deleted and written again.)
            self.counts.read("nat", name, key, counts.get(name, 0))
        # Read and parsed in a worker thread: this pass runs at every store change.
        self._nat_open = await trio.to_thread.run_sync(nat.read_open_connections, self._nat_ports)

    async def _reconcile_haproxy(
        self, routes: Sequence[Route], looked: dict[str, Container | None]
    ) -> bool:
        if self.gone():
            self._forget_haproxy()  # start another at once
        frontends = [await self._frontend(route, looked) for route in routes]
        wanted = haproxy.signature(frontends)
        # Listeners whose address another process holds are left out (and said so at the end
        # of the pass): HAProxy would not start with them, and a reload into one fails after
        # refusing on every listener for seconds. The others run, and follow their services.
        left_out: dict[str, str] = {}
        if self._signature is None:
            self._signature = await self.proxy.running_signature()
            if self._signature is None:
                if not frontends:
                    return False  # nothing runs and nothing is wanted
                if (problem := self.proxy.unanswering()) is not None:
                    raise ProxyError(problem)  # its ports are its own: not "held elsewhere"
                left_out = self.proxy.left_out(frontends, running=())
                usable = [f for f in frontends if f.name not in left_out]
                if not usable:
                    raise ProxyError("; ".join(left_out.values()))
                await self.proxy.start(usable)
                self.counts.restarted("haproxy")  # the HAProxy that died took its counts
                self._signature = haproxy.signature(usable)
            else:
                log.info("proxy.adopted")
            if self.proxy.launcher.kind == "process":
                self._master = self.proxy.master_pid()
        reload_failed: ProxyError | None = None
        if wanted != self._signature:
            running = await self.proxy.frontend_stats()
            left_out = self.proxy.left_out(frontends, running=running)
            usable = [f for f in frontends if f.name not in left_out]
            if haproxy.signature(usable) != self._signature:
                # The listeners it has lead to the containers of the moment before the reload
                # is tried, and whether or not it takes: a listener that cannot be had must
                # not keep every other service's switch waiting.
                await self._sync_servers(frontends)
                # The old worker's last counts, then the new worker's from 0.
                await self._read_stats()
                target = haproxy.signature(usable)
                refused = self._refused
                if refused and refused[0] == target and trio.current_time() < refused[1]:
                    reload_failed = refused[2]  # not again yet
                else:
                    try:
                        await self.proxy.reload(usable)
                    except ProxyError as exc:
                        reload_failed = exc  # the old worker runs on: its listeners, counts
                        # A host process's binds were tried first: its failure is worth
                        # another try at the next pass.
                        if self.proxy.launcher.kind != "process":
                            self._refused = (target, trio.current_time() + RELOAD_BACKOFF, exc)
                    else:
                        self.counts.restarted("haproxy")
                        self._signature = target
                        self._refused = None
        self._services = {
            f.name: (r.service, r.listener.listen) for f, r in zip(frontends, routes, strict=True)
        }
        pending = await self._sync_servers(frontends)
        await self._read_stats()
        if reload_failed is not None:
            raise reload_failed
        if left_out:
            raise ProxyError("; ".join(left_out.values()) + " (the other listeners run)")
        return pending

    async def _frontend(
        self, route: Route, looked: dict[str, Container | None]
    ) -> haproxy.Frontend:
        listener = route.listener
        servers = []
        for server in route.servers:
            port = await self._published_port(server.container, server.target, looked)
            if port is not None:
                servers.append(haproxy.ServerLine(server.key, port, server.state))
        return haproxy.Frontend(
            name=haproxy.frontend_name(listener.host, listener.port),
            bind=haproxy.bind_address(listener.host, listener.port),
            mode=listener.mode,
            hold_timeout=route.hold_timeout,
            servers=tuple(servers),
        )

    async def _published_port(
        self, container: str, target: int, looked: dict[str, Container | None]
    ) -> int | None:
        # Asked on every pass: an ephemeral host port changes when the engine restarts the
        # container (its RestartPolicy), and a pass is one inspect per routed container (not
        # per listener: a service may have many).
        if container not in looked:
            try:
                looked[container] = await self._engine.inspect(container)
            except ContainerNotFound:
                looked[container] = None
            except DockerError as exc:
                raise ProxyError(f"cannot inspect {container[:12]}: {exc}") from exc
        info = looked[container]
        if info is None or not info.running:
            return None
        return info.loopback_ports.get(f"{target}/tcp")

    async def _sync_servers(self, frontends: Sequence[haproxy.Frontend]) -> bool:
        actual = await self.proxy.servers()
        pending = False
        for frontend in frontends:
            if frontend.name not in actual:  # a listener a reload has yet to add
                pending = True
                continue
            have = actual[frontend.name]
            backend = frontend.name
            for server in frontend.servers:
                ref = f"{backend}/{server.name}"
                status = have.get(server.name)
                ready = server.state == "ready"
                if status is None:
                    await self._do(f"add server {ref} {haproxy.SERVER_HOST}:{server.port}")
                    # An added server starts in maintenance: a draining one stays there.
                    if ready:
                        await self._do(f"enable server {ref}")
                    continue
                if status.port != server.port:
                    await self._do(
                        f"set server {ref} addr {haproxy.SERVER_HOST} port {server.port}"
                    )
                if status.ready != ready:
                    await self._do(f"{'enable' if ready else 'disable'} server {ref}")
            wanted = {s.name for s in frontend.servers}
            for name, status in have.items():
                if name == "hold" or name in wanted:
                    continue
                ref = f"{backend}/{name}"
                if status.ready:
                    await self._do(f"disable server {ref}")
                # Refused while the server has connections: those end when its container is
                # stopped (the drain), and the next pass deletes it.
                answer = await self.proxy.apply(f"del server {ref}")
                if not answer.startswith("Server deleted"):
                    pending = True
                else:
                    log.info("proxy.server_removed", backend=backend, server=name)
        return pending

    async def _do(self, command: str) -> None:
        answer = await self.proxy.apply(command)
        log.info("proxy.command", command=command, answer=answer)
        # Success is an empty answer or one of these sentences; anything else is HAProxy's
        # refusal in words.
        if answer and not answer.startswith(_AGREED):
            raise ProxyError(f"{command}: {answer}")


def _counter(route: Route) -> str:
    return nat.counter_name(route.listener.host, route.listener.port)


async def run_proxy(
    store: Store,
    engine: ContainerLookup,
    reconciler: ProxyReconciler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the data planes equal to the store's routes until cancelled (never stops HAProxy,
    never deletes the NAT table)."""
    task_status.started()
    seen = -1
    while not store.settled:
        seen = await store.wait_changed(seen)
    while True:
        seen = store.version
        routes, _conflicts = desired_routes({n: e.state for n, e in store.entries.items()})
        try:
            pending = await reconciler.reconcile(routes)
            error = None
        except ProxyError as exc:
            # HAProxy away, a command refused, the engine not answering: all worth another
            # pass, and what runs keeps running meanwhile. The next pass looks for HAProxy
            # afresh: one that died is started again.
            log.warning("proxy.reconcile_failed", error=str(exc))
            error = str(exc)
            reconciler.forget()
            pending = True
        except Exception as exc:
            # A bug (or an answer of a shape nobody foresaw) must not take condo down with
            # it: the services run on, and the proxy task tries again from scratch.
            log.exception("proxy.reconcile_crashed")
            error = f"the proxy task failed: {exc!r} (condo's log has more)"
            reconciler.forget()
            pending = True
        seen = _report(store, error, reconciler.planes, seen)
        # Something left: try again soon. Listeners: look again now and then for the
        # connection counts (/metrics). Else: only a change of the store matters.
        delay = RETRY_DELAY if pending else STATS_DELAY if routes else math.inf
        with trio.move_on_after(delay):
            # A HAProxy that died refuses every listener until the next pass starts another:
            # its master is watched meanwhile (a look at /proc), not only every STATS_DELAY.
            while not reconciler.gone():
                with trio.move_on_after(WATCH_DELAY):
                    await store.wait_changed(seen)
                    break


def _report(store: Store, error: str | None, planes: Mapping[str, Plane], seen: int) -> int:
    """Show the pass's error (None: the data planes are fine) and each listener's data plane in
    `/v1/state`. The report is a change of the store the task itself made: when nothing else
    changed meanwhile, it is no reason for another pass (the version the task has seen moves
    past it)."""
    unchanged = store.version == seen
    store.set_proxy_error(error)
    store.set_proxy_planes(planes)
    return store.version if unchanged else seen

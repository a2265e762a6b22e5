"""`:proxy`'s kernel NAT without the engine: the table condo writes (checked by `nft -c`, a dry
run, where nft can run: CI runs as root), which plane carries which listener, what the proxy task
tells nftables and `/v1/state`, and the connection counts it reads."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs
import pytest
import trio

from condo.docker.models import Container
from condo.errors import ProxyError
from condo.fsm import Box, Phase, ServiceState
from condo.proxy import haproxy, nat
from condo.proxy.reconcile import ProxyReconciler, choose_plane, run_proxy
from condo.routes import Route, desired_routes
from condo.spec import ProxyListener, ServiceSpec, parse_spec
from condo.store import Store
from tests.integration.harness import free_port
from tests.proxy_support import inspected, published_on_loopback

LOCAL = nat.NatRule("l_127_0_0_1_8080", "127.0.0.1", 8080, 32768, ("172.17.0.3", 80))
ANY = nat.NatRule("l_any_8081", "", 8081, 32769, ("172.17.0.4", 80))
HELD = nat.NatRule("l_10_0_0_5_8082", "10.0.0.5", 8082, None)


def test_the_table_is_one_transaction_of_flushed_chains_rules_and_counters() -> None:
    text = nat.render("condo-h1", [LOCAL, ANY, HELD], stale=["l_gone_1"])
    lines = text.splitlines()
    assert lines[:5] == [
        "add table ip condo-h1",
        "add chain ip condo-h1 output { type nat hook output priority -101 ; }",
        "flush chain ip condo-h1 output",
        "add chain ip condo-h1 prerouting { type nat hook prerouting priority -101 ; }",
        "flush chain ip condo-h1 prerouting",
    ]
    # Local clients go to the 127.0.0.1-published port; a loopback listener has no other hosts.
    assert (
        "add rule ip condo-h1 output ip daddr 127.0.0.1 tcp dport 8080 counter name"
        ' "l_127_0_0_1_8080" dnat to 127.0.0.1:32768'
    ) in lines
    assert not any("prerouting ip daddr 127.0.0.1" in line for line in lines)
    # Every interface: any local address; other hosts' traffic to the container's own address
    # and port (never 127.0.0.1: that would need route_localnet).
    assert (
        "add rule ip condo-h1 output fib daddr type local tcp dport 8081 counter name"
        ' "l_any_8081" dnat to 127.0.0.1:32769'
    ) in lines
    assert (
        "add rule ip condo-h1 prerouting fib daddr type local tcp dport 8081 counter name"
        ' "l_any_8081" dnat to 172.17.0.4:80'
    ) in lines
    # No ready container: new connections' SYNs are dropped (the client retransmits: held).
    assert "add rule ip condo-h1 output ip daddr 10.0.0.5 tcp dport 8082 drop" in lines
    assert "add rule ip condo-h1 prerouting ip daddr 10.0.0.5 tcp dport 8082 drop" in lines
    assert "add counter ip condo-h1 l_10_0_0_5_8082" in lines
    # A listener that went: its counter goes, after the rules that used it.
    assert lines[-1] == "delete counter ip condo-h1 l_gone_1"


async def test_nftables_accepts_the_table_as_written() -> None:
    table = nat.NatTable("unit-h1")
    if await table.check() is not None:
        pytest.fail(f"nft -c refuses an empty table: {await table.check()}")
    await nat.nft(nat.render(table.table, [LOCAL, ANY, HELD]), "-c")
    with pytest.raises(ProxyError, match="nft refused condo's table"):
        await nat.nft("add rule ip nowhere nochain drop\n", "-c")


async def test_the_table_is_written_whole_and_its_marker_follows_its_rules(
    tmp_path: Path,
) -> None:
    host = f"unit-{uuid.uuid4().hex[:10]}"
    marker = tmp_path / "s.proxy" / "nat-table"
    async with unit_table(marker, host) as table:
        assert not table.may_hold_rules()
        await table.apply([])  # nothing wanted, no table: none is made
        with pytest.raises(ProxyError, match="No such file or directory"):
            await nat.nft(None, "list", "table", "ip", table.table)
        assert await table.counters() == {}
        rule = nat.NatRule("l_127_0_0_1_1", "127.0.0.1", 1, 2)
        await table.apply([rule])
        assert marker.exists() and await table.counters() == {"l_127_0_0_1_1": 0}
        # A condo that starts later finds the marker: it has rules to look at.
        assert nat.NatTable(host, marker).may_hold_rules()
        await table.apply([attrs.evolve(rule, local=None)])  # held: the rule drops SYNs
        assert "drop" in await nat.nft(None, "list", "table", "ip", table.table)
        await table.apply([])  # the last listener went: its rule and counter go, the table stays
        listed = await nat.nft(None, "list", "table", "ip", table.table)
        assert "tcp dport" not in listed and "counter" not in listed
        assert not marker.exists() and not nat.NatTable(host, marker).may_hold_rules()


def test_each_host_has_its_own_table() -> None:
    assert nat.table_name("h1") == "condo-h1"
    assert nat.table_name("h1") != nat.table_name("h2")
    odd = nat.table_name("a b")
    assert odd.startswith("condo-a_b-") and odd != nat.table_name("a_b")


def listener(listen: str, mode: str = "tcp") -> ProxyListener:
    host, _, port = listen.rpartition(":")
    return ProxyListener(host.strip("[]"), int(port), 80, mode)  # type: ignore[arg-type]


def test_the_nat_carries_ipv4_tcp_listeners_when_it_can() -> None:
    assert choose_plane(listener("127.0.0.1:8080"), True) == "nat"
    assert choose_plane(listener(":8080"), True) == "nat"
    assert choose_plane(listener("127.0.0.1:8080", "http"), True) == "haproxy"
    assert choose_plane(listener("[::1]:8080"), True) == "haproxy"
    assert choose_plane(listener("127.0.0.1:8080"), False) == "haproxy"


CONNTRACK = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=50001 dport=8080 \
src=127.0.0.1 dst=127.0.0.1 sport=32768 dport=50001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=50002 dport=8080 \
src=127.0.0.1 dst=127.0.0.1 sport=32760 dport=50002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 100 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=50003 dport=8080 \
src=127.0.0.1 dst=127.0.0.1 sport=32768 dport=50003 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=50004 dport=8080 \
src=127.0.0.1 dst=127.0.0.1 sport=8080 dport=50004 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=127.0.0.1 dst=127.0.0.1 sport=5353 dport=8080 \
src=127.0.0.1 dst=127.0.0.1 sport=32768 dport=5353 mark=0 zone=0 use=2
"""


def test_open_connections_are_the_established_ones_the_nat_sent_on() -> None:
    # 50001 to the ready container, 50002 to the draining one; 50003 is closed, 50004 reached
    # a process listening on 8080 itself, the UDP one is no TCP.
    replies = frozenset({("127.0.0.1", 32768), ("127.0.0.1", 32760), ("172.17.0.3", 80)})
    found = nat.open_connections(CONNTRACK, {"l": ("127.0.0.1", 8080, replies)})
    assert found == {"l": 2}
    assert nat.open_connections(CONNTRACK, {"m": ("", 9090, replies)}) == {"m": 0}


def test_the_kernel_table_is_read_and_parsed_in_one_blocking_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The proxy pass runs it in a worker thread: the file can be megabytes on a busy host.)
    replies = frozenset({("127.0.0.1", 32768), ("127.0.0.1", 32760)})
    table = tmp_path / "nf_conntrack"
    table.write_text(CONNTRACK)
    monkeypatch.setattr(nat, "CONNTRACK", str(table))
    assert nat.read_open_connections({"l": ("127.0.0.1", 8080, replies)}) == {"l": 2}
    monkeypatch.setattr(nat, "CONNTRACK", str(tmp_path / "absent"))  # a kernel without it
    assert nat.read_open_connections({"l": ("127.0.0.1", 8080, replies)}) == {"l": 0}


def test_inspect_gives_the_address_and_network_mode() -> None:
    def parsed(network: dict[str, object], mode: str) -> Container:
        return inspected("abc", network, {"NetworkMode": mode})

    bridge = parsed({"IPAddress": "172.17.0.3"}, "bridge")
    assert (bridge.ip_address, bridge.network_mode) == ("172.17.0.3", "bridge")
    named = parsed({"IPAddress": "", "Networks": {"app": {"IPAddress": "10.1.0.2"}}}, "app")
    assert named.ip_address == "10.1.0.2"
    host = parsed({"Networks": {"host": {"IPAddress": ""}}}, "host")
    assert (host.ip_address, host.network_mode) == ("", "host")


# --- the proxy task and the NAT -------------------------------------------------------------------


class FakeTable(nat.NatTable):
    """condo's table as a list of writes; its counters as the test sets them."""

    def __init__(self, refuse: str | None = None, carries: frozenset[str] = frozenset()) -> None:
        super().__init__("h")
        self.refuse = refuse
        self.carries = set(carries)
        self.writes: list[list[nat.NatRule]] = []
        self.counts: dict[str, int] = {}
        self.checks = 0

    async def check(self) -> str | None:
        self.checks += 1
        return self.refuse

    async def carried(self) -> set[str]:
        return set(self.carries)

    async def apply(self, rules: Sequence[nat.NatRule]) -> None:
        self.writes.append(list(rules))
        self.carries = {rule.counter for rule in rules}

    async def counters(self) -> dict[str, int]:
        return dict(self.counts)


class Engine:
    """Every container runs, publishes 80 on 127.0.0.1:<32000 + its number>, has an address."""

    async def inspect(self, cid_or_name: str) -> Container:
        number = int(cid_or_name.removeprefix("c"))
        network = published_on_loopback(32000 + number, address=f"172.17.0.{number}")
        return inspected(cid_or_name, network)


def spec(proxy: str) -> ServiceSpec:
    return parse_spec(f'{{:spec {{:Image "web:1"}} :proxy {proxy}}}'.encode(), "web.edn")


def on_loopback(listen: int, port: int = 80) -> ServiceSpec:
    """web with one `:proxy` listener on 127.0.0.1:`listen` to the containers' `port`."""
    return spec(f'[{{:listen "127.0.0.1:{listen}" :port {port}}}]')


def box(cid: str, s: ServiceSpec) -> Box:
    return Box(id=cid, name=f"web_{cid}", spec=s, created_at=1.0, healthcheck=True)


def routes_of(state: ServiceState) -> Store:
    store = Store("h")
    store.set_state("web", state)
    store.mark_settled()
    return store


TCP = '[{:listen "127.0.0.1:8080" :port 80}]'


@pytest.fixture(autouse=True)
def nothing_holds_the_ports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No process holds a listen address (the tests' 8080 may be taken on the machine that runs
    them); a test that wants one held appends its bind address."""
    held: list[str] = []

    def problem(bind: str) -> str | None:
        return f"cannot bind socket [{bind}]" if bind in held else None

    monkeypatch.setattr(haproxy, "bind_problem", problem)
    return held


async def one_pass(store: Store, reconciler: ProxyReconciler) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(run_proxy, store, Engine(), reconciler)
        with trio.fail_after(5):
            while store.view()["services"]["web"]["proxy"][0]["plane"] is None:
                await store.wait_changed(store.version)
        nursery.cancel_scope.cancel()


async def test_a_tcp_listener_goes_through_the_nat_and_the_view_says_so(tmp_path: Path) -> None:
    s = spec(TCP)
    old, new = box("c1", s), box("c2", s)
    table = FakeTable()
    # No HAProxy binary: a pass that wanted HAProxy would fail.
    proxy = no_haproxy(tmp_path)
    reconciler = ProxyReconciler(proxy, Engine(), table)
    draining = ServiceState(phase=Phase.WaitNext, desired=s, current=old, next=new, draining=True)
    store = routes_of(draining)
    await one_pass(store, reconciler)
    assert store.view()["services"]["web"]["proxy"][0]["plane"] == "nat"
    assert "proxy" not in store.view()  # no error: HAProxy was never needed
    # The new container takes new connections; the draining one keeps its conntrack entries.
    assert table.writes[-1] == [
        nat.NatRule("l_127_0_0_1_8080", "127.0.0.1", 8080, 32002, ("172.17.0.2", 80))
    ]
    # A [:Before] gap: no ready container, the rule holds (drops SYNs).
    gap = routes_of(ServiceState(phase=Phase.Wait, desired=s))
    routes, _ = desired_routes({n: e.state for n, e in gap.entries.items()})
    await reconciler.reconcile(routes)
    assert table.writes[-1] == [nat.NatRule("l_127_0_0_1_8080", "127.0.0.1", 8080, None, None)]
    assert table.checks == 1  # checked once, not at every pass


async def test_the_nat_count_never_goes_backwards(tmp_path: Path) -> None:
    s = spec(TCP)
    store = routes_of(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
    routes, _ = desired_routes({n: e.state for n, e in store.entries.items()})
    table = FakeTable()
    reconciler = ProxyReconciler(haproxy.HAProxy(tmp_path / "p"), Engine(), table)
    key = ("web", "127.0.0.1:8080")
    table.counts = {"l_127_0_0_1_8080": 7}
    await reconciler.reconcile(routes)
    assert reconciler.connections()[key][1] == 7
    table.counts = {"l_127_0_0_1_8080": 2}  # the table was deleted by hand and written again
    await reconciler.reconcile(routes)
    assert reconciler.connections()[key][1] == 9


@pytest.mark.parametrize(
    ("mode", "choice", "refuse", "refused"),
    [
        ("http", "auto", None, None),  # HTTP is HAProxy's
        ("tcp", "haproxy", None, None),  # --proxy-plane haproxy
        ("tcp", "auto", "nft refused condo's table: Operation not permitted", None),  # no root
        ("tcp", "auto", None, "condo runs in a container without --network host"),
    ],
)
async def test_haproxy_carries_what_the_nat_cannot_or_must_not(
    tmp_path: Path, mode: str, choice: str, refuse: str | None, refused: str | None
) -> None:
    s = spec(f'[{{:listen "127.0.0.1:8080" :port 80 :mode :{mode}}}]')
    store = routes_of(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
    routes, _ = desired_routes({n: e.state for n, e in store.entries.items()})
    table = FakeTable(refuse)
    proxy = no_haproxy(tmp_path)
    reconciler = ProxyReconciler(
        proxy,
        Engine(),
        table,
        choice=choice,  # type: ignore[arg-type]
        nat_refused=refused,
    )
    with pytest.raises(ProxyError, match="cannot run"):  # HAProxy was wanted (and is absent)
        await reconciler.reconcile(routes)
    usable = refuse is None and refused is None
    # A usable NAT carries nothing, but is emptied (a table a condo before wrote); an unusable
    # one is never written.
    assert table.writes == ([[]] if usable else [])


async def test_a_listener_moving_to_haproxy_keeps_its_nat_rule_until_haproxy_listens(
    tmp_path: Path,
) -> None:
    s = spec(TCP)
    store = routes_of(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
    routes, _ = desired_routes({n: e.state for n, e in store.entries.items()})
    # A condo before this one carried the listener on the NAT; this one is told HAProxy.
    table = FakeTable(carries=frozenset({"l_127_0_0_1_8080"}))
    proxy = no_haproxy(tmp_path)
    reconciler = ProxyReconciler(proxy, Engine(), table, choice="haproxy")
    with pytest.raises(ProxyError, match="cannot run"):  # HAProxy cannot listen (yet)
        await reconciler.reconcile(routes)
    # The rule is kept (rewritten as it is): connections keep going through the NAT.
    assert table.writes == [
        [nat.NatRule("l_127_0_0_1_8080", "127.0.0.1", 8080, 32001, ("172.17.0.1", 80))]
    ]


async def test_no_listener_and_no_rule_leaves_nftables_alone(tmp_path: Path) -> None:
    proxy = no_haproxy(tmp_path)
    untouched = FakeTable()
    assert await ProxyReconciler(proxy, Engine(), untouched).reconcile([]) is False
    assert (untouched.checks, untouched.writes) == (0, [])
    # Rules a condo before this one left (its marker): emptied, the last listener being gone.
    left = FakeTable(carries=frozenset({"l_127_0_0_1_8080"}))
    left.marker = tmp_path / "nat-table"
    left.marker.touch()
    await ProxyReconciler(proxy, Engine(), left).reconcile([])
    assert (left.checks, left.writes) == (1, [[]])


async def test_an_address_another_process_holds_is_haproxys_to_leave_out(
    tmp_path: Path, nothing_holds_the_ports: list[str]
) -> None:
    s = spec(TCP)
    store = routes_of(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
    routes, _ = desired_routes({n: e.state for n, e in store.entries.items()})
    nothing_holds_the_ports.append("127.0.0.1:8080")
    table = FakeTable()
    proxy = no_haproxy(tmp_path)
    reconciler = ProxyReconciler(proxy, Engine(), table)
    # A rule would take that process's connections: HAProxy has it, and leaves it out.
    with pytest.raises(ProxyError, match=r"cannot bind socket \[127.0.0.1:8080\]"):
        await reconciler.reconcile(routes)
    assert reconciler.planes == {"127.0.0.1:8080": "haproxy"}
    assert table.writes == [[]]
    # Once the NAT carries it, the address is condo's own: it stays on the NAT.
    nothing_holds_the_ports.clear()
    await reconciler.reconcile(routes)
    nothing_holds_the_ports.append("127.0.0.1:8080")
    await reconciler.reconcile(routes)
    assert reconciler.planes == {"127.0.0.1:8080": "nat"}


# --- two condos on one machine (real nftables, real connections) ---------------------------------


class Published:
    """Every container runs and publishes 80 on 127.0.0.1 at the port the test gives it."""

    def __init__(self, ports: dict[str, int], target: int = 80) -> None:
        self.ports, self.target = ports, target

    async def inspect(self, cid_or_name: str) -> Container:
        port = self.ports[cid_or_name]
        return inspected(
            cid_or_name, published_on_loopback(port, target=self.target, address="172.17.0.9")
        )


async def serve_mark(mark: bytes, *, task_status: trio.TaskStatus[int]) -> None:
    """A backend on 127.0.0.1 that answers `mark` to each connection (its port, started)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(mark)

    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, answer, listeners)
        task_status.started(port)


async def mark_at(port: int) -> bytes:
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            return await stream.receive_some(16)


def no_haproxy(tmp_path: Path) -> haproxy.HAProxy:
    """A HAProxy whose binary is missing: what the NAT carries here needs none."""
    return haproxy.HAProxy(tmp_path / "p", binary=str(tmp_path / "none"))


@contextlib.asynccontextmanager
async def unit_table(
    marker: Path | None = None, host: str | None = None
) -> AsyncIterator[nat.NatTable]:
    """A table of the test's own in the real nftables (a host name no condo has unless one is
    given), deleted after."""
    table = nat.NatTable(host or f"unit-{uuid.uuid4().hex[:10]}", marker)
    try:
        yield table
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(
                ["nft", "delete", "table", "ip", table.table], check=False, capture_stderr=True
            )


async def test_an_address_another_condos_nat_carries_is_neither_split_nor_stolen(
    tmp_path: Path,
) -> None:
    # Two --host on one machine, one listen address in both: the kernel applies one NAT per
    # connection, so the second table's rule would silently take the first one's connections.
    listen = free_port()
    s = on_loopback(listen)
    proxy = no_haproxy(tmp_path)
    async with unit_table() as first, unit_table() as second:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                a = await nursery.start(serve_mark, b"A")
                b = await nursery.start(serve_mark, b"B")
                engine = Published({"c1": a, "c2": b})
                ra = ProxyReconciler(proxy, engine, first)
                rb = ProxyReconciler(proxy, engine, second)
                routes_a = routes_for(
                    ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s))
                )
                routes_b = routes_for(
                    ServiceState(phase=Phase.Stable, desired=s, current=box("c2", s))
                )
                await ra.reconcile(routes_a)
                assert await mark_at(listen) == b"A"
                claimed = (
                    rf"127.0.0.1:{listen} is carried by another condo's NAT"
                    rf" \(table ip {first.table}\)"
                )
                with pytest.raises(ProxyError, match=claimed):
                    await rb.reconcile(routes_b)
                assert rb.planes == {} and await second.counters() == {}
                # Nor through HAProxy: the first condo's rule would take its local connections.
                rb.choice = "haproxy"
                with pytest.raises(ProxyError, match=claimed):
                    await rb.reconcile(routes_b)
                assert await mark_at(listen) == b"A"
                await ra.reconcile(routes_a)  # the first one is left as it is
                assert ra.planes == {f"127.0.0.1:{listen}": "nat"}
                nursery.cancel_scope.cancel()


def routes_for(state: ServiceState) -> Sequence[Route]:
    store = routes_of(state)
    return desired_routes({n: e.state for n, e in store.entries.items()})[0]


async def test_a_marker_without_rules_goes_at_the_first_pass(tmp_path: Path) -> None:
    # The table was deleted by hand while condo was down: no rule to remove, no marker to keep
    # (else every later start of a condo without listeners would run nft for nothing).
    marker = tmp_path / "s.proxy" / "nat-table"
    marker.parent.mkdir()
    marker.touch()
    table = nat.NatTable(f"unit-{uuid.uuid4().hex[:10]}", marker)
    proxy = no_haproxy(tmp_path)
    assert await ProxyReconciler(proxy, Engine(), table).reconcile([]) is False
    assert not marker.exists() and not table.may_hold_rules()
    with pytest.raises(ProxyError, match="No such file or directory"):
        await nat.nft(None, "list", "table", "ip", table.table)


async def test_a_table_deleted_by_hand_is_written_again_and_its_count_goes_on(
    tmp_path: Path,
) -> None:
    listen = free_port()
    s = on_loopback(listen)
    proxy = no_haproxy(tmp_path)
    key = ("web", f"127.0.0.1:{listen}")
    async with unit_table() as table:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                a = await nursery.start(serve_mark, b"A")
                reconciler = ProxyReconciler(proxy, Published({"c1": a}), table)
                routes = routes_for(
                    ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s))
                )
                await reconciler.reconcile(routes)
                assert [await mark_at(listen) for _ in range(2)] == [b"A", b"A"]
                await reconciler.reconcile(routes)
                assert reconciler.connections()[key] == (0, 2)
                await nat.nft(None, "delete", "table", "ip", table.table)
                # The next pass (every few seconds while a listener is wanted) writes it again.
                await reconciler.reconcile(routes)
                assert await mark_at(listen) == b"A"
                await reconciler.reconcile(routes)
                assert reconciler.connections()[key] == (0, 3)
                nursery.cancel_scope.cancel()


async def test_the_marker_is_there_before_the_rules_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # condo killed (or nft timed out) after the kernel took the rules: a condo that starts with
    # no listener wanted (the spec removed meanwhile) must still find the marker and empty it.
    marker = tmp_path / "s.proxy" / "nat-table"
    table = nat.NatTable(f"unit-{uuid.uuid4().hex[:10]}", marker)
    seen: list[bool] = []

    async def taken_but_not_answered(script: str | None, *args: str) -> str:
        if script is None:
            return '{"nftables": []}'
        seen.append(marker.exists())
        raise ProxyError("nft did not answer in 10 s")  # and condo is killed next

    monkeypatch.setattr(nat, "nft", taken_but_not_answered)
    with pytest.raises(ProxyError):
        await table.apply([nat.NatRule("l_127_0_0_1_1", "127.0.0.1", 1, 2)])
    assert seen == [True] and nat.NatTable("h", marker).may_hold_rules()


async def test_rules_nft_can_no_longer_change_are_not_passed_off_as_haproxys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nft gone mid-run (PATH, an upgrade): the kernel keeps the rules, which take the local
    # connections before any HAProxy listener would see them. Handing the listener to HAProxy
    # would say `haproxy` and a new container in /v1/state while the connections go elsewhere.
    listen = free_port()
    s = on_loopback(listen)
    proxy = no_haproxy(tmp_path)
    async with unit_table(tmp_path / "s.proxy" / "nat-table") as table:
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    a = await nursery.start(serve_mark, b"A")
                    b = await nursery.start(serve_mark, b"B")
                    reconciler = ProxyReconciler(proxy, Published({"c1": a, "c2": b}), table)
                    old, new = box("c1", s), box("c2", s)
                    await reconciler.reconcile(
                        routes_for(ServiceState(phase=Phase.Stable, desired=s, current=old))
                    )
                    monkeypatch.setenv("PATH", str(tmp_path))  # no nft there
                    deployed = routes_for(ServiceState(phase=Phase.Stable, desired=s, current=new))
                    for _ in range(3):  # the pass that fails, then the ones that check again
                        with pytest.raises(ProxyError, match="cannot run nft") as raised:
                            await reconciler.reconcile(deployed)
                        reconciler.forget()
                        assert reconciler.planes == {f"127.0.0.1:{listen}": "nat"}
                        assert "haproxy" not in str(raised.value).lower()
                    assert await mark_at(listen) == b"A"  # what the kernel still does, as said
                    monkeypatch.undo()  # nft back: the rule follows the deploy
                    await reconciler.reconcile(deployed)
                    assert reconciler.planes == {f"127.0.0.1:{listen}": "nat"}
                    assert await mark_at(listen) == b"B"
                    nursery.cancel_scope.cancel()
        finally:
            monkeypatch.undo()  # the table is deleted by the nft of the PATH


async def test_a_marker_nft_cannot_look_at_is_said(tmp_path: Path) -> None:
    # Rules a condo before this one wrote, and no usable nft now: HAProxy carries the listener
    # (the fallback), and /v1/state says the kernel may still take its connections.
    s = spec(TCP)
    routes = routes_for(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
    table = FakeTable(refuse="cannot run nft (No such file or directory)")
    table.marker = tmp_path / "nat-table"
    table.marker.touch()
    proxy = no_haproxy(tmp_path)
    reconciler = ProxyReconciler(proxy, Engine(), table)
    with pytest.raises(ProxyError, match=r"cannot read or change the NAT \(cannot run nft"):
        await reconciler.reconcile(routes)
    assert reconciler.planes == {"127.0.0.1:8080": "haproxy"} and table.writes == []


async def test_open_connections_are_the_nats_not_the_machines_on_the_same_port(
    tmp_path: Path,
) -> None:
    # `:listen "127.0.0.1:L" :port L`: a connection of this machine's to another server on port
    # L (here 127.0.0.2, which the rule does not match) is answered from port L too, but it is
    # not one of the listener's.
    listen = free_port()
    s = on_loopback(listen, port=listen)
    proxy = no_haproxy(tmp_path)
    async with unit_table() as table:
        with contextlib.ExitStack() as sockets:
            # Listening sockets complete the handshake on their own: established without accept.
            container, other = (sockets.enter_context(socket.socket()) for _ in range(2))
            container.bind(("127.0.0.1", 0))
            other.bind(("127.0.0.2", listen))
            for server in (container, other):
                server.listen(8)
            engine = Published({"c1": container.getsockname()[1]}, target=listen)
            reconciler = ProxyReconciler(proxy, engine, table)
            routes = routes_for(ServiceState(phase=Phase.Stable, desired=s, current=box("c1", s)))
            with trio.fail_after(10):
                await reconciler.reconcile(routes)
                sockets.enter_context(socket.create_connection(("127.0.0.1", listen)))
                sockets.enter_context(socket.create_connection(("127.0.0.2", listen)))
                await reconciler.reconcile(routes)
                assert reconciler.connections()[("web", f"127.0.0.1:{listen}")] == (1, 1)

"""A real Consul cluster on loopback for multi-host tests: its addresses, its agents' lives, and
network partitions between one agent and the rest.

The cluster itself is scripts/consul-cluster's (3 servers on 127.0.0.2-4, client agents on
127.0.0.11, .12, ..., each on its own address with Consul's default ports, HTTP on ADDR:8500);
this module only drives it. A simulated host is a client agent: a condo for host i talks to
`cluster.http(cluster.clients[i])`.

Partitions are iptables DROP rules, each tagged with a comment `condo-test-<pid>-<id>` naming the
process that added it; a partition removes exactly its own rules on exit (errors and cancellation
included), and `remove_leftover_rules` removes only the rules of processes that no longer exist
(a killed run), never another live test session's. Rules are in the filter table's INPUT and
OUTPUT chains and match only cluster addresses or the agents' own group ids, so they touch no
other traffic on the machine.

The cluster outlives a pytest session (like the engine and the dev agent): starting it is
idempotent and restarts whatever agent is down, so a test that kills an agent or a server only
has to bring it back, and the next test's `ensure()` repairs what a killed test left.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import httpx
import trio

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "consul-cluster"
SERVERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CLIENT_BASE = 10  # client agent i (from 1) is 127.0.0.(10 + i), as in scripts/consul-cluster
GID_BASE = 42000  # an agent runs with group id GID_BASE + the last byte of its address (ditto)
HTTP_PORT = 8500
SERF_LAN_PORT = 8301
RULE_TAG = "condo-test-"
START_LIMIT = 90  # seconds for scripts/consul-cluster start; it takes ~2 s on an idle machine
POLL_DELAY = 0.1  # cluster membership has no blocking query: polled, under the caller's deadline


class MemberStatus(enum.IntEnum):
    """Serf's member status, as /v1/agent/members reports it."""

    NONE = 0
    ALIVE = 1
    LEAVING = 2
    LEFT = 3
    FAILED = 4


def client_address(index: int) -> str:
    """The address of client agent `index` (from 1)."""
    return f"127.0.0.{CLIENT_BASE + index}"


def agent_gid(address: str) -> int:
    return GID_BASE + int(address.rsplit(".", 1)[1])


def http_of(address: str) -> str:
    """The HTTP API endpoint of the agent on `address`."""
    return f"http://{address}:{HTTP_PORT}"


def run_script(*args: str) -> str:
    """Run scripts/consul-cluster synchronously (for session fixtures); fails loudly."""
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=START_LIMIT, check=False
    )
    assert done.returncode == 0, f"consul-cluster {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return done.stdout


async def _script(*args: str) -> None:
    done = await trio.run_process(
        [str(SCRIPT), *args], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, f"consul-cluster {' '.join(args)} failed:\n{done.stderr[-4000:]!r}"


async def wait_until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll `predicate` until it holds; the caller's cancel scope bounds the wait."""
    while not await predicate():
        await trio.sleep(POLL_DELAY)


@attrs.frozen
class ConsulCluster:
    """The running cluster: 3 servers and `clients` client agents (one per simulated host)."""

    clients: tuple[str, ...]
    servers: tuple[str, ...] = SERVERS

    @classmethod
    def start(cls, clients: int = 3) -> ConsulCluster:
        """Start what is not running (synchronously) and wait for a leader and every member."""
        run_script("start", "--clients", str(clients))
        return cls(clients=tuple(client_address(i) for i in range(1, clients + 1)))

    def stop(self) -> None:
        """Kill every agent and remove the cluster's data (synchronously)."""
        run_script("stop")

    @property
    def agents(self) -> tuple[str, ...]:
        return self.servers + self.clients

    @staticmethod
    def http(address: str) -> str:
        return http_of(address)

    async def ensure(self) -> None:
        """Restart any agent that is down and wait until the cluster is whole again."""
        await _script("start", "--clients", str(len(self.clients)))

    # --- agents' lives ---------------------------------------------------------------------

    async def kill_agent(self, address: str, signal: str = "KILL") -> None:
        """Signal a client agent (KILL: it dies without leaving) and wait for it to exit."""
        assert address in self.clients, address
        await _script("agent-kill", address, signal)

    async def start_agent(self, address: str) -> None:
        """Restart a client agent on its data (same node id) and wait until it is alive."""
        assert address in self.clients, address
        await _script("agent-start", address)
        await self.wait_member(address, MemberStatus.ALIVE)

    async def stop_server(self, address: str, signal: str = "KILL") -> None:
        """Signal a server (KILL: a crash) and wait for it to exit; its data stays."""
        assert address in self.servers, address
        await _script("agent-kill", address, signal)

    async def start_server(self, address: str) -> None:
        """Restart a server on its data; wait until it is alive and agrees on a leader."""
        assert address in self.servers, address
        await _script("agent-start", address)
        await self.wait_member(address, MemberStatus.ALIVE)
        await wait_until(lambda: self._has_leader(address))

    async def rejoin(self, address: str) -> None:
        """Have the agent on `address` join the servers again (`consul join`), as an operator
        would after a heal. Without it Serf heals by itself, but an agent that had given up on
        every peer waits for Serf's reconnect attempts: up to ~30 s (the interval is fixed)."""
        async with httpx.AsyncClient(base_url=http_of(address), timeout=5) as http:
            joined = 0
            for server in self.servers:
                with contextlib.suppress(httpx.TransportError):  # a stopped server: the next one
                    response = await http.put(f"/v1/agent/join/{server}")
                    joined += response.status_code == 200
        assert joined, f"{address} could join no server"

    # --- what the cluster says ---------------------------------------------------------------

    async def leader(self, via: str | None = None) -> str | None:
        """GET /v1/status/leader through `via` (default: the first client): "ADDR:8300", or
        None when there is none (or `via` does not answer)."""
        try:
            async with httpx.AsyncClient(base_url=http_of(via or self.clients[0])) as http:
                response = await http.get("/v1/status/leader", timeout=2)
        except httpx.TransportError:  # a dead or cut-off agent: no leader seen from there
            return None
        if response.status_code != 200:
            return None
        leader = response.json()
        return str(leader) if leader else None

    async def wait_leader(self, via: str | None = None, other_than: str | None = None) -> str:
        """Wait for a leader (seen through `via`) that is not `other_than`; returns it."""
        while (found := await self.leader(via)) is None or found == other_than:
            await trio.sleep(POLL_DELAY)
        return found

    async def members(self, via: str | None = None) -> dict[str, MemberStatus]:
        """address -> Serf status of every member, as the agent on `via` (default: a live
        server) sees it."""
        candidates = [via] if via else list(self.servers)
        for address in candidates:
            try:
                async with httpx.AsyncClient(base_url=http_of(address)) as http:
                    response = await http.get("/v1/agent/members", timeout=2)
            except httpx.TransportError:  # that server is down: ask the next one
                continue
            response.raise_for_status()
            return {m["Addr"]: MemberStatus(m["Status"]) for m in response.json()}
        raise AssertionError(f"no agent of {candidates} answers")

    async def wait_member(self, address: str, status: MemberStatus, via: str | None = None) -> None:
        """Wait until `via` (default: a live server) sees `address` with `status`."""
        await wait_until(lambda: self._member_is(address, status, via))

    async def _member_is(self, address: str, status: MemberStatus, via: str | None) -> bool:
        return (await self.members(via)).get(address) == status

    async def _has_leader(self, via: str) -> bool:
        return await self.leader(via) is not None

    # --- partitions --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def partition(
        self, address: str, peers: Sequence[str] | None = None
    ) -> AsyncIterator[None]:
        """Cut the agent on `address` off from `peers` (default: every other agent of the
        cluster), both ways, until the block exits; its own HTTP API stays reachable from
        127.0.0.1 (the host's condo still talks to its agent).

        Every other agent by default, not only the servers: Serf's indirect probes would let a
        client that still reaches another client look alive to the servers. Beyond address pairs
        (UDP gossip and RPC leave from the agent's address), memberlist's TCP streams leave from
        127.0.0.1: peers' streams into the agent are dropped by its Serf port, and the agent's
        own by its group id (OUTPUT, owner match).
        """
        assert address in self.agents, address
        others = [p for p in (peers if peers is not None else self.agents) if p != address]
        tag = f"{RULE_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        comment = ["-m", "comment", "--comment", tag]
        rules: list[tuple[str, ...]] = []
        for peer in others:
            rules.append(("INPUT", "-s", address, "-d", peer, *comment, "-j", "DROP"))
            rules.append(("INPUT", "-s", peer, "-d", address, *comment, "-j", "DROP"))
            owner = ["-m", "owner", "--gid-owner", str(agent_gid(address))]
            rules.append(("OUTPUT", "-d", peer, *owner, *comment, "-j", "DROP"))
        # Peers' memberlist streams (from 127.0.0.1) into the agent's Serf port.
        port = ["-p", "tcp", "--dport", str(SERF_LAN_PORT)]
        rules.append(("INPUT", "-s", "127.0.0.1", "-d", address, *port, *comment, "-j", "DROP"))
        try:
            await trio.to_thread.run_sync(add_rules, rules)
            yield
        finally:
            # Shielded with a deadline: the rules must go even when the test was cancelled (or
            # when adding them failed half-way).
            with trio.move_on_after(20, shield=True):
                await trio.to_thread.run_sync(remove_rules, lambda comment: comment == tag)


# --- iptables bookkeeping (sync: the session fixture runs outside Trio; async callers use a thread)

_COMMENT = re.compile(r'--comment "?(condo-test-[^" ]+)"?')


def _iptables(*args: str) -> str:
    # -w: wait for the xtables lock; dockerd and other sessions change rules too.
    done = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"iptables {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def add_rules(rules: Sequence[Sequence[str]]) -> None:
    for chain, *spec in rules:
        # -I: ahead of whatever ACCEPTs another tool may have put in the chain.
        _iptables("-I", chain, *spec)


def remove_rules(matches: Callable[[str], bool]) -> list[str]:
    """Delete every INPUT/OUTPUT rule whose condo-test- comment `matches`; returns them."""
    removed = []
    for chain in ("INPUT", "OUTPUT"):
        for line in _iptables("-S", chain).splitlines():
            found = _COMMENT.search(line)
            if line.startswith(f"-A {chain} ") and found and matches(found.group(1)):
                # `-S` prints each rule as the arguments that add it (quoted as a shell would):
                # the same arguments after -D delete exactly that rule.
                _iptables("-D", *shlex.split(line)[1:])
                removed.append(line)
    return removed


def _stale(comment: str) -> bool:
    """A rule tagged by a process that no longer exists (a killed run's leftover)."""
    match = re.fullmatch(r"condo-test-(\d+)-[0-9a-f]+", comment)
    if match is None:
        return False  # not in our format: another tool's, never ours to remove
    return not Path(f"/proc/{match.group(1)}").exists()


def remove_leftover_rules() -> list[str]:
    """Remove the partition rules of runs that were killed before they could remove them."""
    return remove_rules(_stale)

"""The kernel's NAT behind `:tcp` listeners: condo's own nftables table, written whole.

This is the only code that touches nftables. condo owns one table per `--host`, `ip
condo-<host>` (two condos of different hosts on one machine never touch each other's tables;
Docker's are never touched), with two `nat` chains:
- `output`: local clients. `ip daddr <listen host> tcp dport <port> dnat to 127.0.0.1:<the port
  the Stable container publishes on 127.0.0.1>` (a listener on every interface matches every
  local address, `fib daddr type local`).
- `prerouting`: other hosts' traffic to a listener that is not on loopback. It goes to the
  container's own address and port (what Docker's `-p` does): DNAT to 127.0.0.1 would need
  `route_localnet`, which condo never sets.

Each pass writes the whole wanted table in ONE `nft -f -` transaction (both chains flushed and
refilled), so a switch is atomic. Only a connection's first packet meets a `nat` chain: an open
connection keeps its conntrack entry to the container it started with (the drain comes free),
and a rule's named counter counts connections (named counters outlive the rules: the count never
goes back). While no container is ready the listener's rule drops new connections' SYNs: the
client's own SYN retransmission (1 s, 3 s, 7 s …) holds them until a container is Stable.

The table is never deleted by condo (an exit, a `kill -9`, a restart, a self-deploy: the kernel
keeps forwarding); a starting condo rewrites it from its store once the store is settled. While
the table holds rules, a marker file says so beside the state file (`<state>.proxy/nat-table`):
a condo with no listener to route runs no `nft` at all unless it is there.

Invariants:
- Every failure of `nft` is a `ProxyError` (never an OSError).
- Nothing is written when the wanted table is the one written last (a pass every few seconds
  costs one counters read).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import structlog
import trio

from condo.errors import ProxyError

log = structlog.get_logger(__name__)

FAMILY = "ip"
PRIORITY = -101  # before Docker's own DNAT (-100): a listen port is condo's first
COMMAND_LIMIT = 10.0
CONNTRACK = "/proc/net/nf_conntrack"


@attrs.frozen
class NatRule:
    """One `:tcp` listener: where it listens, where its new connections go now."""

    counter: str  # its named counter (one per listen address)
    host: str  # the listen host ("" = every interface)
    port: int
    local: int | None  # the ready container's 127.0.0.1-published port; None: hold (drop SYNs)
    remote: tuple[str, int] | None = None  # (container address, container port), other hosts'

    def _match(self) -> str:
        where = f"ip daddr {self.host}" if self.host else "fib daddr type local"
        return f"{where} tcp dport {self.port}"

    def lines(self, table: str) -> list[str]:
        count = f'counter name "{self.counter}"'
        if self.local is None:
            rules = [f"add rule {FAMILY} {table} output {self._match()} drop"]
            if not _loopback(self.host):
                rules.append(f"add rule {FAMILY} {table} prerouting {self._match()} drop")
            return rules
        local = f"dnat to 127.0.0.1:{self.local}"
        rules = [f"add rule {FAMILY} {table} output {self._match()} {count} {local}"]
        # Other hosts' connections (never a loopback listener's): to the container itself. A
        # container without an address of its own (host networking) gets none of them.
        if self.remote is not None and not _loopback(self.host):
            address, port = self.remote
            rules.append(
                f"add rule {FAMILY} {table} prerouting {self._match()} {count} dnat to"
                f" {address}:{port}"
            )
        return rules


def _loopback(host: str) -> bool:
    return bool(host) and ipaddress.ip_address(host).is_loopback


def table_name(host: str) -> str:
    """condo's table for `--host`: `condo-<host>` (a host name nft cannot spell is cleaned and
    given a short hash, so that two hosts never share a table)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", host)[:64]
    if clean != host:
        clean += "-" + hashlib.sha256(host.encode()).hexdigest()[:8]
    return f"condo-{clean}"


def counter_name(host: str, port: int) -> str:
    return "l_" + re.sub(r"[^A-Za-z0-9]", "_", host or "any") + f"_{port}"


def _listen_of(counter: str) -> tuple[str, int] | None:
    """The (host, port) of a listener's counter name (IPv4 or every interface: the NAT's), or
    None for a name that is not one."""
    found = re.fullmatch(r"l_(any|\d+_\d+_\d+_\d+)_(\d+)", counter)
    if found is None:
        return None
    host = "" if found[1] == "any" else found[1].replace("_", ".")
    return host, int(found[2])


def overlap(a: str, b: str) -> bool:
    """Whether two listeners' counters name addresses that meet: the same port on the same
    host, or on every interface and any host."""
    first, second = _listen_of(a), _listen_of(b)
    if first is None or second is None or first[1] != second[1]:
        return False
    return first[0] == second[0] or not first[0] or not second[0]


def usable(host: str) -> bool:
    """Whether the NAT can carry a listener on `host`: the table is IPv4 only."""
    return not host or ipaddress.ip_address(host).version == 4


def render(table: str, rules: Sequence[NatRule], stale: Sequence[str] = ()) -> str:
    """The whole table as one transaction: the chains made (or kept) and refilled, a counter per
    listener, the counters of listeners that went (`stale`) deleted."""
    lines = [f"add table {FAMILY} {table}"]
    for chain, hook in (("output", "output"), ("prerouting", "prerouting")):
        lines += [
            f"add chain {FAMILY} {table} {chain} {{ type nat hook {hook} priority {PRIORITY} ; }}",
            f"flush chain {FAMILY} {table} {chain}",
        ]
    for name in sorted({rule.counter for rule in rules}):
        lines.append(f"add counter {FAMILY} {table} {name}")
    for rule in sorted(rules, key=lambda r: r.counter):
        lines += rule.lines(table)
    lines += [f"delete counter {FAMILY} {table} {name}" for name in sorted(stale)]
    return "\n".join(lines) + "\n"


async def nft(script: str | None, *args: str) -> str:
    """Run `nft [args] [-f -]` (the script on its stdin); its output, or a ProxyError."""
    argv = ["nft", *args] + (["-f", "-"] if script is not None else [])
    try:
        with trio.fail_after(COMMAND_LIMIT):
            done = await trio.run_process(
                argv,
                stdin=(script or "").encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except OSError as exc:
        raise ProxyError(f"cannot run nft ({exc.strerror or exc})") from exc
    except trio.TooSlowError as exc:
        raise ProxyError(f"nft did not answer in {COMMAND_LIMIT:g} s") from exc
    if done.returncode != 0:
        words = done.stderr.decode(errors="replace").strip().splitlines()
        raise ProxyError(f"nft refused condo's table: {' | '.join(words[:3])}")
    return done.stdout.decode(errors="replace")


class NatTable:
    """condo's table of one `--host`: its check, its whole writes, its counters."""

    def __init__(self, host: str, marker: Path | None = None) -> None:
        self.table = table_name(host)
        # A file beside the state file while the table holds rules: a condo that starts with
        # no listener wanted knows whether to empty a table (or to leave nftables alone).
        self.marker = marker
        self._written: str | None = None  # the script written last (None: not known)
        self._counters: set[str] | None = None  # the listeners' counters it holds (None: unread)
        self._exists = False
        # The listeners other condos' tables carry (another `--host` on this machine), by
        # counter name → their table, as of the last read of the counters: the kernel applies
        # one NAT per connection, so two tables' rules for one address would split or steal
        # its connections silently.
        self.elsewhere: dict[str, str] = {}
        self.lost = False  # the last read found the table's listeners gone (until rewritten)

    def may_hold_rules(self) -> bool:
        """Whether the table may hold rules: written by this condo, or its marker is there."""
        return self._exists or self.marked()

    def marked(self) -> bool:
        """Whether the marker is there (a condo wrote rules, and has not emptied the table)."""
        return self.marker is not None and self.marker.exists()

    def forget(self) -> None:
        """Read and write the table again at the next pass (after a failure)."""
        self._written = None
        self._counters = None

    async def check(self) -> str | None:
        """Why condo cannot use nftables here (no `nft`, no CAP_NET_ADMIN), or None: a dry
        run (`nft -c`) of condo's table."""
        try:
            await nft(render(self.table, ()), "-c")
        except ProxyError as exc:
            return str(exc)
        return None

    async def carried(self) -> set[str]:
        """The listeners the table carries now, by counter name (a condo before this one may
        have written it)."""
        if self._counters is None:
            existing = await self._existing_counters()
            self._exists = existing is not None
            self._counters = existing or set()
        return set(self._counters)

    async def apply(self, rules: Sequence[NatRule]) -> None:
        """Make the table hold exactly `rules` (one transaction; nothing when unchanged). With
        no rules and no table of condo's, nothing is created."""
        carried = await self.carried()
        if not self._exists and not rules:
            self._mark(False)  # a marker of rules that are gone (a table deleted by hand)
            return
        wanted = {rule.counter for rule in rules}
        script = render(self.table, rules, sorted(carried - wanted))
        if script == self._written:
            return
        # The marker goes first: a condo killed during the write (or an `nft` that timed out
        # after the kernel took the table) must not leave rules that no marker speaks of.
        if rules:
            self._mark(True)
        await nft(script)
        self.lost = False
        log.info("proxy.nat_written", table=self.table, rules=len(rules))
        self._written = render(self.table, rules)  # its stale counters are gone now
        self._counters, self._exists = wanted, True
        if not rules:
            self._mark(False)

    def _mark(self, holds_rules: bool) -> None:
        if self.marker is None:
            return
        try:
            if holds_rules:
                self.marker.parent.mkdir(mode=0o700, exist_ok=True)
                self.marker.touch()
            else:
                self.marker.unlink(missing_ok=True)
        except OSError as exc:  # the table is right; a condo that starts will look at it anyway
            log.warning("proxy.nat_marker_failed", path=str(self.marker), error=str(exc))

    async def _existing_counters(self) -> set[str] | None:
        """The listeners' counters of condo's table as it is (a condo before this one wrote
        it), or None when it has none (no table, or one that holds no rule: nothing to
        remove)."""
        return set(await self.counters()) or None

    async def counters(self) -> dict[str, int]:
        """Each named counter's packets: the connections its rule forwarded. The same read (of
        every table's counters: one `nft` run) updates `elsewhere`."""
        found, self.elsewhere = self._read(await nft(None, "-j", "list", "counters"))
        if self._counters is not None and not self._counters <= found.keys():
            # The table (or a counter of it) was deleted by hand while condo runs: what was
            # written last is not there any more, and the next `apply` writes it whole again.
            log.warning("proxy.nat_table_lost", table=self.table, missing=len(self._counters))
            self.forget()
            self.lost = True
        return found

    def _read(self, text: str) -> tuple[dict[str, int], dict[str, str]]:
        found: dict[str, int] = {}
        elsewhere: dict[str, str] = {}
        for item in json.loads(text).get("nftables", []):
            counter = item.get("counter") if isinstance(item, Mapping) else None
            if not isinstance(counter, Mapping) or counter.get("family") != FAMILY:
                continue
            table, name = str(counter.get("table")), str(counter.get("name"))
            if _listen_of(name) is None:
                continue  # not a listener's: condo's never, and never deleted by condo
            if table == self.table:
                found[name] = int(counter.get("packets", 0))
            elif table.startswith("condo-"):
                elsewhere[name] = table
        return found, elsewhere

    def claimed_elsewhere(self, counter: str) -> str | None:
        """The other condo's table that carries an address `counter`'s listener meets, or None
        (as of the last read of the counters)."""
        for name, table in sorted(self.elsewhere.items()):
            if overlap(counter, name):
                return table
        return None


Replies = frozenset[tuple[str, int]]  # (address, port) a listener's connections are answered from


def open_connections(
    text: str, listeners: Mapping[str, tuple[str, int, Replies]]
) -> dict[str, int]:
    """From `/proc/net/nf_conntrack`'s text: per counter name, the established TCP connections
    its listener's NAT sent on: to the listen address (its port; its host, when it has one),
    answered from one of the listener's containers (127.0.0.1 and a published port, or the
    container's own address and port). The address matters: a connection of this machine's
    to another server on the listen port is not the NAT's, even when the port numbers agree
    (`:listen "80" :port 80`)."""
    found = dict.fromkeys(listeners, 0)
    # A busy host has many entries and few of them are the NAT's: a plain substring test of
    # the listen ports rules most lines out before any regular expression runs.
    wanted = tuple({f" dport={port} " for _, port, _ in listeners.values()})
    for line in text.splitlines():
        if " tcp " not in line or " ESTABLISHED " not in line:
            continue
        if not any(port in line for port in wanted):
            continue
        dsts = re.findall(r"\bdst=(\S+)", line)
        srcs = re.findall(r"\bsrc=(\S+)", line)
        dports = re.findall(r"\bdport=(\d+)", line)
        sports = re.findall(r"\bsport=(\d+)", line)
        if min(len(dsts), len(srcs), len(dports), len(sports)) < 2:
            continue
        reply_from = (srcs[1], int(sports[1]))
        for name, (host, port, replies) in listeners.items():
            if int(dports[0]) == port and host in ("", dsts[0]) and reply_from in replies:
                found[name] += 1
    return found


def read_open_connections(listeners: Mapping[str, tuple[str, int, Replies]]) -> dict[str, int]:
    """`open_connections` of the kernel's table as it is now: blocking (the file can be megabytes
    on a busy host), for a worker thread. No conntrack in /proc (a kernel built without it):
    none open known."""
    try:
        text = Path(CONNTRACK).read_text()
    except OSError:
        text = ""
    return open_connections(text, listeners)

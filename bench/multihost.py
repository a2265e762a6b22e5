"""Multi-host: 20 `condo run` processes (`--host h1..h20`, 20 services each, `--expose consul`)
on one engine and the real Consul agent; one image update on every host.

All the condos share one Consul prefix unique to this run, and reach Consul through a recording
proxy (bench.common.proxy.open_tcp_proxy), which counts the writes they cause (PUT/DELETE: KV
writes, session create/renew/destroy). h1 serves the API. The 400 services are deployed host by host
(one engine stands in for 20: all at once, it times out starts, which no real fleet's engines
would). Once all are Stable and Consul shows it (h1's `/v1/wait_for` for the old image
answers), a long-poll `/v1/wait_for?name=m00&image=<new image>` is held on h1, and `m00.edn` is
rewritten on every host at once.

Measured: from the rewrite to the last host's `→ Stable` log line (the rollout), and from that
line to the long-poll's answer and to the exit of a `condo wait` (the bar: ≤ 100 ms); the
Consul write rate at rest (before the update) and during the rollout. A direct probe of the
agent tells a rollout during which Consul itself was paused (another test SIGSTOPs it): such an
attempt is repeated (up to 3), and reported VOID if all were hit.
With --quick: 3 hosts x 3 services.

The simulated cell (`simulated`): 200 hosts x 20 services published by condo's own Publisher (one
session per host, real Consul traffic, no containers) from a child process (`python -m
bench.multihost simulate ...`), beside 2 real condos; one rollout of m00 everywhere (each
simulated host deploys at a random moment within 2 s). Measured: the last host's → Stable to the
long-poll's answer and to `condo wait`'s exit (the bar: ≤ 250 ms), a watcher's (condo's
ConsulSource, in this process) wake-ups, requests, bytes read and values decoded per wake-up,
and the CPU of the Consul agent, the API condo and the simulator during the rollout. With
--quick: 5 hosts x 3 services beside 1 real condo.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from logging import WARNING
from pathlib import Path

import attrs
import httpx
import structlog
import trio

from bench.common.condos import Condo, CondoSpec, Transition, condo_python, open_condos, stable
from bench.common.consul import CONSUL_HOST, CONSUL_PORT, consul_answers
from bench.common.proxy import ProxiedRequest, RecordingProxy, open_tcp_proxy
from bench.common.rawhttp import HttpConnection, wait_metric_at_least
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, BUSYBOX_2, Run
from bench.common.specs import spec_text, write_spec
from bench.common.stats import Scalar, ms
from bench.common.wait import BenchError, deadline, wall
from condo.consul import ConsulClient, ConsulSource, KeyLayout, Publisher
from condo.fsm import Box, Phase, ServiceState
from condo.spec import ServiceSpec
from condo.store import Store
from condo.waiting import Picture

HOSTS, QUICK_HOSTS = 20, 3
SERVICES, QUICK_SERVICES = 20, 3
REST_WINDOW, QUICK_REST_WINDOW = 10.0, 2.0
ANSWER_BAR = 100.0  # ms after the last host's → Stable
LIMIT = 600.0
TARGET = "m00"
ATTEMPTS = 3
SETTLE = 2.0  # seconds after the answer that still count as the rollout's writes
# A direct Consul probe slower than this means the agent itself was paused (another test
# SIGSTOPs it for 10 s), not merely slowed by a busy machine.
STALL = 2.0
PROBE_INTERVAL = 0.2
CONSUL_WAIT = 40.0
PROBE_LIMIT = 30.0


async def main(run: Run) -> Report:
    hosts = QUICK_HOSTS if run.quick else HOSTS
    size = QUICK_SERVICES if run.quick else SERVICES
    rest_window = QUICK_REST_WINDOW if run.quick else REST_WINDOW
    with trio.move_on_after(CONSUL_WAIT):
        # Another test may have paused the agent for a few seconds: wait it out, bounded.
        while not await consul_answers():  # noqa: ASYNC110  # Consul is another process
            await trio.sleep(1.0)
    if not await consul_answers():
        raise BenchError(f"Consul does not answer on {CONSUL_HOST}:{CONSUL_PORT}")
    prefix = run.consul_prefix("multihost")
    names = [f"m{i:02d}" for i in range(size)]
    async with (
        _watching_consul() as stalls,
        open_tcp_proxy(CONSUL_HOST, CONSUL_PORT) as consul,
    ):
        common = ("--expose", "consul", "--consul-prefix", prefix)
        specs = [
            CondoSpec(
                name=f"h{i}",
                host=run.host(f"h{i}"),
                server=i == 1,
                extra=(*common, "--consul-endpoint", f"http://{consul.address}"),
                # Under --profile, only the API host and the last one: 20 samplers would
                # starve the machine.
                profile=i in (1, hosts),
            )
            for i in range(1, hosts + 1)
        ]
        async with open_condos(run, specs) as condos:
            api = condos[0]
            with deadline(120, f"{hosts} condos ready"):
                async with trio.open_nursery() as nursery:
                    for one in condos:
                        nursery.start_soon(one.wait_ready)
            assert api.url is not None
            began = wall()
            text = spec_text(run, BUSYBOX, deploy="[:After 0]")
            first: dict[tuple[str, str], Transition] = {}
            with deadline(LIMIT, f"{hosts * size} services Stable"):
                # Host by host: 20 real hosts have 20 engines; this one engine, asked for 400
                # containers at once, times out starts (a stampede no real fleet makes).
                for one in condos:
                    for name in names:
                        write_spec(one.specs, name, text)
                    first |= await _all_stable([one], names, {})
                old = {key: t.container for key, t in first.items()}
                converged = wall() - began
                await _wait_for(api.url, TARGET, BUSYBOX)
            converge_stall = stalls.worst(began, wall())

            await trio.sleep(1.0 if run.quick else 2.0)
            rest_began, rest_mark = wall(), len(consul.requests.items)
            await trio.sleep(rest_window)
            at_rest = _writes(consul.requests.items[rest_mark:])
            rest_rate = len(at_rest) / (wall() - rest_began)

            attempts: list[_Rollout] = []
            for attempt in range(ATTEMPTS):
                image = (BUSYBOX_2, BUSYBOX)[attempt % 2]
                async with api.window(f"rollout{attempt + 1}"):
                    rollout = await _rollout(run, condos, api.url, image, old, consul)
                old = rollout.containers
                rollout = attrs.evolve(
                    rollout, stall=stalls.worst(rollout.updated - 1, rollout.settled)
                )
                attempts.append(rollout)
                if rollout.stall < STALL:
                    break
                await trio.sleep(5.0)  # someone else paused Consul: give it time

    sim_rows, sim_figures, sim_bar = await simulated(run)
    rollout = attempts[-1]
    answer_delay = ms(rollout.answered - rollout.last_stable)
    wait_delay = ms(rollout.waited - rollout.last_stable)
    published = rollout.published
    publish_delay = None if published is None else ms(published - rollout.last_stable)
    writes = rollout.writes
    kv = sum(1 for r in writes if "/v1/kv/" in r.target)
    window = rollout.settled - rollout.updated
    notes = [
        "A write is a PUT or DELETE condo sent to Consul (KV writes, session create, renew, "
        "destroy), counted by a proxy between the condos and the agent; the rollout's window "
        f"runs from the rewrite to {SETTLE:g} s after the answer.",
    ]
    if converge_stall >= STALL:
        notes.append(
            f"The Consul agent stalled for {converge_stall:.1f} s during the converge (another "
            "test on the machine pauses it): the converge time is not condo's alone."
        )
    if rollout.stall >= STALL:
        notes.append(
            f"VOID: the Consul agent itself stalled for {rollout.stall:.1f} s during every one "
            f"of the {ATTEMPTS} attempts (another test on the machine pauses it)."
        )
    if len(attempts) > 1:
        notes.append(
            f"{len(attempts) - 1} attempt(s) discarded: the Consul agent itself stalled "
            "(another test on the machine pauses it), measured by a direct probe."
        )
    return Report(
        bench="multihost",
        title=f"{hosts} hosts x {size} services, one Consul",
        columns=("measure", "value"),
        rows=(
            (f"converge, host by host: {hosts * size} specs → all Stable", f"{converged:.1f} s"),
            (
                f"rollout of {TARGET}: specs rewritten → last host Stable",
                f"{rollout.last_stable - rollout.updated:.2f} s",
            ),
            ("last host Stable → /v1/wait_for answered (on h1)", f"{answer_delay} ms"),
            (
                "… of which: that host's Consul write reached the agent (proxy)",
                f"{publish_delay} ms",
            ),
            ("last host Stable → `condo wait` exited 0 (asking h1)", f"{wait_delay} ms"),
            (f"Consul writes at rest ({rest_window:g} s)", f"{rest_rate:.1f} /s ({len(at_rest)})"),
            (
                f"Consul writes during the rollout ({window:.1f} s)",
                f"{len(writes) / window:.1f} /s ({len(writes)}, {kv} KV)",
            ),
            ("Consul writes per host at rest", f"{rest_rate / hosts:.2f} /s"),
            *sim_rows,
        ),
        figures={
            "hosts": hosts,
            "services_per_host": size,
            "converge_s": round(converged, 2),
            "rollout_s": round(rollout.last_stable - rollout.updated, 3),
            "answer_after_last_stable_ms": answer_delay,
            "condo_wait_after_last_stable_ms": wait_delay,
            "publish_after_last_stable_ms": publish_delay,
            "consul_writes_rest_per_s": round(rest_rate, 2),
            "consul_writes_rollout_per_s": round(len(writes) / window, 2),
            "consul_writes_rollout": len(writes),
            "discarded_attempts": len(attempts) - 1,
            "consul_stall_rollout_s": round(rollout.stall, 2),
            "consul_stall_converge_s": round(converge_stall, 2),
            **sim_figures,
        },
        bars=(
            Bar(
                label="condo wait exits after the last host Stable",
                value=wait_delay,
                limit=ANSWER_BAR,
                unit="ms",
            ),
            Bar(
                label="/v1/wait_for answers after the last host Stable",
                value=answer_delay,
                limit=ANSWER_BAR,
                unit="ms",
            ),
            sim_bar,
        ),
        notes=tuple(notes),
    )


@attrs.frozen(kw_only=True)
class _Rollout:
    updated: float  # the spec files were rewritten
    answered: float  # the long-poll's answer arrived
    waited: float  # `condo wait` exited
    published: float | None  # the last host's write of TARGET's new state reached Consul
    last_stable: float  # condo's log line of the last host's → Stable
    settled: float  # end of the window in which writes are counted
    writes: list[ProxiedRequest]
    containers: dict[tuple[str, str], str | None]  # the new containers, per (host, service)
    stall: float = 0.0  # the longest Consul probe overlapping the rollout, seconds


async def _rollout(
    run: Run,
    condos: list[Condo],
    url: str,
    image: str,
    old: Mapping[tuple[str, str], str | None],
    consul: RecordingProxy,
) -> _Rollout:
    """Hold a long-poll for TARGET on `image` and a `condo wait` for it, rewrite TARGET on every
    host, time both answers."""
    query = urllib.parse.urlencode({"name": TARGET, "image": image, "timeout": "600"})
    argv = [condo_python(), "-m", "condo", "wait", "--name", TARGET, "--image", image]
    argv += ["--url", url, "--timeout", "600"]
    waited: list[float] = []
    connection = await HttpConnection.open(url)
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            )
            nursery.start_soon(_exited, process, waited)
            await connection.send_get(f"/v1/wait_for?{query}")
            with deadline(60, "the long-poll and condo wait held"):
                # condo's own gauge is the only witness of "held"
                await wait_metric_at_least(url, "condo_web_open_waits", 2)
            mark = len(consul.requests.items)
            text = spec_text(run, image, deploy="[:After 0]")
            updated = wall()
            for one in condos:
                write_spec(one.specs, TARGET, text)
            with deadline(LIMIT, "the update answered"):
                status, body = await connection.read_response()
                answered = wall()
                await process.wait()
    finally:
        await connection.aclose()
    done = await _answered_and_stable(status, body, process, condos, old)
    await trio.sleep(SETTLE)
    (last_host, _), last = max(done.items(), key=lambda item: item[1].at)
    published = next(
        (
            r.at
            for r in consul.requests.items[mark:]
            if r.method == "PUT" and f"/{TARGET}/{last_host}" in r.target and r.at >= last.at
        ),
        None,
    )
    return _Rollout(
        published=published,
        updated=updated,
        answered=answered,
        waited=waited[0],
        last_stable=max(t.at for t in done.values()),
        settled=answered + SETTLE,
        writes=_writes([r for r in consul.requests.items[mark:] if r.at <= answered + SETTLE]),
        containers={key: t.container for key, t in done.items()},
    )


async def _exited(process: trio.Process, when: list[float]) -> None:
    await process.wait()
    when.append(wall())


class _Stalls:
    """Direct probes of the Consul agent (not through the proxy): (sent, took) pairs."""

    def __init__(self) -> None:
        self.probes: list[tuple[float, float]] = []

    def worst(self, start: float, end: float) -> float:
        return max(
            (took for sent, took in self.probes if sent <= end and sent + took >= start),
            default=0.0,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://{CONSUL_HOST}:{CONSUL_PORT}", timeout=PROBE_LIMIT
        ) as client:
            task_status.started()
            while True:
                sent = wall()
                with contextlib.suppress(httpx.HTTPError):  # a timeout is the stall itself
                    await client.get("/v1/status/leader")
                self.probes.append((sent, wall() - sent))
                await trio.sleep(PROBE_INTERVAL)


@contextlib.asynccontextmanager
async def _watching_consul() -> AsyncIterator[_Stalls]:
    stalls = _Stalls()
    async with trio.open_nursery() as nursery:
        await nursery.start(stalls.run)
        try:
            yield stalls
        finally:
            nursery.cancel_scope.cancel()


def _writes(requests: list[ProxiedRequest]) -> list[ProxiedRequest]:
    return [r for r in requests if r.method in ("PUT", "DELETE")]


async def _all_stable(
    condos: list[Condo], names: list[str], old: Mapping[tuple[str, str], str | None]
) -> dict[tuple[str, str], Transition]:
    """Wait until every condo has every service Stable on a container not in `old`."""
    found: dict[tuple[str, str], Transition] = {}

    async def one(condo: Condo) -> None:
        done = await condo.wait_services(
            names,
            lambda t: stable(t) and t.container != old.get((condo.host, t.service)),
        )
        for transition in done:
            found[(condo.host, transition.service)] = transition

    async with trio.open_nursery() as nursery:
        for condo in condos:
            nursery.start_soon(one, condo)
    return found


async def _wait_for(url: str, name: str, image: str) -> None:
    connection = await HttpConnection.open(url)
    try:
        query = urllib.parse.urlencode({"name": name, "image": image, "timeout": "300"})
        status, body = await connection.get(f"/v1/wait_for?{query}")
    finally:
        await connection.aclose()
    if status != 200:
        raise BenchError(f"/v1/wait_for {name} {image} answered {status}: {body[:300]!r}")


# --- the simulated cell: many hosts, a few real condos ----------------------------------------

SIM_HOSTS, QUICK_SIM_HOSTS = 200, 5
SIM_SERVICES, QUICK_SIM_SERVICES = 20, 3
SIM_REAL = 2  # real condos among the simulated hosts (the first serves the API)
SIM_BAR = 250.0  # ms after the last host's → Stable
SIM_SPREAD = 2.0  # the simulated hosts turn Stable within this many seconds of the rewrite
SIM_DEPLOY = 0.3  # seconds a simulated host spends deploying the new image
SIM_PUBLISHED = 300.0  # bound on every simulated key showing in Consul (a busy machine is slow)
SIM_SEED = 12
SIM_BATCH = 10  # simulated hosts started at a time


@attrs.frozen(kw_only=True)
class _SimRollout:
    updated: float
    last_stable: float  # the last host's → Stable: a real condo's log line or a simulated store
    answered: float
    waited: float
    reads: int  # the observer's reads (one per wake-up) during the rollout
    read_bytes: int
    decodes: int
    requests: int  # the observer's requests answered by Consul (a watch per folder, the prefix's)
    agent_cpu: float  # seconds of CPU
    condo_cpu: float
    simulator_cpu: float  # this process: the simulated hosts' publishers (and the observer)
    window: float


def _box(service: str, image: str) -> Box:
    spec = ServiceSpec(container={"Image": image})
    return Box(id=f"sim-{service}-{image}", name=service, spec=spec, created_at=1.0,
               healthcheck=False, stable_at=1.0)  # fmt: skip


def _sim_stable(service: str, image: str) -> ServiceState:
    box = _box(service, image)
    return ServiceState(phase=Phase.Stable, desired=box.spec, current=box)


def _sim_deploying(service: str, old: str, image: str) -> ServiceState:
    current, candidate = _box(service, old), _box(service, image)
    return ServiceState(phase=Phase.Wait, desired=candidate.spec, current=current, next=candidate)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def consul_agent_pid() -> int | None:
    """The Consul dev agent's pid (scripts/test-env starts `consul agent -dev ...`)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"consul") and argv[1] == b"agent":
            return int(proc.name)
    return None


async def simulated(run: Run) -> tuple[list[tuple[str, str]], dict[str, Scalar], Bar]:
    """SIM_HOSTS hosts of SIM_SERVICES Stable services, published by condo's own Publisher (one
    session each, real Consul traffic, no containers; in a child process: `simulate`) beside
    SIM_REAL real condos running TARGET; one rollout of TARGET everywhere; the rows, figures and
    bar of it. A watcher like each condo's (condo's ConsulSource, in this process) counts the
    reads, bytes and decodes of every wake-up."""
    hosts = QUICK_SIM_HOSTS if run.quick else SIM_HOSTS
    size = QUICK_SIM_SERVICES if run.quick else SIM_SERVICES
    real = 1 if run.quick else SIM_REAL
    layout = KeyLayout.of(run.consul_prefix("multisim"))
    names = {run.host(f"s{i}") for i in range(1, hosts + 1)}
    argv = [condo_python(), "-m", "bench.multihost", "simulate", layout.prefix]
    argv += [run.host("s"), str(hosts), str(size)]
    # condo's code logs every Consul call (debug): this process prints the report only.
    logging = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(WARNING))
    try:
        rollout = await _simulating(run, layout, real, argv, names, size)
    finally:
        structlog.configure(**logging)
    answer = ms(rollout.answered - rollout.last_stable)
    waited = ms(rollout.waited - rollout.last_stable)
    wakes = max(rollout.reads, 1)
    label = f"{hosts} simulated + {real} real hosts x {size} services"
    window = rollout.window
    rows = [
        (f"{label}: last host Stable → /v1/wait_for answered", f"{answer} ms"),
        (f"{label}: last host Stable → `condo wait` exited 0", f"{waited} ms"),
        (
            "… a watcher's wake-ups in the rollout; requests, bytes read and values decoded per"
            " wake-up",
            f"{rollout.reads}; {rollout.requests / wakes:.1f}; "
            f"{rollout.read_bytes / wakes / 1024:.0f} KiB; "
            f"{rollout.decodes / wakes:.1f} of {hosts * (size + 2)} keys",
        ),
        (
            f"… CPU in the rollout ({window:.1f} s): Consul agent, condo (API), simulator",
            f"{100 * rollout.agent_cpu / window:.0f} %, {100 * rollout.condo_cpu / window:.0f} %, "
            f"{100 * rollout.simulator_cpu / window:.0f} % of a core",
        ),
    ]
    figures: dict[str, Scalar] = {
        "sim_hosts": hosts,
        "sim_services_per_host": size,
        "sim_real_condos": real,
        "sim_answer_after_last_stable_ms": answer,
        "sim_condo_wait_after_last_stable_ms": waited,
        "sim_wakeups": rollout.reads,
        "sim_requests_per_wakeup": round(rollout.requests / wakes, 2),
        "sim_read_bytes_per_wakeup": round(rollout.read_bytes / wakes),
        "sim_decodes_per_wakeup": round(rollout.decodes / wakes, 2),
        "sim_agent_cpu_pct": round(100 * rollout.agent_cpu / window, 1),
        "sim_condo_cpu_pct": round(100 * rollout.condo_cpu / window, 1),
        "sim_simulator_cpu_pct": round(100 * rollout.simulator_cpu / window, 1),
    }
    bar = Bar(
        label=f"condo wait exits after the last of {hosts + real} hosts Stable",
        value=waited,
        limit=SIM_BAR,
        unit="ms",
    )
    return rows, figures, bar


async def _simulating(
    run: Run, layout: KeyLayout, real: int, argv: list[str], names: set[str], size: int
) -> _SimRollout:
    hosts = len(names)
    endpoint = f"http://{CONSUL_HOST}:{CONSUL_PORT}"
    async with (
        httpx.AsyncClient(base_url=endpoint, trust_env=False) as http,
        trio.open_nursery() as nursery,
    ):
        observer = ConsulSource(ConsulClient(http), layout)
        await nursery.start(observer.run)
        simulator = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(Path(__file__).parent.parent),
        )
        try:
            assert simulator.stdin is not None
            assert simulator.stdout is not None
            lines = _Lines(simulator.stdout)
            specs = [
                CondoSpec(
                    name=f"r{i}",
                    host=run.host(f"r{i}"),
                    server=i == 1,
                    extra=("--expose", "consul", "--consul-prefix", layout.prefix),
                    profile=i == 1,
                )
                for i in range(1, real + 1)
            ]
            async with open_condos(run, specs) as condos:
                api = condos[0]
                with deadline(120, f"{real} condos ready"):
                    for one in condos:
                        await one.wait_ready()
                assert api.url is not None
                text = spec_text(run, BUSYBOX, deploy="[:After 0]")
                for one in condos:
                    write_spec(one.specs, TARGET, text)
                with deadline(LIMIT, f"{real} real condos Stable"):
                    done = await _all_stable(condos, [TARGET], {})
                with deadline(SIM_PUBLISHED, f"{hosts} x {size} simulated keys in Consul"):
                    await lines.expect("ready")
                    await _until_pictured(
                        observer,
                        lambda p: all(len(p.hosts.get(h, ())) == size for h in names),
                    )
                    await _wait_for(api.url, TARGET, BUSYBOX)
                await trio.sleep(1.0)
                old = {key: t.container for key, t in done.items()}
                rollout = await _sim_rollout(run, condos, old, simulator, lines, observer)
        finally:
            if simulator.stdin is not None:
                await simulator.stdin.aclose()  # the simulator ends its sessions and exits
            with trio.move_on_after(10):
                await simulator.wait()
            simulator.kill()
        nursery.cancel_scope.cancel()
    return rollout


class _Lines:
    """Lines from a child's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise BenchError("the simulator exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def expect(self, word: str) -> str:
        line = await self.next()
        if not line.startswith(word):
            raise BenchError(f"the simulator said {line!r}, not {word}")
        return line.removeprefix(word).strip()


async def _until_pictured(source: ConsulSource, predicate: Callable[[Picture], bool]) -> None:
    while not predicate(picture := source.picture()):
        await source.wait_beyond(picture.token)


async def _sim_rollout(
    run: Run,
    condos: list[Condo],
    old: Mapping[tuple[str, str], str | None],
    simulator: trio.Process,
    lines: _Lines,
    observer: ConsulSource,
) -> _SimRollout:
    """Hold a long-poll and a `condo wait` for TARGET on BUSYBOX_2; rewrite the real condos'
    spec, and have the simulated hosts turn Stable on it (in a random order within SIM_SPREAD)."""
    api = condos[0]
    assert api.url is not None
    assert simulator.stdin is not None
    image = BUSYBOX_2
    query = urllib.parse.urlencode({"name": TARGET, "image": image, "timeout": "600"})
    argv = [condo_python(), "-m", "condo", "wait", "--name", TARGET, "--image", image]
    argv += ["--url", api.url, "--timeout", "600"]
    waited: list[float] = []
    connection = await HttpConnection.open(api.url)
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process, argv, capture_stdout=True, capture_stderr=True, check=False
                )
            )
            nursery.start_soon(_exited, process, waited)
            await connection.send_get(f"/v1/wait_for?{query}")
            with deadline(60, "the long-poll and condo wait held"):
                await wait_metric_at_least(api.url, "condo_web_open_waits", 2)
            cpu = _Cpu(consul_agent_pid(), api.pid, simulator.pid)
            reads, read_bytes, decodes = observer.reads, observer.read_bytes, observer.decodes
            requests = observer.requests
            text = spec_text(run, image, deploy="[:After 0]")
            updated = wall()
            await simulator.stdin.send_all(f"rollout {image}\n".encode())
            for one in condos:
                write_spec(one.specs, TARGET, text)
            with deadline(LIMIT, "the update answered"):
                status, body = await connection.read_response()
                answered = wall()
                await process.wait()
            spent = cpu.spent()
            reads = observer.reads - reads
            read_bytes, decodes = observer.read_bytes - read_bytes, observer.decodes - decodes
            requests = observer.requests - requests
            with deadline(LIMIT, "the simulated hosts Stable"):
                last_simulated = float(await lines.expect("stable"))
    finally:
        await connection.aclose()
    done = await _answered_and_stable(status, body, process, condos, old)
    return _SimRollout(
        updated=updated,
        last_stable=max(last_simulated, *(t.at for t in done.values())),
        answered=answered,
        waited=waited[0],
        reads=reads,
        read_bytes=read_bytes,
        decodes=decodes,
        requests=requests,
        agent_cpu=spent[0],
        condo_cpu=spent[1],
        simulator_cpu=spent[2],
        window=max(answered - updated, 1e-3),
    )


class _Cpu:
    """CPU seconds spent by some processes (None: not found, counted 0) since construction."""

    def __init__(self, *pids: int | None) -> None:
        self._pids = pids
        self._start = self._now()

    def _now(self) -> tuple[float, ...]:
        return tuple(0.0 if pid is None else _cpu_seconds(pid) for pid in self._pids)

    def spent(self) -> tuple[float, ...]:
        return tuple(b - a for a, b in zip(self._start, self._now(), strict=True))


# --- the simulator (a child process: `python -m bench.multihost simulate ...`) ----------------


async def simulate(prefix: str, stem: str, count: int, size: int) -> None:
    """`count` hosts (`<stem>1`...) of `size` Stable services on BUSYBOX, each published by its
    own condo Publisher (its own session); says `ready` once every key is written. On `rollout
    IMAGE` (stdin), each host deploys TARGET on IMAGE, at a random moment within SIM_SPREAD, and
    says `stable <wall time of the last>` once all are Stable. Ends (destroying the sessions) when
    stdin closes."""
    # stdout carries the protocol: condo's log lines (warnings only) go to stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    layout = KeyLayout.of(prefix)
    names = [TARGET, *(f"m{i:02d}" for i in range(1, size))]
    stores = [Store(f"{stem}{i}") for i in range(1, count + 1)]
    for store in stores:
        for name in names:
            store.set_state(name, _sim_stable(name, BUSYBOX))
        store.mark_settled()
    endpoint = f"http://{CONSUL_HOST}:{CONSUL_PORT}"
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with contextlib.AsyncExitStack() as clients, trio.open_nursery() as nursery:
        # One HTTP client per host, as each condo has its own: one pool of 200 connections
        # costs httpcore time per request that grows with the pool (it held this process to
        # ~100 writes/s, and the sessions of hosts waiting their turn expired).
        publishers = []
        for store in stores:
            http = await clients.enter_async_context(
                httpx.AsyncClient(base_url=endpoint, trust_env=False)
            )
            publishers.append(Publisher(ConsulClient(http), store, layout, store.host))
        # A few hosts at a time, as a fleet comes up: 200 first rounds of 22 writes at once
        # outlast the sessions' TTL (a round renews only when it starts).
        for first in range(0, count, SIM_BATCH):
            batch = publishers[first : first + SIM_BATCH]
            for publisher in batch:
                await nursery.start(publisher.run)
            # Polling: the publishers have no event for "confirmed"; a tenth of a second is
            # nothing here.
            while not all(len(p.published) == size for p in batch):  # noqa: ASYNC110
                await trio.sleep(0.1)
        print("ready", flush=True)
        commands = _Lines(stdin)
        while True:
            try:
                command = (await commands.next()).split()
            except BenchError:
                break  # stdin closed: the end
            if command[:1] == ["rollout"]:
                await _deploy(stores, command[1])
        nursery.cancel_scope.cancel()


async def _deploy(stores: list[Store], image: str) -> None:
    order = random.Random(SIM_SEED)
    turned: list[float] = []

    async def one(store: Store, offset: float) -> None:
        await trio.sleep(offset)
        store.set_state(TARGET, _sim_deploying(TARGET, BUSYBOX, image))
        await trio.sleep(SIM_DEPLOY)
        store.set_state(TARGET, _sim_stable(TARGET, image))
        turned.append(wall())

    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(one, store, order.uniform(0, SIM_SPREAD))
    print(f"stable {max(turned)!r}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["simulate"]:
        prefix, stem, count, size = sys.argv[2:6]
        trio.run(simulate, prefix, stem, int(count), int(size))


async def _answered_and_stable(
    status: int,
    body: bytes,
    process: trio.Process,
    condos: list[Condo],
    old: Mapping[tuple[str, str], str | None],
) -> dict[tuple[str, str], Transition]:
    """The wait answered ok and `condo wait` exited 0; then every real condo's Stable on TARGET."""
    if status != 200 or b'"ok"' not in body:
        raise BenchError(f"/v1/wait_for answered {status}: {body[:300]!r}")
    if process.returncode != 0:
        raise BenchError(f"condo wait exited {process.returncode}")
    with deadline(LIMIT, "every real condo Stable on the new image"):
        return await _all_stable(condos, [TARGET], old)

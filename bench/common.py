"""What every benchmark shares: the run, the engine as an observer, condo as a real process, the
recording proxy, a raw HTTP/1.1 client, statistics, and the report.

Owns:
- `Run`: one invocation of `python -m bench` (id, work folder, engine, machine facts). Every
  container any benchmark makes carries the label `condo-bench.run=<id>` (condo's through the
  spec's own `Labels`, `docker run`'s and compose's through `--label`/`labels:`), so `Run.sweep`
  removes all of them, whatever failed.
- `Engine`: the Docker engine over its socket, only to observe (`/events`) and clean up; condo
  itself is never imported to do the measuring.
- `open_condos`: `condo run` as real subprocesses (`.venv/bin/python -m condo run`); their JSON
  logs (stderr) are parsed into each service's latest transition, with condo's own timestamps.
- `open_unix_proxy` / `open_tcp_proxy`: a byte pump between condo and the engine (or Consul) that
  timestamps the start of every HTTP request it forwards: "the first Docker call" and "Consul
  writes" are measured without condo's debug logs.
- `HttpConnection`: a minimal keep-alive HTTP/1.1 client on raw Trio sockets; httpx would cost
  the load generator more CPU than condo spends answering, on a 2-core machine.
- `Report` / `emit`: the table, the one JSON line on stdout, and the benchmark's own section of
  bench/RESULTS.md (machine, engine version, date).

Invariants:
- Every time is wall-clock unix seconds (the engine's event times, condo's log timestamps and our
  own share the machine's clock), so they can be subtracted from each other.
- Every process a benchmark starts is ended by the context manager that started it (SIGTERM,
  then SIGKILL), and every wait is bounded (`deadline`), also in cleanup (shielded).
- Spec files are written synchronously, atomically (temp file + rename): a thread hop would add
  its own latency to the moment a benchmark calls "written".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import attrs
import httpx
import trio

import condo

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO / "bench" / "RESULTS.md"
DOCKER_SOCKET = "/var/run/docker.sock"
CONSUL_HOST, CONSUL_PORT = "127.0.0.1", 8500
RUN_LABEL = "condo-bench.run"
CASE_LABEL = "condo-bench.case"
HOST_LABEL = "condo.host"
SERVICE_LABEL = "condo.service"

BUSYBOX = "condo-test/busybox:1"
BUSYBOX_2 = "condo-test/busybox:2"
HEALTHY = "condo-test/healthy:1"
HEALTHY_2 = "condo-test/healthy:2"
IMAGES = (BUSYBOX, BUSYBOX_2, HEALTHY, HEALTHY_2)

CLEANUP_LIMIT = 300.0  # removing a few hundred containers on a busy 2-core engine
STOP_LIMIT = 20.0  # SIGTERM → exit of one condo (it persists its state, destroys its session)
READY_LIMIT = 60.0
REMOVE_CONCURRENCY = 8

Scalar = float | int | str | bool | None
T = TypeVar("T")
R = TypeVar("R")


class BenchError(Exception):
    """A benchmark could not measure what it set out to (not: a bar was missed)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a wait; on expiry raise BenchError naming what did not happen."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise BenchError(f"{what}: not done within {seconds:g} s") from None


def wall() -> float:
    return time.time()


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- a list that can be waited on --------------------------------------------------------------


class Feed(Generic[T]):
    """An append-only list of observations; waiters re-check their condition on every append."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.closed = False
        self._changed = trio.Event()

    def append(self, item: T) -> None:
        self.items.append(item)
        self._bump()

    def close(self) -> None:
        self.closed = True
        self._bump()

    def _bump(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, found: Callable[[], R | None]) -> R:
        """The first non-None `found()`, re-evaluated after every append (no polling)."""
        while True:
            result = found()
            if result is not None:
                return result
            if self.closed:
                raise BenchError("the observed stream ended before the condition was met")
            await self._changed.wait()

    async def next_after(self, mark: int, match: Callable[[T], bool]) -> T:
        """The first item at index ≥ `mark` that matches, waiting for it if needed."""
        return await self.wait_for(functools.partial(self.first_after, mark, match))

    def first_after(self, mark: int, match: Callable[[T], bool]) -> T | None:
        """The first item at index ≥ `mark` that matches."""
        for item in self.items[mark:]:
            if match(item):
                return item
        return None


# --- machine -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Machine:
    cores: int
    engine: str
    api: str
    kernel: str
    python: str
    condo: str
    date: str
    load: float  # 1-minute load average when the run began (the machine is shared)

    def as_json(self) -> dict[str, Scalar]:
        return {
            "cores": self.cores,
            "engine": self.engine,
            "api": self.api,
            "kernel": self.kernel,
            "python": self.python,
            "condo": self.condo,
            "date": self.date,
            "load": self.load,
        }

    def line(self) -> str:
        return (
            f"{self.date} · {self.cores} cores · Docker Engine {self.engine} (API {self.api}) · "
            f"Linux {self.kernel} · Python {self.python} · condo {self.condo} · "
            f"load {self.load:.2f} at start"
        )


# --- the engine (observer and cleaner) -----------------------------------------------------------


@attrs.frozen(kw_only=True)
class EngineEvent:
    action: str  # create, start, die, destroy, health_status
    health: str | None  # for health_status: healthy / unhealthy
    container_id: str
    name: str
    labels: Mapping[str, str]
    at: float

    @property
    def service(self) -> str | None:
        return self.labels.get(SERVICE_LABEL)


def _event_from(raw: object) -> EngineEvent | None:
    if not isinstance(raw, dict) or raw.get("Type") != "container":
        return None
    action = str(raw.get("Action", ""))
    actor = raw.get("Actor") or {}
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    health = None
    if action.startswith("health_status"):
        action, _, health = action.partition(":")
        health = health.strip()
    return EngineEvent(
        action=action,
        health=health,
        container_id=str(actor.get("ID", "")),
        name=attributes.get("name", ""),
        labels=attributes,
        at=int(raw.get("timeNano", 0)) / 1e9,
    )


class Engine:
    """The Docker engine, for watching and cleaning up (never for what is being measured)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[Engine]:
        transport = httpx.AsyncHTTPTransport(uds=DOCKER_SOCKET)
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://docker", timeout=timeout
        ) as client:
            yield cls(client)

    async def version(self) -> tuple[str, str]:
        response = await self._client.get("/version")
        response.raise_for_status()
        body = response.json()
        return str(body["Version"]), str(body["ApiVersion"])

    async def image_present(self, image: str) -> bool:
        response = await self._client.get(f"/images/{image}/json")
        return response.status_code == 200

    async def container_ids(self, labels: Mapping[str, str]) -> list[str]:
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        response = await self._client.get(
            "/containers/json", params={"all": "true", "filters": filters}
        )
        response.raise_for_status()
        return [str(row["Id"]) for row in response.json()]

    async def remove_labelled(self, labels: Mapping[str, str]) -> int:
        """Force-remove every container carrying all `labels`; returns how many there were."""
        ids = await self.container_ids(labels)
        limiter = trio.CapacityLimiter(REMOVE_CONCURRENCY)

        async def remove(cid: str) -> None:
            async with limiter:
                # 404: condo (or compose) removed it meanwhile; an engine away: the caller
                # lists again and sees what is left (Run.sweep retries).
                with contextlib.suppress(httpx.TransportError):
                    await self._client.delete(f"/containers/{cid}", params={"force": "true"})

        async with trio.open_nursery() as nursery:
            for cid in ids:
                nursery.start_soon(remove, cid)
        return len(ids)

    async def create_and_start(self, body: Mapping[str, object]) -> tuple[str, float]:
        """Create and start a container; returns its id and when the create request was sent."""
        sent = wall()
        response = await self._client.post("/containers/create", json=dict(body))
        response.raise_for_status()
        cid = str(response.json()["Id"])
        started = await self._client.post(f"/containers/{cid}/start")
        started.raise_for_status()
        return cid, sent

    async def run_events(
        self,
        labels: Mapping[str, str],
        feed: Feed[EngineEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Append the engine's container events for `labels` to `feed` until cancelled.

        `started()` once the engine accepted the subscription: nothing after it is missed.
        """
        filters = json.dumps(
            {
                "type": ["container"],
                "label": [f"{k}={v}" for k, v in labels.items()],
                "event": ["create", "start", "die", "destroy", "health_status"],
            }
        )
        timeout = httpx.Timeout(10.0, read=None)  # an idle stream is not an error
        async with self._client.stream(
            "GET", "/events", params={"filters": filters}, timeout=timeout
        ) as response:
            response.raise_for_status()
            task_status.started()
            async for line in response.aiter_lines():
                if line.strip():
                    event = _event_from(json.loads(line))
                    if event is not None:
                        feed.append(event)


@contextlib.asynccontextmanager
async def recording_events(
    engine: Engine, labels: Mapping[str, str]
) -> AsyncIterator[Feed[EngineEvent]]:
    """The engine's container events for `labels`, recorded while the block runs."""
    feed: Feed[EngineEvent] = Feed()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run_events, labels, feed)
        try:
            yield feed
        finally:
            nursery.cancel_scope.cancel()


# --- the run -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Options:
    quick: bool
    results: Path | None  # None: do not touch any RESULTS.md
    keep: bool = False  # keep the work folder (logs, specs) after a successful run
    # Sample every condo with py-spy (folded stacks into this folder); figures are then
    # disturbed by the sampler, so a profiling run is for finding where time goes, not for bars.
    profile: Path | None = None


class Run:
    """One `python -m bench` invocation: its id, work folder, engine and machine facts."""

    def __init__(self, options: Options, workdir: Path, engine: Engine, machine: Machine) -> None:
        self.id = workdir.name.removeprefix("condo-bench-")
        self.options = options
        self.quick = options.quick
        self.workdir = workdir
        self.engine = engine
        self.machine = machine
        self.consul_prefixes: list[str] = []
        self.failed = False  # a benchmark failed: keep the work folder (logs) for a post-mortem

    def folder(self, *parts: str) -> Path:
        path = self.workdir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def host(self, name: str) -> str:
        return f"bench-{self.id}-{name}"

    @property
    def labels(self) -> dict[str, str]:
        return {RUN_LABEL: self.id}

    def consul_prefix(self, name: str) -> str:
        prefix = f"condo-bench-{self.id}-{name}"
        self.consul_prefixes.append(prefix)
        return prefix

    async def sweep(self) -> int:
        """Remove every container of this run, and its Consul keys (bounded, shielded)."""
        removed = 0
        with trio.move_on_after(CLEANUP_LIMIT, shield=True) as scope:
            for prefix in self.consul_prefixes:
                await delete_consul_prefix(prefix)
            while True:
                try:
                    removed += await self.engine.remove_labelled(self.labels)
                    left = await self.engine.container_ids(self.labels)
                except httpx.TransportError as exc:
                    # The engine is away (other tests on this machine restart dockerd): wait
                    # for it, within CLEANUP_LIMIT, rather than leave containers behind.
                    print(f"bench: sweep waits for the engine: {exc}", file=sys.stderr)
                    await trio.sleep(2.0)
                    continue
                if not left:
                    break
                await trio.sleep(1.0)  # removed meanwhile by their condo, or still stopping
        if scope.cancelled_caught:
            print(f"bench: containers of run {self.id} may be left", file=sys.stderr)
        return removed


@contextlib.asynccontextmanager
async def open_run(options: Options) -> AsyncIterator[Run]:
    """A fresh run: work folder, engine, machine facts, images checked; swept at the end."""
    raise_open_files_limit()
    workdir = Path(f"/tmp/condo-bench-{uuid.uuid4().hex[:8]}")
    await trio.Path(workdir).mkdir()
    failed = True
    async with Engine.open() as engine:
        try:
            version, api = await engine.version()
        except httpx.HTTPError as exc:
            raise BenchError(
                f"the Docker engine does not answer on {DOCKER_SOCKET}: {exc}"
            ) from exc
        for image in IMAGES:
            if not await engine.image_present(image):
                raise BenchError(f"image {image} is missing: run scripts/test-env first")
        machine = Machine(
            cores=os.cpu_count() or 0,
            engine=version,
            api=api,
            kernel=platform.release(),
            python=platform.python_version(),
            condo=condo.__version__,
            date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            load=os.getloadavg()[0],
        )
        run = Run(options, workdir, engine, machine)
        try:
            yield run
            failed = False
        finally:
            await run.sweep()
            failed = failed or run.failed
            if not (failed or options.keep):
                shutil.rmtree(workdir, ignore_errors=True)
            elif failed:
                print(f"bench: logs and specs kept in {workdir}", file=sys.stderr)


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (children, condo included, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if os.geteuid() == 0:
        wanted = max(hard, 65536)  # root may raise the hard limit too (up to fs.nr_open)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):  # not permitted: fall back to the hard limit as it is
            continue
    return soft


# --- spec files ----------------------------------------------------------------------------------


def spec_text(
    run: Run,
    image: str,
    *,
    deploy: str = "[:Before]",
    env: Sequence[str] = (),
    stop_timeout: float = 2,
    health_timeout: float = 30,
) -> str:
    """An EDN spec whose container carries the run's label (for the sweep)."""
    env_part = " :Env [" + " ".join(json.dumps(e) for e in env) + "]" if env else ""
    return (
        f'{{:spec {{:Image "{image}" :Labels {{"{RUN_LABEL}" "{run.id}"}}{env_part}}}\n'
        f" :deploy {deploy} :stop-timeout {stop_timeout} :health-timeout {health_timeout}}}\n"
    )


def write_spec(folder: Path, service: str, text: str) -> None:
    """Write a spec atomically (temp dot-file + rename, as editors and config tools do)."""
    temp = folder / f".{service}.edn.tmp"
    temp.write_text(text)
    os.replace(temp, folder / f"{service}.edn")


# --- condo as a real process ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Transition:
    """One `service.transition` line of condo's log."""

    service: str
    from_: str
    to: str
    container: str | None
    at: float  # condo's own timestamp of the line


@attrs.frozen(kw_only=True)
class LogLine:
    event: str
    at: float
    level: str
    text: str


def _parse_time(value: object) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return dt.datetime.fromisoformat(value).timestamp()
    return wall()


class Condo:
    """One `condo run` subprocess, and what its JSON log says about its services."""

    def __init__(
        self,
        name: str,
        host: str,
        specs: Path,
        argv: Sequence[str],
        log: Path,
        profile: Path | None = None,
    ) -> None:
        self.name = name
        self.profile = profile
        self.profiler: trio.Process | None = None
        self.host = host
        self.specs = specs
        self.argv = list(argv)
        self.log_path = log
        self.lines: Feed[LogLine] = Feed()
        self.latest: dict[str, Transition] = {}
        self.transitions: list[Transition] = []
        self.url: str | None = None
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tail(self, count: int = 15) -> str:
        return "\n".join(line.text for line in self.lines.items[-count:])

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONDO_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = await trio.lowlevel.open_process(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(self.specs.parent),
        )
        if self.profile is not None:
            self.profiler = await self._sample(self.profile)

    async def _sample(self, output: Path) -> trio.Process:
        """py-spy sampling this condo into `output` (folded stacks) until stopped or it exits."""
        argv = [py_spy(), "record", "--pid", str(self.pid), "--rate", "250"]
        argv += ["--format", "raw", "--output", str(output), "--nonblocking"]
        return await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @contextlib.asynccontextmanager
    async def window(self, label: str) -> AsyncIterator[None]:
        """With --profile: also sample this block alone, into `<condo>-<label>.folded`."""
        if self.profile is None:
            yield
            return
        sampler = await self._sample(self.profile.with_name(f"{self.profile.stem}-{label}.folded"))
        try:
            yield
        finally:
            # SIGINT: py-spy writes what it sampled so far and exits.
            with trio.move_on_after(STOP_LIMIT, shield=True):
                sampler.send_signal(signal.SIGINT)
                await sampler.wait()
            if sampler.returncode is None:
                sampler.kill()

    async def read_log(self) -> None:
        """Parse stderr until it closes (the process ended); keeps a copy in `log_path`."""
        assert self.process is not None
        assert self.process.stderr is not None
        pending = b""
        with self.log_path.open("ab") as copy:
            async for chunk in self.process.stderr:
                copy.write(chunk)
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self._take(raw.decode(errors="replace"))
        self.lines.close()

    def _take(self, text: str) -> None:
        try:
            record = json.loads(text)
        except ValueError:  # a stray non-JSON line (a crash before logging was set up)
            record = None
        if not isinstance(record, dict):
            self.lines.append(LogLine(event="", at=wall(), level="raw", text=text))
            return
        event = str(record.get("event", ""))
        at = _parse_time(record.get("timestamp"))
        if event == "service.transition":
            transition = Transition(
                service=str(record.get("service")),
                from_=str(record.get("from_")),
                to=str(record.get("to")),
                container=None if record.get("container") is None else str(record["container"]),
                at=at,
            )
            self.latest[transition.service] = transition
            self.transitions.append(transition)
        elif event == "web.listening":
            urls = record.get("urls") or []
            if isinstance(urls, list) and urls:
                self.url = str(urls[0])
        self.lines.append(LogLine(event=event, at=at, level=str(record.get("level")), text=text))

    async def wait_ready(self) -> None:
        """Until condo logged `condo.started` (and `web.listening` when it serves the API)."""
        serves = "off" not in self.argv[self.argv.index("--server") + 1]

        def ready() -> bool | None:
            started = any(line.event == "condo.started" for line in self.lines.items)
            return True if started and (self.url is not None or not serves) else None

        with deadline(READY_LIMIT, f"condo {self.name} ready"):
            await self._wait(ready)

    async def wait_services(
        self, names: Sequence[str], ok: Callable[[Transition], bool]
    ) -> list[Transition]:
        """Until every service's latest transition satisfies `ok`; returns those transitions."""

        def all_ok() -> list[Transition] | None:
            found = []
            for name in names:
                latest = self.latest.get(name)
                if latest is None or not ok(latest):
                    return None
                found.append(latest)
            return found

        return await self._wait(all_ok)

    async def _wait(self, found: Callable[[], R | None]) -> R:
        try:
            return await self.lines.wait_for(found)
        except BenchError:
            raise BenchError(
                f"condo {self.name} exited early; its log ends:\n{self.tail()}"
            ) from None

    async def stop(self) -> None:
        """SIGTERM (condo persists and exits, leaving the workloads), then SIGKILL if it hangs."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with trio.move_on_after(STOP_LIMIT, shield=True):
            process.send_signal(signal.SIGTERM)
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
        if self.profiler is not None:
            # py-spy writes its file once the target is gone.
            with trio.move_on_after(STOP_LIMIT, shield=True):
                await self.profiler.wait()
            if self.profiler.returncode is None:
                self.profiler.kill()


def stable(transition: Transition) -> bool:
    return transition.to == "Stable"


def py_spy() -> str:
    """py-spy for --profile: $BENCH_PY_SPY, else on PATH (install it outside the project's venv,
    e.g. `python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy`)."""
    found = os.environ.get("BENCH_PY_SPY") or shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: set BENCH_PY_SPY or put py-spy on PATH")
    return found


def condo_python() -> str:
    """The project's virtualenv interpreter (condo runs as `.venv/bin/python -m condo`)."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@attrs.frozen(kw_only=True)
class CondoSpec:
    """How to start one condo of a benchmark."""

    name: str
    host: str
    server: bool = False
    extra: tuple[str, ...] = ()
    profile: bool = True  # sampled by py-spy under --profile (a sampler per condo costs CPU)


@contextlib.asynccontextmanager
async def open_condos(run: Run, specs: Sequence[CondoSpec]) -> AsyncIterator[list[Condo]]:
    """Start one `condo run` per spec (each its own folder); stop them all and remove their
    containers at the end, in parallel, also on failure."""
    condos: list[Condo] = []
    for item in specs:
        folder = run.folder(item.name)
        spec_dir = folder / "specs"
        spec_dir.mkdir(exist_ok=True)
        argv = [
            condo_python(), "-m", "condo", "run", str(spec_dir),
            "--state", str(folder / "state.json"),
            "--host", item.host,
            "--server", "127.0.0.1:0" if item.server else "off",
            "--log-format", "json",
            *item.extra,
        ]  # fmt: skip
        profile = run.options.profile
        condos.append(
            Condo(
                item.name,
                item.host,
                spec_dir,
                argv,
                folder / "condo.log",
                profile=None
                if profile is None or not item.profile
                else profile / f"{item.name}.folded",
            )
        )
    async with trio.open_nursery() as nursery:
        try:
            for one in condos:
                await one.start()
                nursery.start_soon(one.read_log)
            yield condos
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stoppers:
                    for one in condos:
                        stoppers.start_soon(one.stop)
                with (
                    trio.move_on_after(CLEANUP_LIMIT),
                    # The engine away: Run.sweep (by the run's label) retries until it is back.
                    contextlib.suppress(httpx.TransportError),
                ):
                    for one in condos:
                        await run.engine.remove_labelled({HOST_LABEL: one.host})
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_condo(run: Run, spec: CondoSpec) -> AsyncIterator[Condo]:
    async with open_condos(run, [spec]) as condos:
        yield condos[0]


# --- /proc ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ProcSample:
    at: float  # monotonic seconds
    cpu: float  # user + system CPU seconds so far, every thread
    main_cpu: float  # the same, of the main thread alone (Trio's); the rest is worker threads
    rss: int  # bytes
    peak_rss: int  # bytes (VmHWM)


def sample_process(pid: int) -> ProcSample:
    """CPU time and memory of a process, from /proc (Linux)."""
    at = time.monotonic()
    cpu = _cpu_seconds(Path(f"/proc/{pid}/stat"))
    main_cpu = _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
    status = Path(f"/proc/{pid}/status").read_text()
    memory = {
        key: int(value.split()[0]) * 1024
        for key, value in (line.split(":", 1) for line in status.splitlines() if ":" in line)
        if key in ("VmRSS", "VmHWM")
    }
    return ProcSample(
        at=at, cpu=cpu, main_cpu=main_cpu, rss=memory["VmRSS"], peak_rss=memory["VmHWM"]
    )


def _cpu_seconds(stat_file: Path) -> float:
    stat = stat_file.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)


def cpu_percent(before: ProcSample, after: ProcSample) -> float:
    """CPU used between two samples, in percent of one core."""
    return (after.cpu - before.cpu) / (after.at - before.at) * 100


def main_thread_percent(before: ProcSample, after: ProcSample) -> float:
    """CPU of the main (Trio) thread between two samples, in percent of one core."""
    return (after.main_cpu - before.main_cpu) / (after.at - before.at) * 100


def mb(size: int) -> float:
    return round(size / 1e6, 1)


# --- external commands ---------------------------------------------------------------------------


async def run_command(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run a command to completion; its stdout; BenchError with stderr when it fails."""
    result = await trio.run_process(
        list(argv), capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
    )
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:4])}… exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace')[-600:]}"
        )
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


async def docker_run_parallel(run: Run, count: int, image: str, case: str) -> float:
    """The engine's floor: `count` parallel `docker run -d IMAGE` (the image's own command);
    seconds from launching them to the last one returning."""
    argv = [
        "docker", "run", "-d",
        "--label", f"{RUN_LABEL}={run.id}", "--label", f"{CASE_LABEL}={case}",
        image,
    ]  # fmt: skip
    began = wall()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(run_command, argv)
    return wall() - began


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed: apt-get install -y {package}")
    return path


# --- Consul --------------------------------------------------------------------------------------


async def delete_consul_prefix(prefix: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{CONSUL_HOST}:{CONSUL_PORT}") as client:
        with contextlib.suppress(httpx.HTTPError):  # Consul gone: nothing left to clean there
            await client.delete(f"/v1/kv/{prefix}", params={"recurse": "true"})


async def consul_answers() -> bool:
    base = f"http://{CONSUL_HOST}:{CONSUL_PORT}"
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        try:
            response = await client.get("/v1/status/leader")
        except httpx.HTTPError:
            return False
    return response.status_code == 200 and response.text.strip() not in ('""', "")


# --- the recording proxy -------------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"^(GET|POST|PUT|DELETE|HEAD|PATCH|OPTIONS) (\S+) HTTP/1\.[01]\r\n")


@attrs.frozen(kw_only=True)
class ProxiedRequest:
    at: float
    method: str
    target: str


class RecordingProxy:
    """Forwards bytes both ways; records the start of every HTTP request going upstream."""

    def __init__(self, connect: Callable[[], Awaitable[trio.SocketStream]]) -> None:
        self._connect = connect
        self.requests: Feed[ProxiedRequest] = Feed()
        self.address = ""

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await self._connect()
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
                # A peer that resets or closes ends the pair: HTTP has nothing to half-close.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for chunk in source:
                        if up:
                            # A request's head arrives in one write; a chunk that starts with a
                            # request line is a new request (keep-alive, never pipelined).
                            match = _REQUEST_LINE.match(chunk)
                            if match is not None:
                                self.requests.append(
                                    ProxiedRequest(
                                        at=wall(),
                                        method=match.group(1).decode(),
                                        target=match.group(2).decode(errors="replace"),
                                    )
                                )
                        await sink.send_all(chunk)
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, True)
            nursery.start_soon(pump, upstream, client, False)


@contextlib.asynccontextmanager
async def open_unix_proxy(path: Path, upstream: str) -> AsyncIterator[RecordingProxy]:
    """A recording proxy listening on the unix socket `path`, forwarding to `upstream`."""
    proxy = RecordingProxy(functools.partial(trio.open_unix_socket, upstream))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(256)
    proxy.address = str(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, proxy.handle, [trio.SocketListener(sock)])
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_tcp_proxy(host: str, port: int) -> AsyncIterator[RecordingProxy]:
    """A recording proxy on a free loopback port, forwarding to `host:port`."""
    proxy = RecordingProxy(functools.partial(trio.open_tcp_stream, host, port))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1", backlog=256)
        )
        bound = listeners[0].socket.getsockname()
        proxy.address = f"{bound[0]}:{bound[1]}"
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# --- a raw HTTP/1.1 client -----------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection for GET requests (load and long-polls)."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._buffer = bytearray()

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        parsed = httpx.URL(url)
        port = parsed.port or 80
        stream = await trio.open_tcp_stream(parsed.host, port)
        return cls(stream, f"{parsed.host}:{port}")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def get(self, target: str) -> tuple[int, bytes]:
        """Send one GET and read its whole response: (status, body)."""
        await self.send_get(target)
        return await self.read_response()

    async def send_get(self, target: str) -> None:
        await self._stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {self._host}\r\n\r\n".encode())

    async def read_response(self) -> tuple[int, bytes]:
        """Read one whole response: (status, body)."""
        head = await self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._read_to_end()
        return status, body

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise BenchError("the server closed the connection mid-response")
        self._buffer += chunk

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._read_until(b"\r\n")
                return bytes(body)
            body += await self._read_exactly(size)
            await self._read_exactly(2)

    async def _read_to_end(self) -> bytes:
        while chunk := await self._stream.receive_some(65536):
            self._buffer += chunk
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


async def read_metric(url: str, name: str) -> float | None:
    """One sample of condo's Prometheus metric `name` (unlabelled), or None if absent."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_metric_at_least(url: str, name: str, value: float) -> None:
    """Until condo's metric `name` reaches `value` (callers bound the wait)."""
    # Polling on purpose: the gauge lives in another process and only answers when asked.
    while (await read_metric(url, name) or 0) < value:  # noqa: ASYNC110
        await trio.sleep(0.2)


# --- reports -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Bar:
    """A figure against the issue's bar: `value ≤ limit` (at_most) or `value ≥ limit`."""

    label: str
    value: float | None
    limit: float
    unit: str
    at_most: bool = True

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def text(self) -> str:
        sign = "≤" if self.at_most else "≥"
        value = "n/a" if self.value is None else self._with_unit(self.value)
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.label}: {value} (bar {sign} {self._with_unit(self.limit)}) — {verdict}"

    def _with_unit(self, number: float) -> str:
        if self.unit in ("", "x"):
            return f"{number:g}{self.unit}"
        return f"{number:g} {self.unit}"

    def as_json(self) -> dict[str, Scalar]:
        return {
            "label": self.label,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "at_most": self.at_most,
            "met": self.met,
        }


@attrs.frozen(kw_only=True)
class Report:
    bench: str
    title: str
    quick: bool
    machine: Machine
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    figures: Mapping[str, Scalar]
    bars: tuple[Bar, ...]
    notes: tuple[str, ...] = ()

    def table(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        mode = "quick (smoke) run" if self.quick else "full run"
        parts = [
            f"## {self.bench}: {self.title}",
            "",
            f"{self.machine.line()} · {mode}",
            "",
            self.table(),
            "",
            *[f"- {bar.text()}" for bar in self.bars],
        ]
        if self.notes:
            parts += ["", *[f"{note}" for note in self.notes]]
        return "\n".join(parts).rstrip() + "\n"

    def json_line(self, run_id: str) -> str:
        return json.dumps(
            {
                "bench": self.bench,
                "run": run_id,
                "quick": self.quick,
                "machine": self.machine.as_json(),
                "figures": dict(self.figures),
                "bars": [bar.as_json() for bar in self.bars],
                "bars_met": all(bar.met is True for bar in self.bars),
            },
            sort_keys=False,
        )


RESULTS_HEADER = """# condo benchmark results

Written by `python -m bench` (see bench/__main__.py); each benchmark rewrites its own section.
Speed claims are ratios against a baseline measured in the same run on the same machine: these
machines are shared and noisy, absolute times drift. Bars are those of issue 7.
"""


def emit(report: Report, run: Run, order: Sequence[str]) -> None:
    """Print the table, then the one JSON line; rewrite the report's section of the results."""
    print(report.markdown(), flush=True)
    print(report.json_line(run.id), flush=True)
    results = run.options.results
    if results is not None:
        update_results(results, report, order)


_SECTION = re.compile(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->\n", re.DOTALL)


def update_results(path: Path, report: Report, order: Sequence[str]) -> None:
    text = path.read_text() if path.exists() else ""
    sections = {m.group(1): m.group(2) for m in _SECTION.finditer(text)}
    sections[report.bench] = report.markdown()
    names = [name for name in order if name in sections]
    names += sorted(name for name in sections if name not in order)
    body = "\n".join(f"<!-- bench:{n} -->\n{sections[n]}<!-- /bench:{n} -->\n" for n in names)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(RESULTS_HEADER + "\n" + body)
    os.replace(temp, path)

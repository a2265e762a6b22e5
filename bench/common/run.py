"""One invocation of `python -m bench`: its options, id, work folder, engine and machine facts.

Every container any benchmark makes carries the label `condo-bench.run=<id>` (condo's through the
spec's own `Labels`, `docker run`'s and compose's through `--label`/`labels:`), so `Run.sweep`
removes all of them, and the Consul keys the run wrote, whatever failed (bounded, shielded).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import trio

import condo
from bench.common.consul import delete_consul_prefix
from bench.common.engine import DOCKER_SOCKET, RUN_LABEL, Engine
from bench.common.stats import Scalar
from bench.common.wait import BenchError

REPO = Path(__file__).resolve().parents[2]

BUSYBOX = "condo-test/busybox:1"
BUSYBOX_2 = "condo-test/busybox:2"
HEALTHY = "condo-test/healthy:1"
HEALTHY_2 = "condo-test/healthy:2"
IMAGES = (BUSYBOX, BUSYBOX_2, HEALTHY, HEALTHY_2)

CLEANUP_LIMIT = 300.0  # removing a few hundred containers on a busy 2-core engine


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
        return attrs.asdict(self)

    def line(self) -> str:
        return (
            f"{self.date} · {self.cores} cores · Docker Engine {self.engine} (API {self.api}) · "
            f"Linux {self.kernel} · Python {self.python} · condo {self.condo} · "
            f"load {self.load:.2f} at start"
        )


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

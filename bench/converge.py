"""Cold converge: N specs (busybox `sleep`, no healthcheck) written at once → all Stable.

At each N (20, 50, 100; 3 with --quick), in this order, on an engine cleaned in between:
1. the engine's floor: N parallel `docker run -d` of the same image and its own command, timed
   from launching the N CLI processes to the last one returning (the container is running);
2. condo: a fresh `condo run` on an empty folder; the N spec files are written, timed from
   the first write to condo's log line of the last `→ Stable` transition (a container without a
   healthcheck is Stable once it runs, so this is the same end point as `docker run -d`);
3. the peer: `docker-compose up -d` (Debian's 1.29.2) of the same N services, timed like the
   floor. It never pulls: every image is local (checked by the run) and its output is checked
   for "Pulling".
Bar: condo ≤ 1.10 x the floor at every N.
"""

from __future__ import annotations

from pathlib import Path

import trio

from bench.common.baseline import docker_run_parallel, require_tool
from bench.common.condos import CondoSpec, open_condo, stable
from bench.common.engine import RUN_LABEL
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, Run
from bench.common.specs import spec_text, write_spec
from bench.common.wait import BenchError, deadline, wall

SIZES, QUICK_SIZES = (20, 50, 100), (3,)
RATIO_BAR = 1.10
CONVERGE_LIMIT = 300.0


def compose_limit(size: int) -> float:
    return 60.0 + size  # ~0.2 s per service on this machine: five times that is a failure


async def main(run: Run) -> Report:
    compose = require_tool("docker-compose", "docker-compose")
    sizes = QUICK_SIZES if run.quick else SIZES
    rows = []
    figures: dict[str, float | int | str | bool | None] = {}
    bars = []
    notes = [
        "One trial per cell, in the order floor, condo, compose, on an engine emptied of this "
        "run's containers in between. The floor includes the docker CLI's own start-up (N "
        "processes on the same cores), as a user's script would.",
    ]
    for size in sizes:
        floor = await docker_run_parallel(run, size, BUSYBOX, case=f"converge-floor-{size}")
        await run.sweep()
        converged, retries = await _condo(run, size)
        await run.sweep()
        peer: float | None = None
        try:
            peer = await _compose(run, compose, size)
        except BenchError as exc:  # the peer failing is a finding, not the end of the benchmark
            notes.append(f"N={size}: docker-compose failed: {exc}")
        await run.sweep()
        if retries:
            notes.append(
                f"N={size}: condo retried {retries} deploy(s) (the engine failed or timed out)."
            )
        ratio = converged / floor
        peer_ratio = None if peer is None else peer / floor
        rows.append(
            (
                str(size),
                f"{floor:.2f}",
                f"{converged:.2f}",
                "failed" if peer is None else f"{peer:.2f}",
                f"{ratio:.2f}x",
                "-" if peer_ratio is None else f"{peer_ratio:.2f}x",
                f"{converged / size * 1000:.0f}",
            )
        )
        figures |= {
            f"n{size}_floor_s": round(floor, 3),
            f"n{size}_condo_s": round(converged, 3),
            f"n{size}_compose_s": None if peer is None else round(peer, 3),
            f"n{size}_condo_ratio": round(ratio, 3),
            f"n{size}_compose_ratio": None if peer_ratio is None else round(peer_ratio, 3),
            f"n{size}_condo_retries": retries,
        }
        bars.append(
            Bar(
                label=f"condo / floor at N={size}", value=round(ratio, 2), limit=RATIO_BAR, unit="x"
            )
        )
    return Report(
        bench="converge",
        title="cold converge (N specs written at once → all Stable)",
        columns=(
            "N",
            "floor: N x docker run -d (s)",
            "condo (s)",
            "docker-compose up -d (s)",
            "condo / floor",
            "compose / floor",
            "condo ms per service",
        ),
        rows=tuple(rows),
        figures=figures,
        bars=tuple(bars),
        notes=tuple(notes),
    )


async def _condo(run: Run, size: int) -> tuple[float, int]:
    """Seconds from the first spec written to the last → Stable; and how many deploys failed."""
    names = [f"c{i:03d}" for i in range(size)]
    spec = CondoSpec(name=f"converge-{size}", host=run.host(f"converge-{size}"))
    async with open_condo(run, spec) as condo:
        await condo.wait_ready()
        await trio.sleep(0.5)  # let its first scan of the empty folder pass
        text = spec_text(run, BUSYBOX)
        async with condo.window("converge"):
            began = wall()
            for name in names:
                write_spec(condo.specs, name, text)
            with deadline(CONVERGE_LIMIT, f"condo converging {size} services"):
                done = await condo.wait_services(names, stable)
        retries = sum(1 for t in condo.transitions if t.to == "TryAgain")
    return max(t.at for t in done) - began, retries


async def _compose(run: Run, compose: str, size: int) -> float:
    folder = run.folder(f"compose-{size}")
    project = f"bench{run.id}n{size}"
    lines = ['version: "2.4"', "services:"]
    for i in range(size):
        lines += [
            f"  c{i:03d}:",
            f"    image: {BUSYBOX}",
            "    labels:",
            f'      {RUN_LABEL}: "{run.id}"',
        ]
    file = folder / "docker-compose.yml"
    file.write_text("\n".join(lines) + "\n")
    output = folder / "up.log"
    argv = [compose, "--no-ansi", "-p", project, "-f", str(file)]
    try:
        began = wall()
        with output.open("wb") as sink:
            try:
                with deadline(compose_limit(size), f"up of {size} services"):
                    result = await trio.run_process(
                        [*argv, "up", "-d", "--no-build"],
                        stdout=sink,
                        stderr=sink,
                        check=False,
                        cwd=folder,
                    )
            except BenchError as exc:
                raise BenchError(f"{exc}; its output ends: {_tail(output)}") from None
        took = wall() - began
        if result.returncode != 0:
            raise BenchError(f"up exited {result.returncode}: {_tail(output)}")
        if "Pulling" in output.read_text(errors="replace"):
            raise BenchError("it pulled an image: the comparison is void")
        return took
    finally:
        with trio.move_on_after(120, shield=True):
            await trio.run_process(
                [*argv, "down", "-t", "0", "--remove-orphans"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=folder,
            )


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return " / ".join(lines[-3:]) or "(nothing)"

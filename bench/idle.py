"""Idle cost: condo's CPU (percent of one core, split by thread) and RSS with 50, then 200, Stable
services, and the reaction (spec write → first Docker call) with the 200 present, in one run.

One `condo run` (API on, as by default), talking to the engine through a recording proxy (as in
bench.reaction): 50 busybox services are deployed and left alone; after a settling pause condo's
CPU time and RSS are read from /proc/<pid>/stat and /proc/<pid>/status over a 60 s window (RSS
sampled every second; the figure is the window's maximum), and each thread's CPU from
/proc/<pid>/task/*/stat (threads of one kind, e.g. Trio's workers, summed under one name). Then
150 more are added and the same is measured at 200. Last, with the 200 still there, one of them
(an `[:After 0]` service) is rewritten 20 times and condo's reaction is timed as bench.reaction
does. With --quick: 3, then 6 services, 3 s windows, 3 changes.
Bars at 200 services: ≤ 0.5 % CPU, ≤ 100 MB RSS, reaction p50 ≤ 50 ms. The growth per service
between the two sizes is reported too.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import trio

from bench.common.condos import CondoSpec, open_condo, stable
from bench.common.engine import HOST_LABEL, recording_events
from bench.common.proxy import open_unix_proxy
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, Run
from bench.common.specs import spec_text, write_spec
from bench.common.stats import (
    ProcSample,
    cpu_percent,
    main_thread_percent,
    mb,
    ms,
    percentile,
    sample_process,
)
from bench.common.wait import deadline
from bench.reaction import one_change

SIZES, QUICK_SIZES = (50, 200), (3, 6)
WINDOW, QUICK_WINDOW = 60.0, 3.0
SETTLE, QUICK_SETTLE = 10.0, 0.5
CHANGES, QUICK_CHANGES = 20, 3
CPU_BAR, RSS_BAR, REACTION_BAR = 0.5, 100.0, 50.0  # percent of one core, MB, ms
LIMIT = 300.0
REACTING = "i000"  # the service the reaction rewrites (an `[:After 0]` one)


async def main(run: Run) -> Report:
    sizes = QUICK_SIZES if run.quick else SIZES
    window = QUICK_WINDOW if run.quick else WINDOW
    settle = QUICK_SETTLE if run.quick else SETTLE
    changes = QUICK_CHANGES if run.quick else CHANGES
    measured: list[tuple[int, float, float, int]] = []  # services, CPU %, main thread %, RSS
    threads: dict[str, float] = {}  # at the largest size: thread kind → CPU %
    first_call: list[float] = []
    text = spec_text(run, BUSYBOX)

    def reacting(change: int) -> str:
        return spec_text(run, BUSYBOX, deploy="[:After 0]", env=[f"CHANGE={change}"])

    host = run.host("idle")
    async with (
        recording_events(run.engine, {HOST_LABEL: host}) as events,
        open_unix_proxy(run.folder("idle-proxy") / "docker.sock", "/var/run/docker.sock") as proxy,
        open_condo(
            run,
            CondoSpec(
                name="idle", host=host, server=True, extra=("--docker", f"unix://{proxy.address}")
            ),
        ) as condo,
    ):
        await condo.wait_ready()
        for size in sizes:
            names = [f"i{i:03d}" for i in range(size)]
            for name in names:
                if not (condo.specs / f"{name}.edn").exists():
                    write_spec(condo.specs, name, reacting(0) if name == REACTING else text)
            with deadline(LIMIT, f"{size} services Stable"):
                await condo.wait_services(names, stable)
            await trio.sleep(settle)
            async with condo.window(f"n{size}"):
                before, threads_before = sample_process(condo.pid), thread_cpu(condo.pid)
                samples: list[ProcSample] = [before]
                for _ in range(round(window)):
                    await trio.sleep(1.0)
                    samples.append(sample_process(condo.pid))
                threads_after = thread_cpu(condo.pid)
            after = samples[-1]
            measured.append(
                (
                    size,
                    cpu_percent(before, after),
                    main_thread_percent(before, after),
                    max(s.rss for s in samples),
                )
            )
            threads = thread_split(threads_before, threads_after, after.at - before.at)

        # The reaction with every service present, right after the idle windows.
        first = await events.next_after(0, lambda e: e.action == "start" and e.service == REACTING)
        old_id = first.container_id
        async with condo.window("reaction"):
            for change in range(1, changes + 1):
                await trio.sleep(random.uniform(0.05, 0.25))
                timing = await one_change(
                    condo, events, proxy, REACTING, reacting(change), old_id, change
                )
                first_call.append(timing.first_call)
                old_id = timing.container_id

    return _report(window, measured, threads, first_call)


_TRAILING_NUMBER = re.compile(r"[\s_-]*\d+$")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid` now: its kind and its CPU seconds so far. The kind is `main` for the
    main (Trio) thread, else the thread's name without a trailing number (Trio's workers are one
    kind)."""
    ticks = _clock_ticks()
    found: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        kind = "main" if task.name == str(pid) else _TRAILING_NUMBER.sub("", name) or name
        found[int(task.name)] = (kind, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def thread_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], span: float
) -> dict[str, float]:
    """CPU % of one core of each kind of thread between two `thread_cpu` readings. A thread that
    ended meanwhile takes its seconds with it (Trio's idle workers end after 10 s): a lower bound;
    one that started meanwhile counts whole."""
    split: dict[str, float] = {}
    for tid, (kind, seconds) in after.items():
        used = seconds - before[tid][1] if tid in before else seconds
        split[kind] = split.get(kind, 0.0) + used / span * 100
    return split


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _report(
    window: float,
    measured: list[tuple[int, float, float, int]],
    threads: dict[str, float],
    first_call: list[float],
) -> Report:
    (small, cpu_small, _, rss_small), (large, cpu_large, main_large, rss_large) = measured
    per_service_kb = (rss_large - rss_small) / (large - small) / 1000
    p50, p99 = ms(percentile(first_call, 50)), ms(percentile(first_call, 99))
    rows = tuple(
        (str(n), f"{cpu:.2f}", f"{main:.2f}", f"{mb(rss)}") for n, cpu, main, rss in measured
    )
    split = ", ".join(
        f"{kind} {pct:.2f}" for kind, pct in sorted(threads.items(), key=lambda kv: -kv[1])
    )
    return Report(
        bench="idle",
        title=f"idle cost ({window:g} s windows)",
        columns=(
            "Stable services",
            "condo CPU (% of one core)",
            "… of which the main (Trio) thread",
            "condo RSS (MB)",
        ),
        rows=(
            *rows,
            (
                f"growth {small} → {large}",
                f"{cpu_large - cpu_small:+.2f}",
                "",
                f"{mb(rss_large - rss_small):+} ({per_service_kb:.0f} kB per service)",
            ),
        ),
        figures={
            "window_s": window,
            f"n{small}_cpu_pct": round(cpu_small, 3),
            f"n{small}_rss_mb": mb(rss_small),
            f"n{large}_cpu_pct": round(cpu_large, 3),
            f"n{large}_main_thread_cpu_pct": round(main_large, 3),
            f"n{large}_rss_mb": mb(rss_large),
            "rss_kb_per_service": round(per_service_kb, 1),
            f"n{large}_threads_cpu_pct": split,
            "changes": len(first_call),
            f"n{large}_first_call_p50_ms": p50,
            f"n{large}_first_call_p99_ms": p99,
        },
        bars=(
            Bar(
                label=f"CPU at {large} services", value=round(cpu_large, 2), limit=CPU_BAR, unit="%"
            ),
            Bar(label=f"RSS at {large} services", value=mb(rss_large), limit=RSS_BAR, unit="MB"),
            Bar(
                label=f"reaction (spec → first Docker call) p50 at {large} services",
                value=p50,
                limit=REACTION_BAR,
                unit="ms",
            ),
        ),
        notes=(
            f"CPU at {large} services by thread (% of one core): {split}.",
            f"Reaction with {large} services present ({len(first_call)} changes of one "
            f"`[:After 0]` service): first Docker call p50 {p50} ms, p99 {p99} ms.",
        ),
    )

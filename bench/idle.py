"""Idle cost: condo's CPU (percent of one core) and RSS with 50, then 200, Stable services.

One `condo run` (API on, as by default): 50 busybox services are deployed and left alone; after a
settling pause condo's CPU time and RSS are read from /proc/<pid>/stat and /proc/<pid>/status over
a 60 s window (RSS sampled every second; the figure is the window's maximum). Then 150 more are
added and the same is measured at 200. With --quick: 3, then 6 services, 3 s windows.
Bars at 200 services: ≤ 1 % CPU, ≤ 100 MB RSS. The growth per service between the two sizes is
reported too.
"""

from __future__ import annotations

import trio

from bench.common.condos import CondoSpec, open_condo, stable
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, Run
from bench.common.specs import spec_text, write_spec
from bench.common.stats import ProcSample, cpu_percent, main_thread_percent, mb, sample_process
from bench.common.wait import deadline

SIZES, QUICK_SIZES = (50, 200), (3, 6)
WINDOW, QUICK_WINDOW = 60.0, 3.0
SETTLE, QUICK_SETTLE = 10.0, 0.5
CPU_BAR, RSS_BAR = 1.0, 100.0  # percent of one core, MB
LIMIT = 300.0


async def main(run: Run) -> Report:
    sizes = QUICK_SIZES if run.quick else SIZES
    window = QUICK_WINDOW if run.quick else WINDOW
    settle = QUICK_SETTLE if run.quick else SETTLE
    measured: list[tuple[int, float, float, int]] = []  # services, CPU %, main thread %, RSS
    text = spec_text(run, BUSYBOX)
    async with open_condo(run, CondoSpec(name="idle", host=run.host("idle"), server=True)) as condo:
        await condo.wait_ready()
        for size in sizes:
            names = [f"i{i:03d}" for i in range(size)]
            for name in names:
                if not (condo.specs / f"{name}.edn").exists():
                    write_spec(condo.specs, name, text)
            with deadline(LIMIT, f"{size} services Stable"):
                await condo.wait_services(names, stable)
            await trio.sleep(settle)
            async with condo.window(f"n{size}"):
                before = sample_process(condo.pid)
                samples: list[ProcSample] = [before]
                for _ in range(round(window)):
                    await trio.sleep(1.0)
                    samples.append(sample_process(condo.pid))
            after = samples[-1]
            measured.append(
                (
                    size,
                    cpu_percent(before, after),
                    main_thread_percent(before, after),
                    max(s.rss for s in samples),
                )
            )

    (small, cpu_small, _, rss_small), (large, cpu_large, main_large, rss_large) = measured
    per_service_kb = (rss_large - rss_small) / (large - small) / 1000
    rows = tuple(
        (str(n), f"{cpu:.2f}", f"{main:.2f}", f"{mb(rss)}") for n, cpu, main, rss in measured
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
        },
        bars=(
            Bar(
                label=f"CPU at {large} services", value=round(cpu_large, 2), limit=CPU_BAR, unit="%"
            ),
            Bar(label=f"RSS at {large} services", value=mb(rss_large), limit=RSS_BAR, unit="MB"),
        ),
    )

"""Figures: percentiles, units (ms, MB), and a process's CPU and memory read from /proc (Linux).

A figure is a JSON `Scalar`; this module does no I/O but reading /proc.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from bench.common.wait import BenchError

Scalar = float | int | str | bool | None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


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

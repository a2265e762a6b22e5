"""`python -m bench NAME|all [--quick] [--results PATH | --no-results] [--keep] [--profile DIR]`.

Runs the named benchmarks (or all, in `bench.BENCHMARKS` order) in one Trio run: each prints its
table and one JSON line on stdout and rewrites its own section of the results file. The full run
writes bench/RESULTS.md; `--quick` (tiny N, the CI smoke mode) writes no results file unless
`--results` names one, so that smoke runs never overwrite real figures.

A benchmark that fails (cannot measure) is reported on stderr and the others still run; the exit
code is 1 if any failed, 2 on usage errors, 0 otherwise (a missed bar is a figure, not a failure).
`--profile DIR` samples every condo process with py-spy (folded stacks, one file per condo,
named after the benchmark's condo); such a run writes no results unless `--results` is given.
SIGINT/SIGTERM cancel the run; cleanup (processes, containers, Consul keys) still happens.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from bench import BENCHMARKS
from bench.common.report import RESULTS_PATH, Report, emit
from bench.common.run import Options, Run, open_run
from bench.common.wait import BenchError

Main = Callable[[Run], Awaitable[Report]]


def parse_args(argv: list[str]) -> tuple[list[str], Options]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="a benchmark, or all")
    parser.add_argument("--quick", action="store_true", help="tiny N: a smoke run (~1 min)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--results", type=Path, help="the results file to update")
    where.add_argument("--no-results", action="store_true", help="do not write any results")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, specs)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample every condo with py-spy into this folder (figures are then disturbed)",
    )
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    results: Path | None = args.results
    if results is None and not args.no_results and not args.quick:
        results = RESULTS_PATH
    profile: Path | None = args.profile
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        if results == RESULTS_PATH:
            results = None  # a sampled condo is slower: its figures are not results
    return names, Options(quick=args.quick, results=results, keep=args.keep, profile=profile)


async def run_all(names: list[str], options: Options) -> int:
    failed: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
        async with open_run(options) as run:
            for name in names:
                module = importlib.import_module(f"bench.{name}")
                bench_main: Main = module.main
                began = time.monotonic()
                print(f"== {name} ({'quick' if options.quick else 'full'})", flush=True)
                try:
                    report = await bench_main(run)
                except Exception as exc:  # noqa: BLE001  # one benchmark's failure is reported, the others still run
                    failed.append(name)
                    run.failed = True
                    traceback.print_exc(file=sys.stderr)
                    print(f"bench {name} FAILED: {describe(exc)}", file=sys.stderr, flush=True)
                else:
                    emit(report, run, BENCHMARKS)
                finally:
                    # Whatever a benchmark left behind is gone before the next one starts.
                    await run.sweep()
                took = time.monotonic() - began
                print(f"== {name} took {took:.1f} s", file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def describe(exc: BaseException) -> str:
    """The messages of an exception, of every leaf of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, BenchError) else str(exc)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            print(f"bench: {signal.Signals(signum).name}: cleaning up", file=sys.stderr)
            scope.cancel()
            return


def main() -> int:
    names, options = parse_args(sys.argv[1:])
    try:
        return trio.run(run_all, names, options)
    except BenchError as exc:  # the run itself could not start (engine, images)
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        _, others = group.split(BenchError)
        if others is not None:
            raise
        print(f"bench: {describe(group)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`condo run` as real subprocesses (`.venv/bin/python -m condo run`); their JSON logs (stderr)
are parsed into each service's latest transition, with condo's own timestamps.

Invariants:
- Every condo is ended by the context manager that started it (SIGTERM, then SIGKILL), also on
  failure, and its containers removed (by its host label) within bounded, shielded waits.
- Under `--profile`, every condo is sampled by py-spy, and the sampler ends with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import httpx
import trio

from bench.common.engine import HOST_LABEL
from bench.common.run import CLEANUP_LIMIT, REPO, Run
from bench.common.wait import BenchError, Feed, deadline, wall

STOP_LIMIT = 20.0  # SIGTERM → exit of one condo (it persists its state, destroys its session)
READY_LIMIT = 60.0
KILL_LIMIT = 5.0  # SIGKILL → reaped

R = TypeVar("R")


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
            await end_process(sampler, signal.SIGINT)

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
        await end_process(process, signal.SIGTERM)
        if self.profiler is not None:
            # py-spy writes its file once the target is gone: it ends by itself.
            await end_process(self.profiler, None)


async def end_process(process: trio.Process, signum: int | None) -> None:
    """Send `signum` (None: the process ends by itself), wait up to STOP_LIMIT, then SIGKILL and
    reap; shielded and bounded, so that it also runs in cleanup during a cancellation."""
    with trio.move_on_after(STOP_LIMIT, shield=True):
        if signum is not None:
            process.send_signal(signum)
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(KILL_LIMIT, shield=True):
            await process.wait()


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

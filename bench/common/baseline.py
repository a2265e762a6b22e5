"""What condo is measured against, outside condo: the engine's floor (parallel `docker run -d`)
and external tools (docker-compose), run as commands to completion.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import trio

from bench.common.engine import CASE_LABEL, RUN_LABEL
from bench.common.run import Run
from bench.common.wait import BenchError, wall


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

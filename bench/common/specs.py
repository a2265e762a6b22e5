"""The spec files a benchmark writes for condo.

Spec files are written synchronously, atomically (temp file + rename): a thread hop would add its
own latency to the moment a benchmark calls "written".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bench.common.engine import RUN_LABEL
from bench.common.run import Run


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

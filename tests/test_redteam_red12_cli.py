"""Red team of issue 12: `condo wait` leaves with os._exit once its verdict is printed (condo.cli
main). Its exit code must stay the verdict's, without a traceback, when its output cannot be
written: a reader that went away (`condo wait ... | head -c0`), or no stdout at all (`>&-`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cli_support import stand_in_condo

WAIT = [sys.executable, "-m", "condo", "wait", "--name", "web", "--image", "web:2"]


@pytest.mark.parametrize("stdout", ["reader gone", "closed"])
def test_condo_wait_keeps_its_verdict_when_its_output_cannot_be_written(stdout: str) -> None:
    with stand_in_condo() as url:
        argv = [*WAIT, "--url", url, "--timeout", "5"]
        if stdout == "closed":
            done = subprocess.run(
                ["sh", "-c", 'exec "$@" >&-', "sh", *argv],
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                check=False,
            )
        else:
            read, write = os.pipe()
            os.close(read)  # the reader went away before the verdict
            try:
                done = subprocess.run(
                    argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=30, check=False
                )
            finally:
                os.close(write)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0

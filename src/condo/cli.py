"""The `condo` command line: cyclopts turns argv and `CONDO_*` env vars into calls.

Owns: building the cyclopts App (`build_app`, a fresh one per call: no module-level app) and the
console-script entry point `main`. Each command is a thin function that hands its arguments to
the module that does the work and returns the exit code; logic stays out of this module, except
`validate_files`, which is small and only ever used here.

Exit codes: 0 success, 1 the command's own failure (e.g. an invalid spec), 2 usage errors
(cyclopts reports those itself).
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TextIO

from cyclopts import App, Parameter
from cyclopts.config import Env

import condo
from condo.errors import SpecError
from condo.spec import MAX_SPEC_BYTES, parse_self_spec, parse_spec

SELF_SPEC_NAME = "self.edn"


def build_app() -> App:
    """The whole CLI; every option is also read from `CONDO_<OPTION>` (without the command)."""
    app = App(
        name="condo",
        help="A simple, idempotent supervisor for Docker containers.",
        version=condo.__version__,
        backend="trio",
        config=Env(prefix="CONDO_", command=False),
    )
    app.command(validate)
    return app


def main() -> None:
    """Console-script entry point (`condo = "condo.cli:main"`); exits with the command's code."""
    build_app()()


# --- validate -------------------------------------------------------------------------------------


def validate(files: Annotated[list[str], Parameter(negative=())], /) -> int:
    """Check spec files without running anything.

    Prints "FILE: ok" for each valid file and "FILE:LINE: message" on stderr for each invalid
    one. A file named self.edn is checked as condo's own bare container spec. Exit code 0 when
    every file is valid, else 1.

    Parameters
    ----------
    files
        Spec files (*.edn) to check.
    """
    return validate_files(files, sys.stdout, sys.stderr)


def validate_files(files: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Check each file, report on `out` / `err` (naming files as given); 0 when all are valid."""
    failed = False
    for file in files:
        problem = check_file(file)
        if problem is None:
            print(f"{file}: ok", file=out)
        else:
            failed = True
            print(problem, file=err)
    return 1 if failed else 0


def check_file(file: str) -> SpecError | None:
    """None when `file` holds a valid spec (self.edn: a valid self spec), else the problem."""
    path = Path(file)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            return SpecError(file, "is a directory, not a spec file")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            return SpecError(file, "is not a regular file")
        with path.open("rb") as handle:
            # One byte more than allowed is enough for parse_spec to say "too large".
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:  # missing, unreadable, ...: this file is bad, the others still count
        return SpecError(file, f"cannot read the file: {exc.strerror or exc}")
    try:
        if path.name == SELF_SPEC_NAME:
            parse_self_spec(data, file)
        else:
            parse_spec(data, file)
    except SpecError as exc:
        return exc
    return None

"""A benchmark's report: its table, its bars, the one JSON line on stdout, and its own section of
bench/RESULTS.md (machine, engine version, date), which `update_results` rewrites in place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from bench.common.run import REPO, Run
from bench.common.stats import Scalar

RESULTS_PATH = REPO / "bench" / "RESULTS.md"


@attrs.frozen(kw_only=True)
class Bar:
    """A figure against the issue's bar: `value ≤ limit` (at_most) or `value ≥ limit`."""

    label: str
    value: float | None
    limit: float
    unit: str
    at_most: bool = True

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def text(self) -> str:
        sign = "≤" if self.at_most else "≥"
        value = "n/a" if self.value is None else self._with_unit(self.value)
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.label}: {value} (bar {sign} {self._with_unit(self.limit)}) — {verdict}"

    def _with_unit(self, number: float) -> str:
        if self.unit in ("", "x"):
            return f"{number:g}{self.unit}"
        return f"{number:g} {self.unit}"

    def as_json(self) -> dict[str, Scalar]:
        return {**attrs.asdict(self), "met": self.met}


@attrs.frozen(kw_only=True)
class Report:
    """What one benchmark measured; where and how it ran (machine, quick, run id) is the Run's."""

    bench: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    figures: Mapping[str, Scalar]
    bars: tuple[Bar, ...]
    notes: tuple[str, ...] = ()

    def table(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def markdown(self, run: Run) -> str:
        mode = "quick (smoke) run" if run.quick else "full run"
        parts = [
            f"## {self.bench}: {self.title}",
            "",
            f"{run.machine.line()} · {mode}",
            "",
            self.table(),
            "",
            *[f"- {bar.text()}" for bar in self.bars],
        ]
        if self.notes:
            parts += ["", *[f"{note}" for note in self.notes]]
        return "\n".join(parts).rstrip() + "\n"

    def json_line(self, run: Run) -> str:
        return json.dumps(
            {
                "bench": self.bench,
                "run": run.id,
                "quick": run.quick,
                "machine": run.machine.as_json(),
                "figures": dict(self.figures),
                "bars": [bar.as_json() for bar in self.bars],
                "bars_met": all(bar.met is True for bar in self.bars),
            },
            sort_keys=False,
        )


RESULTS_HEADER = """# condo benchmark results

Written by `python -m bench` (see bench/__main__.py); each benchmark rewrites its own section.
Speed claims are ratios against a baseline measured in the same run on the same machine: these
machines are shared and noisy, absolute times drift. Bars are those of issue 7.
"""


def emit(report: Report, run: Run, order: Sequence[str]) -> None:
    """Print the table, then the one JSON line; rewrite the report's section of the results."""
    section = report.markdown(run)
    print(section, flush=True)
    print(report.json_line(run), flush=True)
    results = run.options.results
    if results is not None:
        update_results(results, report.bench, section, order)


_SECTION = re.compile(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->\n", re.DOTALL)


def update_results(path: Path, bench: str, section: str, order: Sequence[str]) -> None:
    """Put `section` as `bench`'s in the results file, the others kept, all in `order`."""
    text = path.read_text() if path.exists() else ""
    sections = {m.group(1): m.group(2) for m in _SECTION.finditer(text)}
    sections[bench] = section
    names = [name for name in order if name in sections]
    names += sorted(name for name in sections if name not in order)
    body = "\n".join(f"<!-- bench:{n} -->\n{sections[n]}<!-- /bench:{n} -->\n" for n in names)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(RESULTS_HEADER + "\n" + body)
    os.replace(temp, path)

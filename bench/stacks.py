"""`python -m bench.stacks FILE.folded [--top N]`: where a profiled condo spent its time.

Reads the folded stacks `python -m bench NAME --profile DIR` makes (py-spy's raw format: one
`frame;frame;…;leaf COUNT` line per distinct stack, frames as `function (file:line)`) and prints
the busiest functions by self time (the leaf) and by inclusive time (anywhere on the stack),
condo's own frames marked `*`. py-spy leaves idle samples out unless told `--idle`; leaves that
are the event loop waiting are set apart anyway. The profile covers condo's whole life, start-up
(imports) included: read it next to what the benchmark measured.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# Leaves that mean "the event loop is waiting": not CPU spent on anything.
IDLE_LEAVES = ("get_events (trio/", "_epoll_wait", "select (selectors", "poll (selectors")
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def function_of(frame: str) -> str:
    """`run (trio/_core/_run.py:2532)` → `run (trio/_core/_run.py)`: one entry per function."""
    match = _FRAME.match(frame)
    return f"{match.group(1)} ({match.group(2)})" if match else frame


def summarize(text: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        frames, count = match.group(1).split(";"), int(match.group(2))
        total += count
        if any(marker in frames[-1] for marker in IDLE_LEAVES):
            idle += count
            continue
        own[function_of(frames[-1])] += count
        for function in {function_of(frame) for frame in frames}:
            inclusive[function] += count
    if total == 0:
        return "no samples"
    busy = total - idle
    lines = [
        f"{total} samples: {idle / total:.0%} idle (waiting for I/O), {busy / total:.0%} busy",
        "",
        f"self time (share of busy samples), top {top}:",
    ]
    lines += [_entry(function, count, busy) for function, count in own.most_common(top)]
    lines += ["", f"inclusive time (share of busy samples), top {top} below the event loop:"]
    skipped = ("<module>", "_run_module_as_main", "_run_code", "main (", "__call__ (cyclopts")
    ranked = [(f, c) for f, c in inclusive.most_common() if not f.startswith(skipped)]
    lines += [_entry(function, count, busy) for function, count in ranked[:top]]
    return "\n".join(lines)


def _entry(function: str, count: int, busy: int) -> str:
    mark = "*" if "condo/" in function else " "
    return f" {mark} {count / busy:6.1%}  {function}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stacks", description=__doc__)
    parser.add_argument("file", type=Path, help="a .folded file from --profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.file.read_text(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

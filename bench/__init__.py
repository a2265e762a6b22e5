"""condo's benchmarks (`python -m bench NAME|all [--quick]`): ratios against same-run baselines.

`BENCHMARKS` is the canonical order: `all` runs them in it, and bench/RESULTS.md lists their
sections in it. Each name is a module of this package with `async def main(run) -> Report`.
"""

BENCHMARKS = ("reaction", "converge", "rolling", "idle", "api", "multihost", "proxy")

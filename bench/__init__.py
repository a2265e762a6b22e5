"""condo's benchmarks (`python -m bench NAME`): ratios against same-run baselines."""

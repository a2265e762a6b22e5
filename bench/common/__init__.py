"""What every benchmark shares, one concern a module; nothing is re-exported here, so an import
says where a name lives.

- `run`: one `python -m bench` invocation (options, work folder, machine facts, the sweep).
- `engine`: the Docker engine, only to observe (`/events`) and clean up; the labels.
- `condos`: `condo run` as real subprocesses, and what their JSON logs say.
- `specs`: the spec files a benchmark writes.
- `baseline`: what condo is measured against (parallel `docker run`, docker-compose).
- `consul`: the shared Consul agent (is it up; removing a run's keys).
- `proxy`: recording proxies that timestamp every HTTP request condo sends upstream.
- `rawhttp`: a keep-alive HTTP/1.1 client on raw sockets; condo's metrics by name.
- `stats`: percentiles, units, a process's CPU and memory from /proc.
- `wait`: bounded waits (`deadline`, `BenchError`), `Feed`, the wall clock.
- `report`: the table, the JSON line, the benchmark's section of bench/RESULTS.md.

Invariants (every module keeps them):
- Every time is wall-clock unix seconds (the engine's event times, condo's log timestamps and our
  own share the machine's clock), so they can be subtracted from each other.
- Every process a benchmark starts is ended by the context manager that started it (SIGTERM,
  then SIGKILL), and every wait is bounded (`deadline`), also in cleanup (shielded).
"""

"""Multi-host: 20 `condo run` processes (`--host h1..h20`, 20 services each, `--expose consul`)
on one engine and the real Consul agent; one image update on every host.

All the condos share one Consul prefix unique to this run, and reach Consul through a recording
proxy (bench.common.proxy.open_tcp_proxy), which counts the writes they cause (PUT/DELETE: KV
writes, session create/renew/destroy). h1 serves the API. The 400 services are deployed host by host
(one engine stands in for 20: all at once, it times out starts, which no real fleet's engines
would). Once all are Stable and Consul shows it (h1's `/v1/wait_for` for the old image
answers), a long-poll `/v1/wait_for?name=m00&image=<new image>` is held on h1, and `m00.edn` is
rewritten on every host at once.

Measured: from the rewrite to the last host's `→ Stable` log line (the rollout), and from that
line to the long-poll's answer and to the exit of a `condo wait` (the bar: ≤ 100 ms); the
Consul write rate at rest (before the update) and during the rollout. A direct probe of the
agent tells a rollout during which Consul itself was paused (another test SIGSTOPs it): such an
attempt is repeated (up to 3), and reported VOID if all were hit.
With --quick: 3 hosts x 3 services.
"""

from __future__ import annotations

import contextlib
import functools
import urllib.parse
from collections.abc import AsyncIterator, Mapping

import attrs
import httpx
import trio

from bench.common.condos import Condo, CondoSpec, Transition, condo_python, open_condos, stable
from bench.common.consul import CONSUL_HOST, CONSUL_PORT, consul_answers
from bench.common.proxy import ProxiedRequest, RecordingProxy, open_tcp_proxy
from bench.common.rawhttp import HttpConnection, wait_metric_at_least
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, BUSYBOX_2, Run
from bench.common.specs import spec_text, write_spec
from bench.common.stats import ms
from bench.common.wait import BenchError, deadline, wall

HOSTS, QUICK_HOSTS = 20, 3
SERVICES, QUICK_SERVICES = 20, 3
REST_WINDOW, QUICK_REST_WINDOW = 10.0, 2.0
ANSWER_BAR = 100.0  # ms after the last host's → Stable
LIMIT = 600.0
TARGET = "m00"
ATTEMPTS = 3
SETTLE = 2.0  # seconds after the answer that still count as the rollout's writes
# A direct Consul probe slower than this means the agent itself was paused (another test
# SIGSTOPs it for 10 s), not merely slowed by a busy machine.
STALL = 2.0
PROBE_INTERVAL = 0.2
CONSUL_WAIT = 40.0
PROBE_LIMIT = 30.0


async def main(run: Run) -> Report:
    hosts = QUICK_HOSTS if run.quick else HOSTS
    size = QUICK_SERVICES if run.quick else SERVICES
    rest_window = QUICK_REST_WINDOW if run.quick else REST_WINDOW
    with trio.move_on_after(CONSUL_WAIT):
        # Another test may have paused the agent for a few seconds: wait it out, bounded.
        while not await consul_answers():  # noqa: ASYNC110  # Consul is another process
            await trio.sleep(1.0)
    if not await consul_answers():
        raise BenchError(f"Consul does not answer on {CONSUL_HOST}:{CONSUL_PORT}")
    prefix = run.consul_prefix("multihost")
    names = [f"m{i:02d}" for i in range(size)]
    async with (
        _watching_consul() as stalls,
        open_tcp_proxy(CONSUL_HOST, CONSUL_PORT) as consul,
    ):
        common = ("--expose", "consul", "--consul-prefix", prefix)
        specs = [
            CondoSpec(
                name=f"h{i}",
                host=run.host(f"h{i}"),
                server=i == 1,
                extra=(*common, "--consul-endpoint", f"http://{consul.address}"),
                # Under --profile, only the API host and the last one: 20 samplers would
                # starve the machine.
                profile=i in (1, hosts),
            )
            for i in range(1, hosts + 1)
        ]
        async with open_condos(run, specs) as condos:
            api = condos[0]
            with deadline(120, f"{hosts} condos ready"):
                async with trio.open_nursery() as nursery:
                    for one in condos:
                        nursery.start_soon(one.wait_ready)
            assert api.url is not None
            began = wall()
            text = spec_text(run, BUSYBOX, deploy="[:After 0]")
            first: dict[tuple[str, str], Transition] = {}
            with deadline(LIMIT, f"{hosts * size} services Stable"):
                # Host by host: 20 real hosts have 20 engines; this one engine, asked for 400
                # containers at once, times out starts (a stampede no real fleet makes).
                for one in condos:
                    for name in names:
                        write_spec(one.specs, name, text)
                    first |= await _all_stable([one], names, {})
                old = {key: t.container for key, t in first.items()}
                converged = wall() - began
                await _wait_for(api.url, TARGET, BUSYBOX)
            converge_stall = stalls.worst(began, wall())

            await trio.sleep(1.0 if run.quick else 2.0)
            rest_began, rest_mark = wall(), len(consul.requests.items)
            await trio.sleep(rest_window)
            at_rest = _writes(consul.requests.items[rest_mark:])
            rest_rate = len(at_rest) / (wall() - rest_began)

            attempts: list[_Rollout] = []
            for attempt in range(ATTEMPTS):
                image = (BUSYBOX_2, BUSYBOX)[attempt % 2]
                async with api.window(f"rollout{attempt + 1}"):
                    rollout = await _rollout(run, condos, api.url, image, old, consul)
                old = rollout.containers
                rollout = attrs.evolve(
                    rollout, stall=stalls.worst(rollout.updated - 1, rollout.settled)
                )
                attempts.append(rollout)
                if rollout.stall < STALL:
                    break
                await trio.sleep(5.0)  # someone else paused Consul: give it time

    rollout = attempts[-1]
    answer_delay = ms(rollout.answered - rollout.last_stable)
    wait_delay = ms(rollout.waited - rollout.last_stable)
    published = rollout.published
    publish_delay = None if published is None else ms(published - rollout.last_stable)
    writes = rollout.writes
    kv = sum(1 for r in writes if "/v1/kv/" in r.target)
    window = rollout.settled - rollout.updated
    notes = [
        "A write is a PUT or DELETE condo sent to Consul (KV writes, session create, renew, "
        "destroy), counted by a proxy between the condos and the agent; the rollout's window "
        f"runs from the rewrite to {SETTLE:g} s after the answer.",
    ]
    if converge_stall >= STALL:
        notes.append(
            f"The Consul agent stalled for {converge_stall:.1f} s during the converge (another "
            "test on the machine pauses it): the converge time is not condo's alone."
        )
    if rollout.stall >= STALL:
        notes.append(
            f"VOID: the Consul agent itself stalled for {rollout.stall:.1f} s during every one "
            f"of the {ATTEMPTS} attempts (another test on the machine pauses it)."
        )
    if len(attempts) > 1:
        notes.append(
            f"{len(attempts) - 1} attempt(s) discarded: the Consul agent itself stalled "
            "(another test on the machine pauses it), measured by a direct probe."
        )
    return Report(
        bench="multihost",
        title=f"{hosts} hosts x {size} services, one Consul",
        columns=("measure", "value"),
        rows=(
            (f"converge, host by host: {hosts * size} specs → all Stable", f"{converged:.1f} s"),
            (
                f"rollout of {TARGET}: specs rewritten → last host Stable",
                f"{rollout.last_stable - rollout.updated:.2f} s",
            ),
            ("last host Stable → /v1/wait_for answered (on h1)", f"{answer_delay} ms"),
            (
                "… of which: that host's Consul write reached the agent (proxy)",
                f"{publish_delay} ms",
            ),
            ("last host Stable → `condo wait` exited 0 (asking h1)", f"{wait_delay} ms"),
            (f"Consul writes at rest ({rest_window:g} s)", f"{rest_rate:.1f} /s ({len(at_rest)})"),
            (
                f"Consul writes during the rollout ({window:.1f} s)",
                f"{len(writes) / window:.1f} /s ({len(writes)}, {kv} KV)",
            ),
            ("Consul writes per host at rest", f"{rest_rate / hosts:.2f} /s"),
        ),
        figures={
            "hosts": hosts,
            "services_per_host": size,
            "converge_s": round(converged, 2),
            "rollout_s": round(rollout.last_stable - rollout.updated, 3),
            "answer_after_last_stable_ms": answer_delay,
            "condo_wait_after_last_stable_ms": wait_delay,
            "publish_after_last_stable_ms": publish_delay,
            "consul_writes_rest_per_s": round(rest_rate, 2),
            "consul_writes_rollout_per_s": round(len(writes) / window, 2),
            "consul_writes_rollout": len(writes),
            "discarded_attempts": len(attempts) - 1,
            "consul_stall_rollout_s": round(rollout.stall, 2),
            "consul_stall_converge_s": round(converge_stall, 2),
        },
        bars=(
            Bar(
                label="condo wait exits after the last host Stable",
                value=wait_delay,
                limit=ANSWER_BAR,
                unit="ms",
            ),
            Bar(
                label="/v1/wait_for answers after the last host Stable",
                value=answer_delay,
                limit=ANSWER_BAR,
                unit="ms",
            ),
        ),
        notes=tuple(notes),
    )


@attrs.frozen(kw_only=True)
class _Rollout:
    updated: float  # the spec files were rewritten
    answered: float  # the long-poll's answer arrived
    waited: float  # `condo wait` exited
    published: float | None  # the last host's write of TARGET's new state reached Consul
    last_stable: float  # condo's log line of the last host's → Stable
    settled: float  # end of the window in which writes are counted
    writes: list[ProxiedRequest]
    containers: dict[tuple[str, str], str | None]  # the new containers, per (host, service)
    stall: float = 0.0  # the longest Consul probe overlapping the rollout, seconds


async def _rollout(
    run: Run,
    condos: list[Condo],
    url: str,
    image: str,
    old: Mapping[tuple[str, str], str | None],
    consul: RecordingProxy,
) -> _Rollout:
    """Hold a long-poll for TARGET on `image` and a `condo wait` for it, rewrite TARGET on every
    host, time both answers."""
    query = urllib.parse.urlencode({"name": TARGET, "image": image, "timeout": "600"})
    argv = [condo_python(), "-m", "condo", "wait", "--name", TARGET, "--image", image]
    argv += ["--url", url, "--timeout", "600"]
    waited: list[float] = []
    connection = await HttpConnection.open(url)
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            )
            nursery.start_soon(_exited, process, waited)
            await connection.send_get(f"/v1/wait_for?{query}")
            with deadline(60, "the long-poll and condo wait held"):
                # condo's own gauge is the only witness of "held"
                await wait_metric_at_least(url, "condo_web_open_waits", 2)
            mark = len(consul.requests.items)
            text = spec_text(run, image, deploy="[:After 0]")
            updated = wall()
            for one in condos:
                write_spec(one.specs, TARGET, text)
            with deadline(LIMIT, "the update answered"):
                status, body = await connection.read_response()
                answered = wall()
                await process.wait()
    finally:
        await connection.aclose()
    if status != 200 or b'"ok"' not in body:
        raise BenchError(f"/v1/wait_for answered {status}: {body[:300]!r}")
    if process.returncode != 0:
        raise BenchError(f"condo wait exited {process.returncode}")
    with deadline(LIMIT, "every host Stable on the new image"):
        done = await _all_stable(condos, [TARGET], old)
    await trio.sleep(SETTLE)
    (last_host, _), last = max(done.items(), key=lambda item: item[1].at)
    published = next(
        (
            r.at
            for r in consul.requests.items[mark:]
            if r.method == "PUT" and f"/{TARGET}/{last_host}" in r.target and r.at >= last.at
        ),
        None,
    )
    return _Rollout(
        published=published,
        updated=updated,
        answered=answered,
        waited=waited[0],
        last_stable=max(t.at for t in done.values()),
        settled=answered + SETTLE,
        writes=_writes([r for r in consul.requests.items[mark:] if r.at <= answered + SETTLE]),
        containers={key: t.container for key, t in done.items()},
    )


async def _exited(process: trio.Process, when: list[float]) -> None:
    await process.wait()
    when.append(wall())


class _Stalls:
    """Direct probes of the Consul agent (not through the proxy): (sent, took) pairs."""

    def __init__(self) -> None:
        self.probes: list[tuple[float, float]] = []

    def worst(self, start: float, end: float) -> float:
        return max(
            (took for sent, took in self.probes if sent <= end and sent + took >= start),
            default=0.0,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://{CONSUL_HOST}:{CONSUL_PORT}", timeout=PROBE_LIMIT
        ) as client:
            task_status.started()
            while True:
                sent = wall()
                with contextlib.suppress(httpx.HTTPError):  # a timeout is the stall itself
                    await client.get("/v1/status/leader")
                self.probes.append((sent, wall() - sent))
                await trio.sleep(PROBE_INTERVAL)


@contextlib.asynccontextmanager
async def _watching_consul() -> AsyncIterator[_Stalls]:
    stalls = _Stalls()
    async with trio.open_nursery() as nursery:
        await nursery.start(stalls.run)
        try:
            yield stalls
        finally:
            nursery.cancel_scope.cancel()


def _writes(requests: list[ProxiedRequest]) -> list[ProxiedRequest]:
    return [r for r in requests if r.method in ("PUT", "DELETE")]


async def _all_stable(
    condos: list[Condo], names: list[str], old: Mapping[tuple[str, str], str | None]
) -> dict[tuple[str, str], Transition]:
    """Wait until every condo has every service Stable on a container not in `old`."""
    found: dict[tuple[str, str], Transition] = {}

    async def one(condo: Condo) -> None:
        done = await condo.wait_services(
            names,
            lambda t: stable(t) and t.container != old.get((condo.host, t.service)),
        )
        for transition in done:
            found[(condo.host, transition.service)] = transition

    async with trio.open_nursery() as nursery:
        for condo in condos:
            nursery.start_soon(one, condo)
    return found


async def _wait_for(url: str, name: str, image: str) -> None:
    connection = await HttpConnection.open(url)
    try:
        query = urllib.parse.urlencode({"name": name, "image": image, "timeout": "300"})
        status, body = await connection.get(f"/v1/wait_for?{query}")
    finally:
        await connection.aclose()
    if status != 200:
        raise BenchError(f"/v1/wait_for {name} {image} answered {status}: {body[:300]!r}")

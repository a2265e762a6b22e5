"""Reaction latency: a spec file is rewritten → condo's first Docker call for it → the new
container's `start` event. 50 changes (5 with --quick), p50/p99.

Setup: one service (busybox `sleep`, no healthcheck, `[:After 0]`, so the first call acting on a
change is about the new container, never a stop of the old one). condo talks to the engine
through a recording proxy (bench.common.proxy.open_unix_proxy): the first request after the
rename is "the first Docker call" (an image probe, then `create`). The `create` and `start`
times come from the engine's own `/events` stream, read directly (not through the proxy).

Baseline in the same run: the engine's own floor for the same container, a direct API
`create` + `start` from this process, timed from the create request to the `start` event; one
sample after every fifth change (interleaved: the machine is shared and its load drifts).
Changes are spaced by a random 50-250 ms after the previous one settled (old container removed),
so they never phase-lock with condo's 1 s rescan.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
import trio

from bench.common.condos import Condo, CondoSpec, Transition, open_condo, stable
from bench.common.engine import CASE_LABEL, HOST_LABEL, RUN_LABEL, EngineEvent, recording_events
from bench.common.proxy import RecordingProxy, open_unix_proxy
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, Run
from bench.common.specs import spec_text, write_spec
from bench.common.stats import ms, percentile
from bench.common.wait import BenchError, Feed, deadline, wall

SERVICE = "react"
CHANGES, QUICK_CHANGES = 50, 5
FLOOR_SAMPLES, QUICK_FLOOR_SAMPLES = 10, 2
CHANGE_LIMIT = 60.0
P50_BAR, P99_BAR = 50.0, 250.0  # ms, spec written → first Docker call


async def main(run: Run) -> Report:
    changes = QUICK_CHANGES if run.quick else CHANGES
    host = run.host("reaction")
    folder = run.folder("reaction")
    first_call: list[float] = []
    create: list[float] = []
    start: list[float] = []
    engine_part: list[float] = []  # create request (through the proxy) → start event

    def spec(change: int) -> str:
        return spec_text(run, BUSYBOX, deploy="[:After 0]", env=[f"CHANGE={change}"])

    floor: list[float] = []
    floor_every = max(1, changes // (QUICK_FLOOR_SAMPLES if run.quick else FLOOR_SAMPLES))
    async with (
        recording_events(run.engine, {CASE_LABEL: floor_case(run)}) as floor_events,
        recording_events(run.engine, {HOST_LABEL: host}) as events,
        open_unix_proxy(folder / "docker.sock", "/var/run/docker.sock") as proxy,
        open_condo(
            run,
            CondoSpec(name="reaction", host=host, extra=("--docker", f"unix://{proxy.address}")),
        ) as condo,
    ):
        await condo.wait_ready()
        write_spec(condo.specs, SERVICE, spec(0))
        with deadline(CHANGE_LIMIT, "the first deploy"):
            await condo.wait_services([SERVICE], stable)
            first = await events.next_after(0, _is("start"))
        old_id = first.container_id

        for change in range(1, changes + 1):
            await trio.sleep(random.uniform(0.05, 0.25))
            timing = await one_change(condo, events, proxy, SERVICE, spec(change), old_id, change)
            first_call.append(timing.first_call)
            create.append(timing.create)
            start.append(timing.start)
            engine_part.append(timing.engine_part)
            old_id = timing.container_id
            if change % floor_every == 0:
                # Interleaved, so that the floor sees the same (shared, noisy) machine.
                floor.append(await _floor_sample(run, floor_events))

    return _report(run, changes, first_call, create, start, engine_part, floor)


@attrs.frozen(kw_only=True)
class ChangeTiming:
    """One spec change, in seconds from the spec file's rename."""

    first_call: float  # condo's first Docker call (through the proxy)
    create: float  # the engine's `create` event
    start: float  # the engine's `start` event
    engine_part: float  # the create request (through the proxy) → the `start` event
    container_id: str  # the new container


async def one_change(
    condo: Condo,
    events: Feed[EngineEvent],
    proxy: RecordingProxy,
    service: str,
    text: str,
    old_id: str,
    label: object,
) -> ChangeTiming:
    """Rewrite `service`'s spec (an `[:After 0]` one) with `text` and time condo's reaction, until
    the new container is Stable and `old_id` destroyed."""
    events_mark, proxy_mark = len(events.items), len(proxy.requests.items)
    write_spec(condo.specs, service, text)
    written = wall()
    with deadline(CHANGE_LIMIT, f"change {label}"):
        created = await events.next_after(events_mark, _is("create"))
        started = await events.next_after(events_mark, _is("start", created.container_id))
        await condo.wait_services([service], _stable_on(created.name))
        await events.next_after(events_mark, _is("destroy", old_id))
    requests = proxy.requests.items[proxy_mark:]
    create_call = next((r for r in requests if "/containers/create" in r.target), None)
    if not requests or create_call is None:
        raise BenchError(f"change {label}: the proxy saw no create request")
    return ChangeTiming(
        first_call=requests[0].at - written,
        create=created.at - written,
        start=started.at - written,
        engine_part=started.at - create_call.at,
        container_id=created.container_id,
    )


def _is(action: str, container_id: str | None = None) -> Callable[[EngineEvent], bool]:
    def match(event: EngineEvent) -> bool:
        return event.action == action and container_id in (None, event.container_id)

    return match


def _stable_on(container: str) -> Callable[[Transition], bool]:
    return lambda t: stable(t) and t.container == container


def floor_case(run: Run) -> str:
    return f"reaction-floor-{run.id}"


async def _floor_sample(run: Run, events: Feed[EngineEvent]) -> float:
    """Direct API create + start of the same image: create request → `start` event."""
    case = floor_case(run)
    mark = len(events.items)
    body = {"Image": BUSYBOX, "Labels": {RUN_LABEL: run.id, CASE_LABEL: case}}
    cid, sent = await run.engine.create_and_start(body)
    with deadline(30, "the floor container's start event"):
        started = await events.next_after(mark, _is("start", cid))
    await run.engine.remove_labelled({CASE_LABEL: case})
    return started.at - sent


def _row(label: str, values: list[float]) -> tuple[str, ...]:
    return (
        label,
        f"{ms(percentile(values, 50))}",
        f"{ms(percentile(values, 99))}",
        f"{ms(max(values))}",
    )


def _report(
    run: Run,
    changes: int,
    first_call: list[float],
    create: list[float],
    start: list[float],
    engine_part: list[float],
    floor: list[float],
) -> Report:
    p50_first, p99_first = ms(percentile(first_call, 50)), ms(percentile(first_call, 99))
    p50_start, floor_p50 = percentile(start, 50), percentile(floor, 50)
    condo_part = [s - e for s, e in zip(start, engine_part, strict=True)]
    return Report(
        bench="reaction",
        title="reaction latency (spec file written → Docker)",
        columns=("from the spec file's rename to …", "p50 ms", "p99 ms", "max ms"),
        rows=(
            _row("condo's first Docker call (proxy)", first_call),
            _row("the engine's `create` event", create),
            _row("the engine's `start` event", start),
            _row("… of which condo (to its create request)", condo_part),
            _row("… of which the engine (create request → start)", engine_part),
            _row("floor: direct API create request → `start` event", floor),
        ),
        figures={
            "changes": changes,
            "first_call_p50_ms": p50_first,
            "first_call_p99_ms": p99_first,
            "create_p50_ms": ms(percentile(create, 50)),
            "create_p99_ms": ms(percentile(create, 99)),
            "start_p50_ms": ms(p50_start),
            "start_p99_ms": ms(percentile(start, 99)),
            "floor_start_p50_ms": ms(floor_p50),
            "start_vs_floor_ratio": round(p50_start / floor_p50, 2),
        },
        bars=(
            Bar(label="first Docker call p50", value=p50_first, limit=P50_BAR, unit="ms"),
            Bar(label="first Docker call p99", value=p99_first, limit=P99_BAR, unit="ms"),
        ),
        notes=(
            f"{changes} changes of one service (`[:After 0]`, busybox, no healthcheck). "
            f"Spec → start p50 is {p50_start / floor_p50:.2f}x the engine's own create → start "
            "(floor). The original condo polls: 0.5-1.5 s.",
        ),
    )

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

Then the same changes under API load (issue 12: supervision never waits on the API), each load
from a process of its own (bench.common.apiload), in the same run: rounds of 10,000 long-polls
(100 with --quick) held on a second service, a few changes meanwhile, then that service changes
and one change is written the moment its → Stable line arrives (condo answering every
long-poll); then 20 changes (3) while 8 clients saturate `/v1/state`. Bars: p50 ≤ 2x and
p99 ≤ 4x the idle figures, every long-poll answered ok (every change deploys, or it fails).
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Awaitable, Callable

import attrs
import trio

from bench.common.apiload import open_load
from bench.common.condos import Condo, CondoSpec, Transition, open_condo, stable
from bench.common.engine import CASE_LABEL, HOST_LABEL, RUN_LABEL, EngineEvent, recording_events
from bench.common.proxy import RecordingProxy, open_unix_proxy
from bench.common.rawhttp import wait_metric_at_least
from bench.common.report import Bar, Report
from bench.common.run import BUSYBOX, BUSYBOX_2, Run, raise_open_files_limit
from bench.common.specs import spec_text, write_spec
from bench.common.stats import ms, percentile
from bench.common.wait import BenchError, Feed, deadline, wall

SERVICE = "react"
CHANGES, QUICK_CHANGES = 50, 5
FLOOR_SAMPLES, QUICK_FLOOR_SAMPLES = 10, 2
CHANGE_LIMIT = 60.0
P50_BAR, P99_BAR = 50.0, 250.0  # ms, spec written → first Docker call
# Under API load (issue 12, bar 2): the first Docker call's p50 and p99 against idle's.
POLLED = "polled"  # the service the long-polls wait for
POLLS, QUICK_POLLS = 10_000, 100  # long-polls held at once
POLL_ROUNDS, QUICK_POLL_ROUNDS = 3, 1  # held, then answered, that many times
HELD_CHANGES = 4  # changes while the long-polls are held, each round
LOADED_CHANGES, QUICK_LOADED_CHANGES = 20, 3  # changes under the /v1/state load
STATE_CONNECTIONS = 8
LOADED_P50_RATIO, LOADED_P99_RATIO = 2.0, 4.0
HOLD_LIMIT = 180.0


async def main(run: Run) -> Report:
    changes = QUICK_CHANGES if run.quick else CHANGES
    polls = QUICK_POLLS if run.quick else POLLS
    loaded_changes = QUICK_LOADED_CHANGES if run.quick else LOADED_CHANGES
    files = raise_open_files_limit()
    if files < polls + 512:
        raise BenchError(f"the open-files limit ({files}) is too low for {polls} long-polls")
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
            CondoSpec(
                name="reaction",
                host=host,
                server=True,
                extra=("--docker", f"unix://{proxy.address}"),
            ),
        ) as condo,
    ):
        await condo.wait_ready()
        write_spec(condo.specs, SERVICE, spec(0))
        with deadline(CHANGE_LIMIT, "the first deploy"):
            await condo.wait_services([SERVICE], stable)
            first = await events.next_after(0, _is("start"))
        old_id = first.container_id
        # The long-polls' service, after (the first start event above is the service's own).
        write_spec(condo.specs, POLLED, spec_text(run, BUSYBOX, deploy="[:After 0]"))
        with deadline(CHANGE_LIMIT, f"{POLLED}'s first deploy"):
            await condo.wait_services([POLLED], stable)

        async def change_once(change: int) -> float:
            """One change of the service; its first Docker call after the spec write (the
            engine's part is kept for the idle changes only)."""
            nonlocal old_id
            timing = await one_change(condo, events, proxy, SERVICE, spec(change), old_id, change)
            old_id = timing.container_id
            if load is None:
                create.append(timing.create)
                start.append(timing.start)
                engine_part.append(timing.engine_part)
            return timing.first_call

        load: str | None = None
        for change in range(1, changes + 1):
            await trio.sleep(random.uniform(0.05, 0.25))
            first_call.append(await change_once(change))
            if change % floor_every == 0:
                # Interleaved, so that the floor sees the same (shared, noisy) machine.
                floor.append(await _floor_sample(run, floor_events))

        # The same changes while the API is loaded (issue 12: supervision never waits on it).
        assert condo.url is not None
        loaded = LoadedChanges(change_once, changes + 1)
        load = "polls"
        async with condo.window("polls"):  # (a profile of its own under --profile)
            await _under_long_polls(run, condo, loaded, polls)
        load = "state"
        async with (
            condo.window("state"),
            open_load("state", condo.url, str(STATE_CONNECTIONS)),
        ):
            await trio.sleep(1.0)  # the load under way
            for _ in range(loaded_changes):
                await trio.sleep(random.uniform(0.05, 0.25))
                loaded.state.append(await loaded.next())

    return _report(run, changes, first_call, create, start, engine_part, floor, loaded)


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


def _stable_off(container: str | None) -> Callable[[Transition], bool]:
    return lambda t: stable(t) and t.container != container


def _stable_on(container: str) -> Callable[[Transition], bool]:
    return lambda t: stable(t) and t.container == container


@attrs.define
class LoadedChanges:
    """The changes made under API load, and their first Docker calls (seconds after the write)."""

    change: Callable[[int], Awaitable[float]]
    number: int
    held: list[float] = attrs.Factory(list)  # long-polls held
    answering: list[float] = attrs.Factory(list)  # written as the long-polls' answers go
    state: list[float] = attrs.Factory(list)  # 8 clients on /v1/state
    polls_ok: int = 0
    polls_answered: int = 0
    polls: int = 0

    async def next(self) -> float:
        self.number += 1
        return await self.change(self.number)


async def _under_long_polls(run: Run, condo: Condo, loaded: LoadedChanges, polls: int) -> None:
    """Rounds of: `polls` long-polls held for POLLED's next image, a few changes meanwhile;
    then POLLED changes to that image, and one change is written as its → Stable line arrives
    (condo answering every long-poll at that very moment)."""
    assert condo.url is not None
    images = [BUSYBOX_2, BUSYBOX]
    for round_ in range(QUICK_POLL_ROUNDS if run.quick else POLL_ROUNDS):
        image = images[round_ % 2]
        query = urllib.parse.urlencode({"name": POLLED, "image": image, "timeout": "900"})
        async with open_load("polls", condo.url, f"/v1/wait_for?{query}", str(polls)) as load:
            with deadline(HOLD_LIMIT, f"{polls} long-polls held"):
                if await load.line() != "held":
                    raise BenchError("the long-poll process did not say held")
                await wait_metric_at_least(condo.url, "condo_web_open_waits", polls)
            for _ in range(HELD_CHANGES):
                await trio.sleep(random.uniform(0.05, 0.25))
                loaded.held.append(await loaded.next())
            await trio.sleep(random.uniform(0.05, 0.25))
            before = condo.latest[POLLED].container
            write_spec(condo.specs, POLLED, spec_text(run, image, deploy="[:After 0]"))
            with deadline(CHANGE_LIMIT, f"{POLLED} on {image}"):
                await condo.wait_services([POLLED], _stable_off(before))
            loaded.answering.append(await loaded.next())
            with deadline(HOLD_LIMIT, f"{polls} long-polls answered"):
                _, ok, answered = (await load.line()).split()
            loaded.polls_ok += int(ok)
            loaded.polls_answered += int(answered)
            loaded.polls += polls


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
    loaded: LoadedChanges,
) -> Report:
    p50_first, p99_first = ms(percentile(first_call, 50)), ms(percentile(first_call, 99))
    polls = [*loaded.held, *loaded.answering]
    under = {"long-polls held and answered": polls, "/v1/state saturated": loaded.state}
    loaded_bars = []
    loaded_figures: dict[str, float | int] = {}
    for label, samples, key in (
        (f"{loaded.polls // max(1, len(loaded.answering))} long-polls", polls, "polls"),
        (f"{STATE_CONNECTIONS} clients on /v1/state", loaded.state, "state"),
    ):
        p50, p99 = ms(percentile(samples, 50)), ms(percentile(samples, 99))
        loaded_figures |= {f"{key}_first_call_p50_ms": p50, f"{key}_first_call_p99_ms": p99}
        loaded_bars += [
            Bar(
                label=f"first Docker call p50 under {label} (x idle p50)",
                value=round(p50 / p50_first, 2),
                limit=LOADED_P50_RATIO,
                unit="x",
            ),
            Bar(
                label=f"first Docker call p99 under {label} (x idle p99)",
                value=round(p99 / p99_first, 2),
                limit=LOADED_P99_RATIO,
                unit="x",
            ),
        ]
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
            *(_row(f"condo's first Docker call, {what}", v) for what, v in under.items()),
            _row("… of which written as the long-polls were answered", loaded.answering),
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
            **loaded_figures,
            "polls_answered_ok": loaded.polls_ok,
            "polls": loaded.polls,
        },
        bars=(
            Bar(label="first Docker call p50", value=p50_first, limit=P50_BAR, unit="ms"),
            Bar(label="first Docker call p99", value=p99_first, limit=P99_BAR, unit="ms"),
            *loaded_bars,
            Bar(
                label="long-polls answered ok",
                value=loaded.polls_ok,
                limit=loaded.polls,
                unit="",
                at_most=False,
            ),
        ),
        notes=(
            f"{changes} changes of one service (`[:After 0]`, busybox, no healthcheck). "
            f"Spec → start p50 is {p50_start / floor_p50:.2f}x the engine's own create → start "
            "(floor). The original condo polls: 0.5-1.5 s. "
            f"Then under API load, from a process of its own: {len(polls)} changes while "
            f"{loaded.polls // max(1, len(loaded.answering))} long-polls were held (one written as "
            f"their answers went), {len(loaded.state)} while {STATE_CONNECTIONS} clients "
            "saturated /v1/state; every change deployed.",
        ),
    )

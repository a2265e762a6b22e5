"""Bounded exhaustive exploration of the state machine, shared by its tests.

From `Init`, apply every event that makes sense for each reachable state (specs A/B/removal,
every outcome of an in-flight Deploy, engine events for every container the state holds, the
deadline, resyncs) up to a depth, collecting each step taken. Pure and fast (well under a second).
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from condo import fsm
from condo.spec import DeployStrategy, ServiceSpec

SPEC_A = ServiceSpec(container={"Image": "app:1"})
SPEC_B = ServiceSpec(container={"Image": "app:2"}, deploy=DeployStrategy("After", 5))
SPEC_C = ServiceSpec(
    container={"Image": "app:3"},
    fixed_name="web",
    deploy=DeployStrategy("After", 0),
    on_failure="revert",
)
SPEC_A_AFTER = ServiceSpec(container={"Image": "app:1"}, deploy=DeployStrategy("After", 1))
SPEC_D = ServiceSpec(container={"Image": "app:4"}, probation=5, on_failure="revert")


@attrs.frozen
class Step:
    before: fsm.ServiceState
    event: fsm.Event
    after: fsm.ServiceState
    effects: tuple[fsm.Effect, ...]


def boxes(state: fsm.ServiceState) -> list[fsm.Box]:
    return [b for b in (state.current, state.next, state.failed, state.replacing) if b]


def events_for(state: fsm.ServiceState) -> Iterator[fsm.Event]:
    for spec in (SPEC_A, SPEC_B, SPEC_C, SPEC_A_AFTER, SPEC_D, None):
        yield fsm.SpecChanged(spec)
    if state.starting is not None:
        # Deterministic ids keep the explored space small (equal states deduplicate).
        serial = f"{state.starting.image}-{state.attempt}-{len(boxes(state))}"
        for healthcheck in (True, False):
            yield from _deploy_outcomes(state.starting, serial, healthcheck)
    for box in boxes(state):
        yield fsm.ContainerHealthy(box.id)
        yield fsm.ContainerUnhealthy(box.id)
        yield fsm.ContainerDied(id=box.id, exit_code=1)
        yield fsm.ContainerRestarted(box.id)
        yield fsm.ContainerDestroyed(box.id)
        yield fsm.ContainerCreated(box.id)
        yield fsm.RenameFailed(id=box.id, message="nope")
    yield fsm.DeadlineReached()
    yield fsm.ContainerCreated("late")
    yield fsm.Observed(containers=())
    seen = tuple(
        fsm.Seen(
            id=b.id,
            name=b.name,
            spec_hash=b.hash,
            running=True,
            health="healthy",
            created_at=b.created_at,
        )
        for b in boxes(state)
    )
    yield fsm.Observed(containers=seen)
    # A resync with a spec change waiting beside it (a restart after the file changed or went).
    yield fsm.Observed(containers=seen, latest=fsm.SpecChanged(SPEC_B))
    yield fsm.Observed(containers=seen, latest=fsm.SpecChanged(None))
    yield fsm.Observed(
        containers=(
            *seen,
            fsm.Seen(
                id="stray",
                name="svc_stray",
                spec_hash="x",
                running=True,
                health=None,
                created_at=1.0,
            ),
        )
    )


def _deploy_outcomes(spec: ServiceSpec, serial: str, healthcheck: bool) -> Iterator[fsm.Event]:
    box = fsm.Box(
        id=f"c-{serial}-{healthcheck}",
        name=f"svc_{serial}",
        spec=spec,
        created_at=1000.0,
        healthcheck=healthcheck,
    )
    health_values = (None, "starting", "healthy", "unhealthy") if healthcheck else (None,)
    for health in health_values:
        yield fsm.ContainerStarted(box=box, running=True, health=health)
    yield fsm.ContainerStarted(box=box, running=False, health=None)
    for replaced in (False, True):
        yield fsm.DeployFailed(message="boom", replaced=replaced)
        yield fsm.DeployFailed(message="boom", replaced=replaced, leftover=box)
    yield fsm.DeployFailed(message="superseded", replaced=False, cancelled=True)
    yield fsm.DeployFailed(message="pull: no such image", replaced=False, permanent=True)


def explore(depth: int = 5) -> list[Step]:
    """Every step reachable from Init within `depth` events (states deduplicated)."""
    steps: list[Step] = []
    frontier = [fsm.ServiceState()]
    seen_states = {frontier[0]}
    for _ in range(depth):
        following = []
        for state in frontier:
            for event in events_for(state):
                # Time stands still but for the deadline; wall time runs 1000 s ahead of Trio's.
                mono = 100.0
                if isinstance(event, fsm.DeadlineReached) and state.deadline is not None:
                    mono = state.deadline
                now = fsm.Instant(mono=mono, wall=mono + 1000.0)
                after, effects = fsm.step(state, event, now)
                steps.append(Step(state, event, after, tuple(effects)))
                if after not in seen_states:
                    seen_states.add(after)
                    following.append(after)
        frontier = following
    return steps


def draw(steps: list[Step]) -> str:
    """doc/fsm.dot for these steps: `python -m tests.fsm_explore > doc/fsm.dot`."""
    edges: dict[tuple[str, str], set[str]] = {}
    for s in steps:
        if s.before.phase is not s.after.phase:
            key = (s.before.phase.value, s.after.phase.value)
            edges.setdefault(key, set()).add(type(s.event).__name__)
    lines = [
        "// condo's per-service state machine: every phase change condo.fsm.step can make,",
        "// labelled with the events that cause it. tests/test_fsm.py checks this drawing against",
        "// the code both ways; regenerate with `python -m tests.fsm_explore > doc/fsm.dot`",
        "// (render: dot -Tsvg doc/fsm.dot -o doc/fsm.svg). Staying in a phase is not drawn.",
        "digraph condo_fsm {",
        "    rankdir=LR;",
        '    node [shape=box, style="rounded,filled", fontname="Helvetica", fillcolor="#eeeeee"];',
        '    edge [fontname="Helvetica", fontsize=9];',
        '    Init [fillcolor="#dddddd"];',
        '    Wait [fillcolor="#fff3c4"];',
        '    WaitNext [fillcolor="#fff3c4"];',
        '    Stable [fillcolor="#c8f0c8"];',
        '    TryAgain [fillcolor="#f6c6c6"];',
        '    TryAgainNext [fillcolor="#f6dcc6"];',
        "",
    ]
    for (a, b), events in sorted(edges.items()):
        label = "\\n".join(sorted(events))
        lines.append(f'    {a} -> {b} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(draw(explore()), end="")

"""Red team of issue 13 (safe deploys), in-process: `condo wait`'s "failed for good" verdict
(condo.waiting) fed by real FSM steps (condo.fsm), never a hand-built view that could hide a
field the FSM keeps."""

from __future__ import annotations

from condo import fsm
from condo.fsm import Phase
from condo.record import to_view
from condo.spec import ServiceSpec
from condo.waiting import evaluate

HOST = "h1"


def at(mono: float) -> fsm.Instant:
    return fsm.Instant(mono=mono, wall=mono + 1_000_000.0)


def verdict_failed(state: fsm.ServiceState, image: str, mono: float) -> dict[str, object]:
    view = to_view(state, at(mono), None)
    return dict(evaluate("web", image, {HOST: {"web": view}}).failed)


def test_a_fixed_spec_of_the_same_image_is_not_failed_while_it_deploys() -> None:
    # The engine rejected the first body for good (a permanent error); the operator fixes the
    # spec file but keeps the image. While the fixed spec deploys, waiting for that image must
    # not be answered "failed" by the old error.
    broken = ServiceSpec(container={"Image": "app:2", "HostConfig": {"Memory": -5}})
    fixed = ServiceSpec(container={"Image": "app:2"})
    state, _ = fsm.step(fsm.ServiceState(), fsm.SpecChanged(broken), at(0))
    rejected = fsm.DeployFailed(message="create: bad request", replaced=False, permanent=True)
    state, _ = fsm.step(state, rejected, at(1))
    assert state.phase is Phase.TryAgain
    assert verdict_failed(state, "app:2", 1)  # the broken spec did fail for good
    state, effects = fsm.step(state, fsm.SpecChanged(fixed), at(2))
    assert [type(e) for e in effects] == [fsm.Deploy]
    assert verdict_failed(state, "app:2", 2) == {}
    started = fsm.Box(id="c2", name="web_c2", spec=fixed, created_at=2.0, healthcheck=True)
    state, _ = fsm.step(
        state, fsm.ContainerStarted(box=started, running=True, health="starting"), at(3)
    )
    assert state.phase is Phase.Wait  # waiting for its healthcheck
    assert verdict_failed(state, "app:2", 3) == {}


def test_an_image_that_was_missing_then_pushed_is_not_failed_while_its_retry_runs() -> None:
    # :retry (the default): the first pull finds no image (permanent), CI pushes it, the retry
    # deploys it. While that retry runs, `condo wait` must not exit 3.
    spec = ServiceSpec(container={"Image": "app:3"})
    state, _ = fsm.step(fsm.ServiceState(), fsm.SpecChanged(spec), at(0))
    missing = fsm.DeployFailed(message="pull app:3: no such image", replaced=False, permanent=True)
    state, _ = fsm.step(state, missing, at(1))
    assert state.deadline is not None
    state, effects = fsm.step(state, fsm.DeadlineReached(), at(state.deadline))
    assert [type(e) for e in effects] == [fsm.Deploy]
    assert verdict_failed(state, "app:3", 20) == {}
    started = fsm.Box(id="c3", name="web_c3", spec=spec, created_at=20.0, healthcheck=True)
    state, _ = fsm.step(
        state, fsm.ContainerStarted(box=started, running=True, health="starting"), at(21)
    )
    assert verdict_failed(state, "app:3", 21) == {}

"""The state machine: invariants over every reachable step, scenarios, and the drawing."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import attrs
import pytest

from condo import fsm
from condo.fsm import Phase
from condo.spec import DeployStrategy, ServiceSpec
from tests.fsm_explore import SPEC_A, SPEC_B, SPEC_C, Step, boxes, explore

DOT = Path(__file__).parent.parent / "doc" / "fsm.dot"


@cache
def reachable() -> tuple[Step, ...]:
    return tuple(explore(5))


def at(mono: float) -> fsm.Instant:
    return fsm.Instant(mono=mono, wall=mono + 1_000_000.0)


def run(state: fsm.ServiceState, *events: fsm.Event, mono: float = 0.0) -> fsm.Step:
    effects: list[fsm.Effect] = []
    for event in events:
        state, more = fsm.step(state, event, at(mono))
        effects += more
    return state, effects


def box(
    cid: str,
    spec: ServiceSpec,
    *,
    healthcheck: bool = True,
    name: str | None = None,
    restart_policy: str = "",
) -> fsm.Box:
    return fsm.Box(
        id=cid,
        name=name or f"web_{cid}",
        spec=spec,
        created_at=1.0,
        healthcheck=healthcheck,
        restart_policy=restart_policy,
    )


def stable(
    cid: str, spec: ServiceSpec, *, name: str | None = None, restart_policy: str = ""
) -> fsm.ServiceState:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(spec))
    started = box(cid, spec, name=name, restart_policy=restart_policy)
    state, _ = run(state, fsm.ContainerStarted(box=started, running=True, health="healthy"))
    assert state.phase is Phase.Stable
    return state


# --- invariants over everything reachable ------------------------------------------------------


def test_exploration_is_big_enough_to_mean_something() -> None:
    phases = {s.after.phase for s in reachable()}
    assert phases == set(Phase)
    assert len(reachable()) > 10_000


def test_every_phase_has_its_shape() -> None:
    for s in reachable():
        st = s.after
        match st.phase:
            case Phase.Init:
                assert st.current is None and st.next is None
            case Phase.Wait:
                assert (st.current is None) != (st.starting is None), s
                assert st.next is None
            case Phase.TryAgain:
                assert st.current is None and st.next is None and st.starting is None
                assert st.deadline is not None and st.error is not None
            case Phase.Stable:
                assert st.current is not None and st.next is None and st.starting is None
            case Phase.WaitNext:
                assert st.current is not None
                assert (st.next is None) != (st.starting is None), s
            case Phase.TryAgainNext:
                assert st.current is not None and st.next is None and st.starting is None
                assert st.deadline is not None
        if st.draining:
            assert st.phase is Phase.WaitNext and st.next is not None and st.deadline is not None
        if st.on_probation:
            assert st.phase is Phase.Stable and st.deadline is not None, s


def test_nothing_leaks_every_dropped_container_is_retired() -> None:
    for s in reachable():
        kept = {b.id for b in boxes(s.after)}
        handled = {e.box.id for e in s.effects if isinstance(e, fsm.Retire)}
        handled |= {e.id for e in s.effects if isinstance(e, fsm.RemoveStray)}
        handled |= {e.replace.id for e in s.effects if isinstance(e, fsm.Deploy) and e.replace}
        if isinstance(s.event, fsm.ContainerDestroyed):
            handled.add(s.event.id)
        if isinstance(s.event, fsm.Observed):  # the engine no longer has these
            present = {c.id for c in s.event.containers}
            handled |= {b.id for b in boxes(s.before) if b.id not in present}
        replaced = isinstance(s.event, fsm.ContainerStarted) or (
            isinstance(s.event, fsm.DeployFailed) and s.event.replaced
        )
        if replaced and s.before.replacing:
            handled.add(s.before.replacing.id)  # the Deploy retired it before creating
        before = {b.id for b in boxes(s.before)}
        if isinstance(s.event, fsm.ContainerStarted):
            before.add(s.event.box.id)
        if isinstance(s.event, fsm.DeployFailed) and s.event.leftover:
            before.add(s.event.leftover.id)
        assert before - kept <= handled, s


def test_one_deploy_in_flight_at_most() -> None:
    for s in reachable():
        deploys = [e for e in s.effects if isinstance(e, fsm.Deploy)]
        assert len(deploys) <= 1, s
        resolved = isinstance(s.event, (fsm.ContainerStarted, fsm.DeployFailed, fsm.Observed))
        if s.before.starting is not None and not resolved:
            assert not deploys, s
        if deploys:
            assert s.after.starting == deploys[0].spec
        elif s.after.starting is not None:
            assert s.before.starting == s.after.starting


def test_only_the_failed_candidate_is_kept() -> None:
    for s in reachable():
        for e in s.effects:
            if isinstance(e, fsm.Retire) and e.keep:
                assert s.after.failed == e.box, s


def test_a_stable_container_is_never_stopped_before_its_successor_is_ready_with_after() -> None:
    # [:After n]: while the candidate is not Stable, nothing retires the serving container.
    for s in reachable():
        cur = s.before.current
        if s.before.phase is not Phase.WaitNext or cur is None or s.before.draining:
            continue
        if isinstance(
            s.event, (fsm.ContainerDied, fsm.ContainerDestroyed, fsm.SpecChanged, fsm.Observed)
        ):
            continue  # it died by itself, or the operator changed or removed the spec
        if s.after.phase is Phase.Stable or s.after.removed:
            continue  # the candidate became ready (healthy with n = 0), or nobody wants either
        retired = {e.box.id for e in s.effects if isinstance(e, fsm.Retire)}
        assert cur.id not in retired, s


def test_a_revert_deploys_nothing_but_the_last_good_and_never_the_reverted_spec() -> None:
    reverts = 0
    for s in reachable():
        after, reverted = s.after, s.after.reverted
        if reverted is not None and reverted != s.before.reverted:
            reverts += 1
            # Only a desired spec that asks for it, failing, with a last good to go back to.
            assert after.desired is not None and after.desired.on_failure == "revert", s
            assert s.before.last_good is not None, s
            assert reverted.spec_hash == after.desired.container_hash, s
        desired = after.desired
        if (
            reverted is not None
            and desired is not None
            and reverted.spec_hash == desired.container_hash
        ):
            for e in s.effects:
                if isinstance(e, fsm.Deploy):
                    assert e.spec == after.last_good, s
                    assert e.spec.container_hash != reverted.spec_hash, s
    assert reverts > 100


def test_with_retry_nothing_is_ever_reverted() -> None:
    for s in reachable():
        desired = s.after.desired
        if desired is not None and desired.on_failure == "retry":
            assert s.after.reverted is None or s.after.reverted == s.before.reverted, s


# --- the drawing -----------------------------------------------------------------------------


def drawn_edges() -> set[tuple[str, str, str]]:
    edges = set()
    for line in DOT.read_text().splitlines():
        m = re.match(r'\s*(\w+)\s*->\s*(\w+)\s*\[label="([^"]*)"', line)
        if m:
            for label in m.group(3).split("\\n"):
                edges.add((m.group(1), m.group(2), label.strip()))
    return edges


def test_every_transition_in_the_code_is_in_the_drawing() -> None:
    taken = {
        (s.before.phase.value, s.after.phase.value, type(s.event).__name__)
        for s in reachable()
        if s.before.phase is not s.after.phase
    }
    missing = taken - drawn_edges()
    assert not missing, "doc/fsm.dot lacks:\n" + "\n".join(
        f'    {a} -> {b} [label="{e}"];' for a, b, e in sorted(missing)
    )


def test_every_transition_in_the_drawing_is_in_the_code() -> None:
    taken = {
        (s.before.phase.value, s.after.phase.value, type(s.event).__name__) for s in reachable()
    }
    assert drawn_edges() - taken == set()


# --- scenarios ---------------------------------------------------------------------------------


def test_first_spec_deploys_and_healthy_makes_it_stable() -> None:
    state, effects = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))
    assert state.phase is Phase.Wait and state.starting == SPEC_A
    assert effects == [fsm.Deploy(spec=SPEC_A, name=None)]
    started = box("c1", SPEC_A)
    state, effects = run(
        state, fsm.ContainerStarted(box=started, running=True, health="starting"), mono=5.0
    )
    assert state.phase is Phase.Wait and state.current == started
    assert state.deadline == 5.0 + SPEC_A.health_timeout
    state, effects = run(state, fsm.ContainerHealthy("c1"), mono=6.0)
    assert state.phase is Phase.Stable and effects == []
    assert state.current is not None and state.current.stable_at == 6.0 + 1_000_000.0


def test_no_healthcheck_is_stable_when_running_or_after_stable_after() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))
    now_stable, _ = run(
        state,
        fsm.ContainerStarted(box=box("c1", SPEC_A, healthcheck=False), running=True, health=None),
    )
    assert now_stable.phase is Phase.Stable
    slow = attrs.evolve(SPEC_A, stable_after=3.0)
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(slow))
    state, _ = run(
        state,
        fsm.ContainerStarted(box=box("c1", slow, healthcheck=False), running=True, health=None),
        mono=10.0,
    )
    assert state.phase is Phase.Wait and state.deadline == 13.0
    state, _ = run(state, fsm.DeadlineReached(), mono=13.0)
    assert state.phase is Phase.Stable


def test_health_timeout_fails_and_retries_with_doubling_backoff() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))
    candidate = box("c1", SPEC_A)
    state, _ = run(state, fsm.ContainerStarted(box=candidate, running=True, health="starting"))
    state, effects = run(state, fsm.DeadlineReached(), mono=10.0)
    assert state.phase is Phase.TryAgain and state.deadline == 20.0 and state.attempt == 1
    assert effects == [fsm.Retire(box=candidate, keep=True)]
    assert state.failed == candidate
    assert state.error is not None and "not healthy after 10 s" in state.error.message
    delays = [fsm.backoff(n) for n in range(1, 8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]


def test_unhealthy_fails_fast_and_a_second_failure_removes_the_first() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))
    first = box("c1", SPEC_A)
    state, _ = run(
        state,
        fsm.ContainerStarted(box=first, running=True, health="starting"),
        fsm.ContainerUnhealthy("c1"),
        mono=1.0,
    )
    assert state.phase is Phase.TryAgain and state.deadline == 11.0
    state, effects = run(state, fsm.DeadlineReached(), mono=11.0)
    assert effects == [fsm.Deploy(spec=SPEC_A, name=None)]
    second = box("c2", SPEC_A)
    state, effects = run(
        state, fsm.ContainerStarted(box=second, running=True, health="unhealthy"), mono=12.0
    )
    assert effects == [fsm.Retire(box=first), fsm.Retire(box=second, keep=True)]
    assert state.attempt == 2 and state.deadline == 32.0


def test_a_new_spec_retries_at_once() -> None:
    state, _ = run(
        fsm.ServiceState(),
        fsm.SpecChanged(SPEC_A),
        fsm.DeployFailed(message="pull: not found", replaced=False),
    )
    assert state.phase is Phase.TryAgain
    fixed = ServiceSpec(container={"Image": "app:1b"})
    state, effects = run(state, fsm.SpecChanged(fixed))
    assert state.phase is Phase.Wait and effects == [fsm.Deploy(spec=fixed, name=None)]
    assert state.attempt == 0


def test_after_deploy_waits_for_healthy_then_drains_then_retires_old() -> None:
    state = stable("old", SPEC_A)
    state, effects = run(state, fsm.SpecChanged(SPEC_B))
    assert state.phase is Phase.WaitNext and effects == [fsm.Deploy(spec=SPEC_B, name=None)]
    nxt = box("new", SPEC_B)
    state, effects = run(
        state,
        fsm.ContainerStarted(box=nxt, running=True, health="starting"),
        fsm.ContainerHealthy("new"),
        mono=2.0,
    )
    assert state.phase is Phase.WaitNext and state.draining and state.deadline == 7.0
    assert effects == []
    state, effects = run(state, fsm.DeadlineReached(), mono=7.0)
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "new" and state.current.stable_at == 2.0 + 1_000_000.0
    assert [type(e) for e in effects] == [fsm.Retire]


def test_after_deploy_failure_keeps_old_serving() -> None:
    state = stable("old", SPEC_A)
    state, _ = run(
        state,
        fsm.SpecChanged(SPEC_B),
        fsm.ContainerStarted(box=box("new", SPEC_B), running=True, health="unhealthy"),
    )
    assert state.phase is Phase.TryAgainNext and state.current is not None
    assert state.current.id == "old"


def test_before_deploy_replaces_and_pull_failure_leaves_old_untouched() -> None:
    state = stable("old", SPEC_A)
    spec = ServiceSpec(container={"Image": "app:9"})
    state, effects = run(state, fsm.SpecChanged(spec))
    assert effects == [fsm.Deploy(spec=spec, name=None, replace=state.replacing)]
    assert state.replacing is not None and state.replacing.id == "old"
    failed, _ = run(state, fsm.DeployFailed(message="pull", replaced=False))
    assert failed.phase is Phase.TryAgainNext and failed.current is not None
    assert failed.current.id == "old"
    failed, _ = run(state, fsm.DeployFailed(message="create", replaced=True))
    assert failed.phase is Phase.TryAgain and failed.current is None


def test_fixed_name_with_after_uses_a_temporary_name_and_renames() -> None:
    spec1 = attrs.evolve(SPEC_C, container={"Image": "app:1"})
    state = stable("old", spec1, name="web")
    state, effects = run(state, fsm.SpecChanged(SPEC_C))
    assert effects == [fsm.Deploy(spec=SPEC_C, name="web-next")]
    nxt = box("new", SPEC_C, name="web-next")
    state, effects = run(state, fsm.ContainerStarted(box=nxt, running=True, health="healthy"))
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.name == "web"
    assert [type(e) for e in effects] == [fsm.Retire, fsm.Rename]
    rename = effects[1]
    assert isinstance(rename, fsm.Rename) and rename.box.id == "new" and rename.name == "web"


def test_spec_changes_that_do_not_touch_the_container_do_not_redeploy() -> None:
    state = stable("c1", SPEC_A)
    calmer = attrs.evolve(SPEC_A, stop_timeout=30.0, deploy=DeployStrategy("After", 3))
    state, effects = run(state, fsm.SpecChanged(calmer))
    assert effects == [] and state.phase is Phase.Stable
    assert state.current is not None and state.current.spec == calmer


def test_reverting_during_waitnext_keeps_the_stable_one() -> None:
    state = stable("old", SPEC_A)
    state, _ = run(
        state,
        fsm.SpecChanged(SPEC_B),
        fsm.ContainerStarted(box=box("new", SPEC_B), running=True, health="starting"),
    )
    state, effects = run(state, fsm.SpecChanged(SPEC_A))
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "old"
    assert effects == [fsm.Retire(box=box("new", SPEC_B))]


def test_removal_retires_everything_and_finishes() -> None:
    state = stable("c1", SPEC_A)
    state, effects = run(state, fsm.SpecChanged(None))
    assert state.finished and effects == [fsm.Retire(box=stable("c1", SPEC_A).current)]  # type: ignore[arg-type]


def test_removal_during_a_deploy_retires_the_result() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A), fsm.SpecChanged(None))
    assert not state.finished and state.starting == SPEC_A
    c1 = box("c1", SPEC_A)
    state, effects = run(state, fsm.ContainerStarted(box=c1, running=True, health=None))
    assert state.finished and effects == [fsm.Retire(box=c1)]


def test_stable_container_dying_is_redeployed_unless_docker_restarts_it() -> None:
    state = stable("c1", SPEC_A)
    state, effects = run(state, fsm.ContainerDied(id="c1", exit_code=1))
    assert state.phase is Phase.Wait and [type(e) for e in effects] == [fsm.Retire, fsm.Deploy]
    policy = stable("c1", SPEC_A, restart_policy="always")
    waiting, effects = run(policy, fsm.ContainerDied(id="c1", exit_code=0), mono=1.0)
    assert waiting.phase is Phase.Stable and effects == []
    assert waiting.deadline == 1.0 + fsm.RESTART_GRACE
    back, _ = run(waiting, fsm.ContainerRestarted("c1"))
    assert back.deadline is None
    gave_up, effects = run(waiting, fsm.DeadlineReached(), mono=1.0 + fsm.RESTART_GRACE)
    assert gave_up.phase is Phase.Wait and [type(e) for e in effects] == [fsm.Retire, fsm.Deploy]


PROBATION = attrs.evolve(SPEC_A, probation=5.0)


def test_probation_a_container_dying_soon_after_stable_fails_its_deploy_and_backs_off() -> None:
    state = stable("c1", PROBATION)
    assert state.on_probation and state.deadline == 5.0 and state.attempt == 0
    c1 = state.current
    state, effects = run(state, fsm.ContainerDied(id="c1", exit_code=3), mono=3.0)
    assert state.phase is Phase.TryAgain and state.current is None and state.failed == c1
    assert c1 is not None and effects == [fsm.Retire(box=c1, keep=True)]
    assert state.attempt == 1 and state.deadline == 3.0 + fsm.backoff(1)
    assert state.error is not None
    assert state.error.message == "container web_c1 died (exit 3) during its 5 s probation"
    # The retry turns Stable again: still on probation, so the attempts keep counting.
    state, effects = run(state, fsm.DeadlineReached(), mono=13.0)
    assert effects[-1] == fsm.Deploy(spec=PROBATION, name=None)
    started = box("c2", PROBATION)
    state, _ = run(
        state, fsm.ContainerStarted(box=started, running=True, health="healthy"), mono=13.0
    )
    assert state.phase is Phase.Stable and state.on_probation and state.attempt == 1
    state, _ = run(state, fsm.ContainerUnhealthy("c2"), mono=14.0)
    assert state.phase is Phase.TryAgain and state.attempt == 2
    assert state.deadline == 14.0 + fsm.backoff(2)


def test_probation_over_makes_the_deploy_good_and_later_deaths_are_plain_replacements() -> None:
    state = stable("c1", PROBATION)
    state, _ = run(state, fsm.DeadlineReached(), mono=4.0)
    assert state.on_probation  # a stale wake-up changes nothing
    state, effects = run(state, fsm.DeadlineReached(), mono=5.0)
    assert effects == [] and state.phase is Phase.Stable
    assert not state.on_probation and state.deadline is None and state.attempt == 0
    state, effects = run(state, fsm.ContainerDied(id="c1", exit_code=1), mono=60.0)
    assert state.phase is Phase.Wait and [type(e) for e in effects] == [fsm.Retire, fsm.Deploy]


def test_probation_gives_dockers_restart_policy_no_grace() -> None:
    state = stable("c1", PROBATION, restart_policy="always")
    state, _ = run(state, fsm.ContainerDied(id="c1", exit_code=0), mono=1.0)
    assert state.phase is Phase.TryAgain and state.attempt == 1
    # Docker restarting it afterwards only stops the failed one again.
    failed = state.failed
    state, effects = run(state, fsm.ContainerRestarted("c1"), mono=1.5)
    assert failed is not None and failed.id == "c1"
    assert state.phase is Phase.TryAgain and effects == [fsm.Retire(box=failed, keep=True)]


def test_no_probation_keeps_todays_behaviour() -> None:
    state = stable("c1", SPEC_A)
    assert not state.on_probation and state.deadline is None


# --- revert ------------------------------------------------------------------------------------

GOOD = attrs.evolve(SPEC_A, deploy=DeployStrategy("After", 2))
PINNED = attrs.evolve(GOOD, container={"Image": "sha256:aaa"})
BAD = ServiceSpec(container={"Image": "app:bad"}, probation=5.0, on_failure="revert")


def good_stable() -> fsm.ServiceState:
    """GOOD serves and its deploy is good; its container runs image sha256:aaa."""
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(GOOD))
    started = attrs.evolve(box("c1", GOOD), image_id="sha256:aaa")
    state, _ = run(state, fsm.ContainerStarted(box=started, running=True, health="healthy"))
    assert state.phase is Phase.Stable and state.last_good == PINNED
    return state


def test_revert_after_a_failed_probation_brings_the_last_good_back_pinned_and_stays() -> None:
    before = attrs.evolve(BAD, deploy=DeployStrategy("Before"))
    state, effects = run(good_stable(), fsm.SpecChanged(before), mono=10.0)
    assert effects == [fsm.Deploy(spec=before, name=None, replace=good_stable().current)]
    started = box("c2", before)
    state, _ = run(
        state, fsm.ContainerStarted(box=started, running=True, health="healthy"), mono=11.0
    )
    assert state.on_probation and state.deadline == 16.0
    bad = state.current
    assert bad is not None and bad.id == "c2"
    state, effects = run(state, fsm.ContainerDied(id="c2", exit_code=1), mono=14.0)
    # Back on the last good, by the image it ran, with its own strategy (nothing serves: plain).
    assert effects == [fsm.Retire(box=bad, keep=True), fsm.Deploy(spec=PINNED, name=None)]
    assert state.phase is Phase.Wait and state.starting == PINNED and state.attempt == 0
    message = "container web_c2 died (exit 1) during its 5 s probation"
    assert state.reverted == fsm.Reverted(
        from_image="app:bad",
        to_image="sha256:aaa",
        reason=message,
        at=14.0 + 1_000_000.0,
        spec_hash=before.container_hash,
    )
    back = box("c3", PINNED)
    state, effects = run(state, fsm.ContainerStarted(box=back, running=True, health="healthy"))
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "c3" and effects == [fsm.Retire(box=bad)]
    assert state.reverted is not None and state.last_good == PINNED
    # No revert loop: the bad spec is not tried again, not even when its options change.
    for event in (
        fsm.SpecChanged(attrs.evolve(before, stop_timeout=3.0)),
        fsm.DeadlineReached(),
        fsm.Observed(
            containers=(
                fsm.Seen(
                    id="c3",
                    name="web_c3",
                    spec_hash=PINNED.container_hash,
                    running=True,
                    health="healthy",
                    created_at=1.0,
                ),
            )
        ),
    ):
        state, effects = run(state, event, mono=500.0)
        assert effects == [] and state.phase is Phase.Stable, event
    # The last good breaking is replaced by itself, never by the reverted spec.
    state, effects = run(state, fsm.ContainerDied(id="c3", exit_code=1), mono=600.0)
    assert effects[-1] == fsm.Deploy(spec=PINNED, name=None)
    # A change of the container part ends the revert: the new spec is deployed.
    fixed = attrs.evolve(before, container={"Image": "app:fixed"})
    state, effects = run(state, fsm.SpecChanged(fixed), mono=601.0)
    assert state.reverted is None
    state, effects = run(
        state, fsm.ContainerStarted(box=box("c4", PINNED), running=True, health="healthy")
    )
    assert effects[-1] == fsm.Deploy(spec=fixed, name=None, replace=state.current)


def test_revert_under_after_keeps_the_old_container_serving_and_retries_nothing() -> None:
    after = attrs.evolve(BAD, deploy=DeployStrategy("After", 1))
    state, effects = run(good_stable(), fsm.SpecChanged(after), mono=10.0)
    assert state.phase is Phase.WaitNext and effects == [fsm.Deploy(spec=after, name=None)]
    bad = box("c2", after)
    state, _ = run(state, fsm.ContainerStarted(box=bad, running=True, health="starting"))
    state, effects = run(state, fsm.DeadlineReached(), mono=10.0 + after.health_timeout)
    assert effects == [fsm.Retire(box=bad, keep=True)]
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "c1" and state.deadline is None
    assert state.reverted is not None and state.reverted.to_image == "app:1"
    state, effects = run(state, fsm.DeadlineReached(), mono=1000.0)
    assert effects == [] and state.phase is Phase.Stable


def test_revert_when_the_pull_fails_keeps_the_untouched_old_container() -> None:
    before = attrs.evolve(BAD, deploy=DeployStrategy("Before"))
    state, _ = run(good_stable(), fsm.SpecChanged(before))
    state, effects = run(state, fsm.DeployFailed(message="pull app:bad: not found", replaced=False))
    assert effects == [] and state.phase is Phase.Stable
    assert state.current is not None and state.current.id == "c1"
    assert state.reverted is not None and state.reverted.reason == "pull app:bad: not found"


def test_revert_without_a_last_good_retries() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(BAD))
    state, _ = run(state, fsm.DeployFailed(message="pull app:bad: not found", replaced=False))
    assert state.phase is Phase.TryAgain and state.reverted is None and state.attempt == 1


def test_a_failing_last_good_after_a_revert_is_retried_not_reverted_again() -> None:
    before = attrs.evolve(BAD, deploy=DeployStrategy("Before"))
    state, _ = run(good_stable(), fsm.SpecChanged(before))
    state, effects = run(state, fsm.DeployFailed(message="boom", replaced=True))
    assert effects == [fsm.Deploy(spec=PINNED, name=None)] and state.reverted is not None
    state, _ = run(state, fsm.DeployFailed(message="no image", replaced=False), mono=1.0)
    assert state.phase is Phase.TryAgain and state.attempt == 1
    state, effects = run(state, fsm.DeadlineReached(), mono=11.0)
    assert effects == [fsm.Deploy(spec=PINNED, name=None)]


# The registry digest of GOOD's image (app:1 came from a registry).
GOOD_DIGEST = "app@sha256:" + "d" * 64
BY_DIGEST = attrs.evolve(GOOD, container={"Image": GOOD_DIGEST})


def good_stable_by_digest() -> fsm.ServiceState:
    """GOOD serves and its deploy is good; the engine knows its image's registry digest."""
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(GOOD))
    started = attrs.evolve(box("c1", GOOD), image_id="sha256:aaa", image_digest=GOOD_DIGEST)
    state, _ = run(state, fsm.ContainerStarted(box=started, running=True, health="healthy"))
    assert state.phase is Phase.Stable
    return state


def test_the_last_good_is_pinned_to_its_registry_digest_not_the_image_id() -> None:
    # The digest can be pulled back if the image was removed; the image id cannot.
    assert good_stable_by_digest().last_good == BY_DIGEST


def test_the_last_good_is_pinned_when_its_probation_completes_by_digest() -> None:
    on_probation = attrs.evolve(GOOD, probation=5.0)
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(on_probation))
    started = attrs.evolve(box("c1", on_probation), image_id="sha256:aaa", image_digest=GOOD_DIGEST)
    state, _ = run(state, fsm.ContainerStarted(box=started, running=True, health="healthy"))
    assert state.on_probation and state.last_good is None
    state, _ = run(state, fsm.DeadlineReached(), mono=5.0)
    assert state.last_good == attrs.evolve(on_probation, container={"Image": GOOD_DIGEST})


def test_a_revert_deploys_the_last_good_by_digest_and_keeps_it() -> None:
    before = attrs.evolve(BAD, deploy=DeployStrategy("Before"))
    state, effects = run(good_stable_by_digest(), fsm.SpecChanged(before), mono=10.0)
    state, effects = run(state, fsm.DeployFailed(message="boom", replaced=True), mono=11.0)
    assert effects == [fsm.Deploy(spec=BY_DIGEST, name=None)]
    assert state.reverted is not None and state.reverted.to_image == GOOD_DIGEST
    # The container made from the pinned spec is the last good's: Stable, nothing redeployed,
    # and its own deploy pins to the same digest (no drift to the id, no redeploy loop).
    back = attrs.evolve(box("c2", BY_DIGEST), image_id="sha256:aaa", image_digest=GOOD_DIGEST)
    state, effects = run(state, fsm.ContainerStarted(box=back, running=True, health="healthy"))
    assert state.phase is Phase.Stable and effects == [] and state.last_good == BY_DIGEST
    state, effects = run(state, fsm.SpecChanged(before), fsm.DeadlineReached(), mono=500.0)
    assert effects == [] and state.phase is Phase.Stable


def test_under_after_a_revert_keeps_the_container_pinned_by_digest_serving() -> None:
    after = attrs.evolve(BAD, deploy=DeployStrategy("After", 1))
    state, _ = run(good_stable_by_digest(), fsm.SpecChanged(after), mono=10.0)
    bad = box("c2", after)
    state, _ = run(state, fsm.ContainerStarted(box=bad, running=True, health="starting"))
    state, effects = run(state, fsm.DeadlineReached(), mono=10.0 + after.health_timeout)
    assert effects == [fsm.Retire(box=bad, keep=True)]
    assert state.current is not None and state.current.id == "c1"
    # The old container runs the pinned image already: it is not replaced by the pinned spec.
    state, effects = run(state, fsm.DeadlineReached(), fsm.SpecChanged(after), mono=1000.0)
    assert effects == [] and state.phase is Phase.Stable
    assert state.current is not None and state.current.id == "c1"


def test_a_default_retry_spec_never_reverts() -> None:
    retry = attrs.evolve(BAD, on_failure="retry", deploy=DeployStrategy("Before"))
    state, _ = run(good_stable(), fsm.SpecChanged(retry))
    state, effects = run(state, fsm.DeployFailed(message="boom", replaced=True))
    assert effects == [] and state.phase is Phase.TryAgain and state.reverted is None


def test_stable_container_removed_by_hand_is_redeployed() -> None:
    state, effects = run(stable("c1", SPEC_A), fsm.ContainerDestroyed("c1"))
    assert state.phase is Phase.Wait and effects[-1] == fsm.Deploy(spec=SPEC_A, name=None)


def test_unhealthy_stable_with_after_starts_a_replacement_beside_it() -> None:
    spec = attrs.evolve(SPEC_A, deploy=DeployStrategy("After", 0))
    state, effects = run(stable("c1", spec), fsm.ContainerUnhealthy("c1"))
    assert state.phase is Phase.WaitNext and effects == [fsm.Deploy(spec=spec, name=None)]


def test_recovery_adopts_what_the_interrupted_deploy_created_and_removes_strays() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))  # Deploy in flight, then kill -9
    made = fsm.Seen(
        id="c9",
        name="web_c9",
        spec_hash=SPEC_A.container_hash,
        running=True,
        health="healthy",
        created_at=5.0,
    )
    stray = fsm.Seen(
        id="s1", name="web_s1", spec_hash="other", running=True, health=None, created_at=4.0
    )
    state, effects = run(state, fsm.Observed(containers=(stray, made)))
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "c9"
    assert effects == [fsm.RemoveStray(id="s1", name="web_s1")]


def test_recovery_without_anything_created_deploys_again() -> None:
    state, _ = run(fsm.ServiceState(), fsm.SpecChanged(SPEC_A))
    state, effects = run(state, fsm.Observed(containers=()))
    assert state.phase is Phase.Wait and effects == [fsm.Deploy(spec=SPEC_A, name=None)]


def test_recovery_notices_a_stable_container_that_vanished() -> None:
    state, effects = run(stable("c1", SPEC_A), fsm.Observed(containers=()))
    assert state.phase is Phase.Wait
    assert effects[-1] == fsm.Deploy(spec=SPEC_A, name=None)


@pytest.mark.parametrize("phase", list(Phase))
def test_a_stale_deadline_changes_nothing(phase: Phase) -> None:
    state = fsm.ServiceState(phase=phase, deadline=50.0)
    assert fsm.step(state, fsm.DeadlineReached(), at(10.0)) == (state, [])


def test_with_nothing_recorded_a_running_container_of_the_desired_spec_is_adopted() -> None:
    state = fsm.ServiceState(desired=SPEC_A)  # a lost state file: only the spec is known
    mine = fsm.Seen(
        id="c1",
        name="web_c1",
        spec_hash=SPEC_A.container_hash,
        running=True,
        health="healthy",
        created_at=5.0,
    )
    other = fsm.Seen(
        id="c0", name="web_c0", spec_hash="old", running=True, health=None, created_at=4.0
    )
    state, effects = run(state, fsm.Observed(containers=(other, mine)))
    assert state.phase is Phase.Stable and state.current is not None
    assert state.current.id == "c1"
    # The older one served beside it; it is retired (with its stop timeout) as in any
    # finished [:After] deploy, not removed as a stray.
    [retire] = effects
    assert isinstance(retire, fsm.Retire) and retire.box.id == "c0" and not retire.keep
    state, effects = run(state, fsm.SpecChanged(SPEC_A))
    assert state.phase is Phase.Stable and effects == []


def gone_stable_record() -> fsm.ServiceState:
    """A restored record: Stable on SPEC_A, whose container was removed while condo was down."""
    return stable("c1", SPEC_A)


def test_a_spec_removed_while_condo_was_down_creates_nothing() -> None:
    state, effects = run(
        gone_stable_record(), fsm.Observed(containers=(), latest=fsm.SpecChanged(None))
    )
    assert state.finished
    assert not [e for e in effects if isinstance(e, fsm.Deploy)]


def test_a_spec_changed_while_condo_was_down_deploys_only_the_new_one() -> None:
    newer = attrs.evolve(SPEC_A, container={"Image": "app:9"})
    state, effects = run(
        gone_stable_record(), fsm.Observed(containers=(), latest=fsm.SpecChanged(newer))
    )
    deploys = [e for e in effects if isinstance(e, fsm.Deploy)]
    assert [d.spec for d in deploys] == [newer]
    assert state.starting == newer


@pytest.mark.parametrize("strategy", [DeployStrategy("Before"), DeployStrategy("After", 3)])
def test_with_nothing_recorded_a_container_of_another_spec_serves_until_replaced(
    strategy: DeployStrategy,
) -> None:
    # A lost (or foreign, or older-format) state file, and the spec changed meanwhile: the
    # running container is rebuilt as the Stable one, then replaced by the spec's own strategy.
    desired = attrs.evolve(SPEC_A, deploy=strategy)
    old = fsm.Seen(
        id="c0", name="web_c0", spec_hash="old", running=True, health="healthy", created_at=4.0
    )
    state, effects = run(fsm.ServiceState(desired=desired), fsm.Observed(containers=(old,)))
    assert not [e for e in effects if isinstance(e, fsm.RemoveStray)]
    assert [type(e) for e in effects] == [fsm.Deploy]
    deploy = effects[0]
    assert isinstance(deploy, fsm.Deploy) and deploy.spec == desired
    if strategy.strategy == "Before":
        # Stopped by the deploy itself, with its stop timeout, only once the new image is there.
        assert deploy.replace is not None and deploy.replace.id == "c0"
        assert state.phase is Phase.Wait
    else:
        assert deploy.replace is None
        assert state.phase is Phase.WaitNext and state.current is not None
        assert state.current.id == "c0" and state.current.hash == "old"


def test_a_failed_candidate_still_running_after_a_restart_is_stopped() -> None:
    # condo recorded the failure (write-ahead), then died before stopping the candidate.
    failed = fsm.Box(id="f1", name="web_f1", spec=SPEC_B, created_at=2.0, healthcheck=True)
    state = attrs.evolve(stable("c1", SPEC_A), phase=Phase.TryAgainNext, failed=failed)
    seen = tuple(
        fsm.Seen(id=i, name=f"web_{i}", spec_hash="h", running=True, health=None, created_at=1.0)
        for i in ("c1", "f1")
    )
    _, effects = run(state, fsm.Observed(containers=seen))
    assert effects == [fsm.Retire(box=failed, keep=True)]


@pytest.mark.parametrize(
    "event", [fsm.ContainerDied(id="c1", exit_code=1), fsm.ContainerUnhealthy("c1")]
)
def test_a_broken_container_of_a_removed_spec_is_retired_not_replaced(event: fsm.Event) -> None:
    # Found by the fault search: the spec was removed and the container died while condo was
    # down; the reconciliation must not deploy the removed spec again.
    removed = attrs.evolve(stable("c1", SPEC_A), desired=None, removed=True)
    state, effects = run(removed, event)
    assert [type(e) for e in effects] == [fsm.Retire]
    assert state.finished


def test_a_container_created_with_no_deploy_in_flight_is_a_stray() -> None:
    # Found by the fault search: a create answered after condo gave up on it.
    _, effects = run(stable("c1", SPEC_A), fsm.ContainerCreated("late"))
    assert effects == [fsm.RemoveStray(id="late", name="late")]
    # The deploy's own container, or one the state knows, is no stray.
    in_flight, _ = run(stable("c1", SPEC_A), fsm.SpecChanged(SPEC_B))
    assert run(in_flight, fsm.ContainerCreated("new"))[1] == []
    assert run(stable("c1", SPEC_A), fsm.ContainerCreated("c1"))[1] == []


def test_a_failed_candidate_that_starts_after_all_is_stopped_again() -> None:
    # Found by the fault search: a start answered after condo's timeout.
    failed = fsm.Box(id="f1", name="web_f1", spec=SPEC_B, created_at=2.0, healthcheck=True)
    state = attrs.evolve(stable("c1", SPEC_A), phase=Phase.TryAgainNext, failed=failed)
    assert run(state, fsm.ContainerRestarted("f1"))[1] == [fsm.Retire(box=failed, keep=True)]

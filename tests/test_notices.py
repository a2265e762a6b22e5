"""condo.notices: which changes of the deploy history are deploy notices, their JSON, and no
secrets in it.

Each case walks one service through the states its driver would put in the Store (built as the
fsm builds them), through the deploy history's rules (condo.deploys) as condo.history runs them,
and compares the notices, in order, with what an operator should be told.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condo import deploys, fsm
from condo.deploys import Entries
from condo.fsm import Box, Failure, Phase, ServiceState
from condo.notices import Kind, Notice, project, scrub, secrets_of
from condo.spec import DeployStrategy, ServiceSpec
from tests.fsm_explore import events_for

AT = 1_700_000_000.0
A = ServiceSpec(container={"Image": "web:1", "Env": ["TOKEN=s3cr3t-value", "MODE=on"]})
B = ServiceSpec(container={"Image": "web:2", "Env": ["TOKEN=other-secret"]})
C = ServiceSpec(container={"Image": "web:3"})
B_AFTER = ServiceSpec(container={"Image": "web:2"}, deploy=DeployStrategy("After", 5.0))


def box(spec: ServiceSpec, cid: str) -> Box:
    return Box(id=cid, name=f"web_{cid}", spec=spec, created_at=AT, healthcheck=True)


def failure(message: str) -> Failure:
    return Failure(message=message, at=AT + 1)


def stable(spec: ServiceSpec, cid: str) -> ServiceState:
    return ServiceState(phase=Phase.Stable, desired=spec, current=box(spec, cid))


def told(
    *states: ServiceState, entries: Entries = (), at: float = AT
) -> tuple[Entries, list[Notice]]:
    """Follow `states` from the first (first seen: a baseline) with the history `entries`; the
    history after them and the notices told."""
    found: list[Notice] = []
    old: ServiceState | None = None
    for new in states:
        entries, changes = deploys.advance(entries, old, new, at)
        found += project(deploys.Step("web", old, new, entries, changes, at))
        old = new
    return entries, found


def walk(
    *states: ServiceState, entries: Entries = ()
) -> list[tuple[Kind, str | None, str | None, str | None]]:
    """The notices of `states` as (kind, image, previous, error)."""
    _, found = told(*states, entries=entries)
    return [(n.kind, n.image, n.previous_image, n.error) for n in found]


def test_a_first_deploy_starts_and_turns_stable() -> None:
    init = ServiceState(desired=A)
    assert walk(
        init,
        ServiceState(phase=Phase.Wait, desired=A, starting=A),
        ServiceState(phase=Phase.Wait, desired=A, current=box(A, "a")),
        stable(A, "a"),
    ) == [(Kind.STARTED, "web:1", None, None), (Kind.STABLE, "web:1", None, None)]


def test_a_before_redeploy_names_the_previous_image() -> None:
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.Wait, desired=B, starting=B, replacing=box(A, "a")),
        ServiceState(phase=Phase.Wait, desired=B, current=box(B, "b")),
        stable(B, "b"),
    ) == [(Kind.STARTED, "web:2", "web:1", None), (Kind.STABLE, "web:2", "web:1", None)]


def test_an_after_redeploy_is_stable_once_the_old_one_is_gone() -> None:
    old = box(A, "a")
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.WaitNext, desired=B_AFTER, current=old, starting=B_AFTER),
        ServiceState(phase=Phase.WaitNext, desired=B_AFTER, current=old, next=box(B_AFTER, "b")),
        ServiceState(
            phase=Phase.WaitNext,
            desired=B_AFTER,
            current=old,
            next=box(B_AFTER, "b"),
            draining=True,
            deadline=5.0,
        ),
        stable(B_AFTER, "b"),
    ) == [(Kind.STARTED, "web:2", "web:1", None), (Kind.STABLE, "web:2", "web:1", None)]


def test_a_failing_deploy_fails_once_and_is_stable_when_a_retry_works() -> None:
    old = box(A, "a")
    first = failure("container web_b turned unhealthy")
    second = failure("container web_c died (exit 3)")
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.WaitNext, desired=B_AFTER, current=old, starting=B_AFTER),
        ServiceState(
            phase=Phase.TryAgainNext,
            desired=B_AFTER,
            current=old,
            attempt=1,
            error=first,
            deadline=10.0,
        ),
        ServiceState(
            phase=Phase.WaitNext, desired=B_AFTER, current=old, starting=B_AFTER, attempt=1
        ),
        ServiceState(
            phase=Phase.TryAgainNext,
            desired=B_AFTER,
            current=old,
            attempt=2,
            error=second,
            deadline=30.0,
        ),
        ServiceState(
            phase=Phase.WaitNext, desired=B_AFTER, current=old, starting=B_AFTER, attempt=2
        ),
        stable(B_AFTER, "b"),
    ) == [
        (Kind.STARTED, "web:2", "web:1", None),
        (Kind.FAILED, "web:2", "web:1", "container web_b turned unhealthy"),
        (Kind.STABLE, "web:2", "web:1", None),
    ]


def test_a_revert_is_announced_once_and_the_last_good_coming_back_is_a_deploy() -> None:
    good = Box(id="a", name="web_a", spec=A, created_at=AT, healthcheck=True, image_id="sha256:aaa")
    bad = ServiceSpec(container={"Image": "web:bad"}, probation=5, on_failure="revert")
    states = [ServiceState(desired=A)]

    def step(event: fsm.Event) -> None:
        state, _ = fsm.step(states[-1], event, fsm.Instant(mono=1.0, wall=AT + 1))
        states.append(state)

    step(fsm.SpecChanged(A))
    step(fsm.ContainerStarted(box=good, running=True, health="healthy"))
    step(fsm.SpecChanged(bad))
    step(fsm.ContainerStarted(box=box(bad, "x"), running=True, health="healthy"))
    step(fsm.ContainerDied(id="x", exit_code=1))
    step(
        fsm.ContainerStarted(
            box=box(states[-1].starting or bad, "b"), running=True, health="healthy"
        )
    )
    why = "container web_x died (exit 1) during its 5 s probation"
    assert walk(*states) == [
        (Kind.STARTED, "web:1", None, None),
        (Kind.STABLE, "web:1", None, None),
        (Kind.STARTED, "web:bad", "web:1", None),
        (Kind.STABLE, "web:bad", "web:1", None),
        (Kind.REVERTED, "sha256:aaa", "web:bad", why),
        (Kind.STARTED, "sha256:aaa", "web:bad", None),
        (Kind.STABLE, "sha256:aaa", "web:bad", None),
    ]


def test_a_deploy_that_fails_its_probation_is_told_failed_as_the_history_says() -> None:
    # Under :retry, backing off. The notices once had rules of their own, and told a
    # deploy.started here too: a deploy the history does not have (nothing started).
    bad = ServiceSpec(container={"Image": "web:bad"}, probation=5)
    states = [ServiceState(desired=A)]

    def step(event: fsm.Event) -> None:
        state, _ = fsm.step(states[-1], event, fsm.Instant(mono=1.0, wall=AT + 1))
        states.append(state)

    step(fsm.SpecChanged(A))
    step(fsm.ContainerStarted(box=box(A, "a"), running=True, health="healthy"))
    step(fsm.SpecChanged(bad))
    step(fsm.ContainerStarted(box=box(bad, "x"), running=True, health="healthy"))
    step(fsm.ContainerDied(id="x", exit_code=1))
    entries, found = told(*states)
    why = "container web_x died (exit 1) during its 5 s probation"
    assert [(e.image, e.outcome, e.error) for e in entries] == [
        ("web:bad", "failed", why),
        ("web:1", "replaced", None),
    ]
    assert [(n.kind, n.image, n.previous_image, n.error) for n in found] == [
        (Kind.STARTED, "web:1", None, None),
        (Kind.STABLE, "web:1", None, None),
        (Kind.STARTED, "web:bad", "web:1", None),
        (Kind.STABLE, "web:bad", "web:1", None),
        (Kind.FAILED, "web:bad", "web:1", why),
    ]


def test_a_failed_deploy_keeps_its_failure_time() -> None:
    _, [_, notice] = told(
        ServiceState(desired=B),
        ServiceState(phase=Phase.Wait, desired=B, starting=B),
        ServiceState(phase=Phase.Wait, desired=B, current=box(B, "b")),
        ServiceState(phase=Phase.TryAgain, desired=B, attempt=1, error=failure("boom")),
        at=AT + 50,
    )
    assert (notice.kind, notice.at) == (Kind.FAILED, AT + 1)


def test_a_new_spec_while_retrying_is_a_new_deploy() -> None:
    # First seen serving web:1 while web:2 fails beside it: the history records web:1 as what
    # served, so it is the new deploy's previous image.
    old = box(A, "a")
    assert walk(
        ServiceState(
            phase=Phase.TryAgainNext, desired=B, current=old, attempt=3, error=failure("x")
        ),
        ServiceState(phase=Phase.Wait, desired=C, starting=C, replacing=old),
        ServiceState(phase=Phase.Wait, desired=C, current=box(C, "c")),
        stable(C, "c"),
    ) == [(Kind.STARTED, "web:3", "web:1", None), (Kind.STABLE, "web:3", "web:1", None)]


def test_a_superseded_deploy_keeps_what_served_before_as_previous() -> None:
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.Wait, desired=B, starting=B, replacing=box(A, "a")),
        ServiceState(phase=Phase.Wait, desired=C, starting=C),
        ServiceState(phase=Phase.Wait, desired=C, current=box(C, "c")),
        stable(C, "c"),
    ) == [
        (Kind.STARTED, "web:2", "web:1", None),
        (Kind.STARTED, "web:3", "web:1", None),
        (Kind.STABLE, "web:3", "web:1", None),
    ]


def test_a_stable_container_that_broke_is_redeployed_with_the_reason() -> None:
    died = failure("container web_a died (exit 1)")
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.Wait, desired=A, starting=A, error=died),
        ServiceState(phase=Phase.Wait, desired=A, current=box(A, "a2"), error=died),
        stable(A, "a2"),
    ) == [
        (Kind.STARTED, "web:1", "web:1", "container web_a died (exit 1)"),
        (Kind.STABLE, "web:1", "web:1", None),
    ]


def test_a_container_docker_restarts_itself_is_no_news() -> None:
    restarting = ServiceState(
        phase=Phase.Stable,
        desired=A,
        current=box(A, "a"),
        deadline=30.0,
        error=failure("container web_a died (exit 1); Docker restarts it"),
    )
    assert walk(stable(A, "a"), restarting, stable(A, "a")) == []


def test_removal_is_announced_once_with_what_ran() -> None:
    leaving = ServiceState(phase=Phase.Stable, current=box(A, "a"), removed=True)
    gone = ServiceState(removed=True)
    assert walk(stable(A, "a"), leaving, gone, gone) == [(Kind.REMOVED, "web:1", None, None)]


def test_a_removal_during_a_deploy_is_a_removal() -> None:
    assert walk(
        ServiceState(desired=A),
        ServiceState(phase=Phase.Wait, desired=A, starting=A),
        ServiceState(phase=Phase.Wait, starting=A, removed=True),
        ServiceState(removed=True),
    ) == [(Kind.STARTED, "web:1", None, None), (Kind.REMOVED, None, None, None)]


def test_a_failing_service_that_is_removed_is_a_removal() -> None:
    # Its deploy failed and waits for a retry: no deploy is open, the service still goes.
    assert walk(
        stable(A, "a"),
        ServiceState(phase=Phase.Wait, desired=B, starting=B, replacing=box(A, "a")),
        ServiceState(phase=Phase.TryAgain, desired=B, attempt=1, error=failure("boom")),
        ServiceState(phase=Phase.TryAgain, attempt=1, removed=True),
        ServiceState(removed=True),
    )[-1] == (Kind.REMOVED, "web:1", None, None)


def test_a_service_that_never_served_is_removed_too() -> None:
    assert walk(
        ServiceState(desired=A),
        ServiceState(phase=Phase.TryAgain, desired=A, attempt=1, error=failure("no image")),
        ServiceState(phase=Phase.TryAgain, attempt=1, removed=True),
        ServiceState(removed=True),
    ) == [(Kind.REMOVED, None, None, None)]


def test_a_resumed_deploy_is_not_announced_again_but_ends_stable() -> None:
    # First sight after a restart: a deploy under way. Only its end is news.
    assert walk(
        ServiceState(phase=Phase.Wait, desired=B, current=box(B, "b")),
        stable(B, "b"),
        stable(B, "b"),
    ) == [(Kind.STABLE, "web:2", None, None)]


def test_an_adopted_stable_service_is_no_news() -> None:
    assert walk(ServiceState(desired=A), stable(A, "a")) == []


def test_a_restarted_condo_does_not_fail_a_failing_deploy_again() -> None:
    # The history kept across the restart knows the deploy and its first failure.
    kept, notices = told(
        ServiceState(desired=B),
        ServiceState(phase=Phase.Wait, desired=B, starting=B),
        ServiceState(phase=Phase.TryAgain, desired=B, attempt=1, error=failure("x")),
    )
    assert [n.kind for n in notices] == [Kind.STARTED, Kind.FAILED]
    retrying = ServiceState(phase=Phase.TryAgain, desired=B, attempt=2, error=failure("x"))
    assert (
        walk(
            retrying,
            ServiceState(phase=Phase.Wait, desired=B, starting=B, attempt=2),
            ServiceState(phase=Phase.TryAgain, desired=B, attempt=3, error=failure("y")),
            entries=kept,
        )
        == []
    )


# --- the body -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notice", "text"),
    [
        (
            Notice(kind=Kind.STARTED, service="web", image="web:2", previous_image="web:1", at=AT),
            "Deploying web on h1: web:2 (was web:1).",
        ),
        (
            Notice(kind=Kind.STARTED, service="web", image="web:1", error="it died", at=AT),
            "Redeploying web on h1 with web:1: it died.",
        ),
        (
            Notice(kind=Kind.STABLE, service="web", image="web:2", previous_image="web:2", at=AT),
            "web on h1 is stable on web:2.",
        ),
        (
            Notice(kind=Kind.FAILED, service="web", image="web:2", error="unhealthy", at=AT),
            "Deploy of web:2 failed for web on h1: unhealthy (retrying).",
        ),
        (
            Notice(
                kind=Kind.REVERTED,
                service="web",
                image="web:1",
                previous_image="web:2",
                error="died in probation",
                at=AT,
            ),
            "web on h1 reverted to web:1 from web:2: died in probation.",
        ),
        (
            Notice(kind=Kind.REMOVED, service="web", image="web:1", at=AT),
            "web on h1 was removed (it ran web:1).",
        ),
    ],
)
def test_each_notice_is_one_sentence(notice: Notice, text: str) -> None:
    assert notice.text("h1") == text


def test_the_json_has_exactly_the_contract_fields() -> None:
    notice = Notice(kind=Kind.FAILED, service="web", image="web:2", error="boom", at=AT)
    assert notice.to_json("h1") == {
        "event": "deploy.failed",
        "host": "h1",
        "service": "web",
        "image": "web:2",
        "previous_image": None,
        "error": "boom",
        "at": AT,
        "text": "Deploy of web:2 failed for web on h1: boom (retrying).",
    }


def test_secrets_are_every_env_value_long_enough_of_every_spec_known() -> None:
    state = ServiceState(phase=Phase.WaitNext, desired=B, current=box(A, "a"), next=box(B, "b"))
    # "on" is too short to be a secret (and would mangle every message it occurs in).
    assert secrets_of(state) == {"s3cr3t-value", "other-secret"}
    message = "create web_b: invalid value s3cr3t-value (other-secret, s3cr3t-value-2), on"
    assert scrub(message, secrets_of(state)) == (
        "create web_b: invalid value [redacted] ([redacted], [redacted]-2), on"
    )
    assert scrub("the token s3cr3t-value-long", {"s3cr3t-value", "s3cr3t-value-long"}) == (
        "the token [redacted]"
    )
    assert scrub(None, {"x"}) is None


# --- one truth: every notice is one change of the history, and back ---------------------------


@settings(max_examples=400, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(5, 40))
def test_every_notice_is_one_history_change_and_every_notified_change_one_notice(
    rng: random.Random, steps: int
) -> None:
    # A walk of the state machine (any event `events_for` offers), now and then a restart: the
    # history, kept, first sees the state again.
    state, mono = ServiceState(), 100.0
    entries: Entries = ()
    for _ in range(steps):
        if rng.random() < 0.05:  # first sight is a baseline, whatever the history catches up
            entries, changes = deploys.advance(entries, None, state, mono)
            assert project(deploys.Step("web", None, state, entries, changes, mono)) == []
            continue
        event = rng.choice(list(events_for(state)))
        if isinstance(event, fsm.DeadlineReached) and state.deadline is not None:
            mono = max(mono, state.deadline)
        new, _ = fsm.step(state, event, fsm.Instant(mono=mono, wall=mono + 1000))
        mono += 1.0
        before = entries
        entries, changes = deploys.advance(entries, state, new, mono)
        told = project(deploys.Step("web", state, new, entries, changes, mono))
        notified = _notified(before, entries)
        # The one service fact: it finished retiring (whatever its deploys' outcomes).
        notified += [(Kind.REMOVED, None, None)] if new.finished and not state.finished else []
        assert Counter(_keys(told)) == Counter(notified), (state, new)
        state = new


Key = tuple[Kind, str | None, str | None]


def _keys(notices: list[Notice]) -> list[Key]:
    """What names a notice's history change: its kind, the deploy's image and error."""
    keys: list[Key] = []
    for notice in notices:
        match notice.kind:
            case Kind.REVERTED:  # image: what serves again; the reverted deploy's is previous
                keys.append((notice.kind, notice.previous_image, notice.error))
            case Kind.REMOVED:
                keys.append((notice.kind, None, None))
            case Kind.STARTED | Kind.STABLE:
                keys.append((notice.kind, notice.image, None))
            case Kind.FAILED:
                keys.append((notice.kind, notice.image, notice.error))
    return keys


def _notified(before: Entries, after: Entries) -> list[Key]:
    """The history's changes between `before` and `after` (read from the two lists alone: entries
    are changed in place or added in front) that are news, keyed as `_keys` keys notices."""
    added = after[: len(after) - len(before)]
    pairs = [(b, a) for b, a in zip(before, after[len(added) :], strict=True) if a != b]
    started = [e for e in added if e.outcome == "deploying" and e.container is None]
    keys: list[Key] = [(Kind.STARTED, e.image, None) for e in started]
    for old, new in pairs:
        if (old.outcome, new.outcome) == ("deploying", "stable"):
            keys.append((Kind.STABLE, new.image, None))
        elif new.outcome == "reverted":
            keys.append((Kind.REVERTED, new.image, new.error))
        elif new.outcome == "failed":
            # A first attempt failed; or a deploy that served broke, told unless its spec
            # starts again (that start says why).
            first = old.outcome == "deploying" and new.attempts == 1
            broke = old.outcome == "stable" and all(e.spec_hash != new.spec_hash for e in started)
            keys += [(Kind.FAILED, new.image, new.error)] if first or broke else []
    return keys

"""The deploy history's rules (condo.deploys): scenarios driven through the real state machine,
and invariants over random walks of it."""

from __future__ import annotations

import random

import attrs
import pytest

from condo import deploys, fsm
from condo.deploys import DeployEntry, Entries
from condo.spec import DeployStrategy, ServiceSpec
from tests.fsm_explore import SPEC_A, SPEC_B, events_for

SPEC_A_BEFORE = SPEC_A  # [:Before] (the default)
SPEC_B_AFTER = SPEC_B  # [:After 5]
SPEC_D = ServiceSpec(container={"Image": "app:4"})


class Walk:
    """A service's state driven by fsm events, its history following each step."""

    def __init__(self, state: fsm.ServiceState | None = None, entries: Entries = ()) -> None:
        self.state = state or fsm.ServiceState()
        self.entries = entries
        self.mono = 100.0
        self.stabilized: list[DeployEntry] = []
        self.first = state is not None  # a restored state: the history has not seen it yet

    def at(self) -> fsm.Instant:
        return fsm.Instant(mono=self.mono, wall=self.mono + 1000.0)

    def step(self, *events: fsm.Event) -> Walk:
        for event in events:
            if self.first:
                self.observe(None)
            if isinstance(event, fsm.DeadlineReached) and self.state.deadline is not None:
                self.mono = max(self.mono, self.state.deadline)
            after, _ = fsm.step(self.state, event, self.at())
            self.observe(self.state, after)
        return self

    def observe(self, old: fsm.ServiceState | None, new: fsm.ServiceState | None = None) -> None:
        new = new or self.state
        self.entries, changes = deploys.advance(self.entries, old, new, self.at().wall)
        self.stabilized += [change.after for change in changes if change.stabilized]
        self.state = new
        self.first = False
        self.mono += 1.0

    def deploy(self, spec: ServiceSpec | None, cid: str, health: str | None = "healthy") -> Walk:
        self.step(fsm.SpecChanged(spec))
        return self.started(cid, health)

    def started(self, cid: str, health: str | None = "healthy") -> Walk:
        spec = self.state.starting
        assert spec is not None
        box = fsm.Box(id=cid, name=f"web_{cid}", spec=spec, created_at=1.0, healthcheck=True)
        return self.step(fsm.ContainerStarted(box=box, running=True, health=health))

    def outcomes(self) -> list[tuple[str, str, str | None]]:
        """(image, outcome, container) of each entry, newest first."""
        return [(e.image, e.outcome, e.container) for e in self.entries]


def test_a_first_deploy_turns_stable_once() -> None:
    walk = Walk().step(fsm.SpecChanged(SPEC_A))
    assert walk.outcomes() == [("app:1", "deploying", None)]
    [entry] = walk.entries
    assert entry.started_at == 1100.0
    assert entry.strategy == DeployStrategy("Before")
    walk.started("a1")
    [entry] = walk.entries
    assert (entry.outcome, entry.container, entry.stable_at) == ("stable", "a1", 1101.0)
    assert entry.ended_at is None and entry.error is None
    assert walk.stabilized == [entry]


def test_after_the_new_one_serves_the_old_one_is_replaced() -> None:
    walk = Walk().deploy(SPEC_A, "a1").deploy(SPEC_B_AFTER, "b1")
    # Draining: b1 is ready, a1 still serves its last 5 s.
    assert walk.outcomes() == [("app:2", "deploying", "b1"), ("app:1", "stable", "a1")]
    walk.step(fsm.DeadlineReached())
    assert walk.outcomes() == [("app:2", "stable", "b1"), ("app:1", "replaced", "a1")]
    # b1 was ready (stable_at) 5 s before a1 stopped serving (ended_at): the drain.
    new_stable_at, old_ended_at = walk.entries[0].stable_at, walk.entries[1].ended_at
    assert new_stable_at is not None and old_ended_at == new_stable_at + 5
    assert walk.entries[0].strategy == DeployStrategy("After", 5)


def test_before_a_failing_deploy_replaced_the_old_one_and_failed_itself() -> None:
    walk = Walk().deploy(SPEC_A, "a1")
    walk.step(fsm.SpecChanged(SPEC_D))
    assert walk.outcomes() == [("app:4", "deploying", None), ("app:1", "stable", "a1")]
    walk.started("d1", health=None)
    # a1 was stopped for d1: replaced, even though d1 fails later.
    assert walk.outcomes() == [("app:4", "deploying", "d1"), ("app:1", "replaced", "a1")]
    walk.step(fsm.ContainerDied(id="d1", exit_code=3))
    new, old = walk.entries
    assert (new.outcome, new.error) == ("failed", "container web_d1 died (exit 3)")
    assert new.ended_at is not None and new.stable_at is None
    assert old.outcome == "replaced" and old.error is None


def test_a_deploy_that_failed_its_probation_and_was_reverted_says_so() -> None:
    bad = ServiceSpec(container={"Image": "app:bad"}, probation=5, on_failure="revert")
    walk = Walk().deploy(SPEC_A, "a1").deploy(bad, "x1")
    assert walk.outcomes() == [("app:bad", "stable", "x1"), ("app:1", "replaced", "a1")]
    walk.step(fsm.ContainerDied(id="x1", exit_code=1))
    assert walk.outcomes()[:2] == [("app:1", "deploying", None), ("app:bad", "reverted", "x1")]
    assert walk.entries[1].error == "container web_x1 died (exit 1) during its 5 s probation"
    walk.started("a2")
    assert walk.outcomes()[:2] == [("app:1", "stable", "a2"), ("app:bad", "reverted", "x1")]


def test_an_after_deploy_reverted_before_stable_says_so_and_the_old_one_serves_on() -> None:
    bad = ServiceSpec(
        container={"Image": "app:bad"}, deploy=DeployStrategy("After", 1), on_failure="revert"
    )
    walk = Walk().deploy(SPEC_A, "a1").deploy(bad, "x1", health="starting")
    walk.step(fsm.DeadlineReached())
    assert walk.outcomes() == [("app:bad", "reverted", "x1"), ("app:1", "stable", "a1")]


def test_retries_of_a_failing_spec_are_one_entry() -> None:
    walk = Walk().deploy(SPEC_A, "a1")
    walk.step(fsm.SpecChanged(SPEC_B_AFTER))
    walk.step(fsm.DeployFailed(message="pull app:2: manifest unknown", replaced=False))
    assert walk.outcomes() == [("app:2", "failed", None), ("app:1", "stable", "a1")]
    assert walk.entries[0].error == "pull app:2: manifest unknown"
    walk.step(fsm.DeadlineReached())  # the retry
    assert walk.outcomes() == [("app:2", "deploying", None), ("app:1", "stable", "a1")]
    retry = walk.entries[0]
    assert (retry.attempts, retry.error, retry.ended_at) == (2, None, None)
    walk.step(fsm.DeployFailed(message="pull app:2: manifest unknown", replaced=False))
    assert [e.attempts for e in walk.entries] == [2, 1]
    assert walk.outcomes()[0] == ("app:2", "failed", None)


def test_a_removed_spec_ends_what_serves_as_removed() -> None:
    walk = Walk().deploy(SPEC_A, "a1").step(fsm.SpecChanged(None))
    [entry] = walk.entries
    assert (entry.outcome, entry.error) == ("removed", None)
    assert entry.ended_at is not None


def test_a_deploy_removed_before_it_is_stable_is_removed() -> None:
    walk = Walk().step(fsm.SpecChanged(SPEC_A), fsm.SpecChanged(None))
    walk.step(fsm.DeployFailed(message="superseded", replaced=False, cancelled=True))
    assert walk.outcomes() == [("app:1", "removed", None)]


def test_a_stable_container_that_dies_failed_and_its_replacement_is_a_new_entry() -> None:
    walk = Walk().deploy(SPEC_A, "a1").step(fsm.ContainerDied(id="a1", exit_code=137))
    assert walk.outcomes() == [("app:1", "deploying", None), ("app:1", "failed", "a1")]
    assert walk.entries[1].error == "container web_a1 died (exit 137)"
    walk.started("a2")
    assert walk.outcomes() == [("app:1", "stable", "a2"), ("app:1", "failed", "a1")]


def test_an_unhealthy_after_container_keeps_its_entry_beside_its_replacement() -> None:
    spec = ServiceSpec(container={"Image": "app:1"}, deploy=DeployStrategy("After", 0))
    walk = Walk().deploy(spec, "a1").step(fsm.ContainerUnhealthy("a1"))
    # Started beside the broken one (same spec): never mistaken for it.
    assert walk.outcomes() == [("app:1", "deploying", None), ("app:1", "stable", "a1")]
    walk.started("a2")
    assert walk.outcomes() == [("app:1", "stable", "a2"), ("app:1", "replaced", "a1")]


def test_a_candidate_abandoned_for_a_newer_spec_is_replaced() -> None:
    walk = Walk().step(fsm.SpecChanged(SPEC_A)).started("a1", health=None)
    walk.step(fsm.SpecChanged(SPEC_D))
    assert walk.outcomes() == [("app:4", "deploying", None), ("app:1", "replaced", "a1")]


def test_a_restart_with_the_history_lost_records_what_serves() -> None:
    served = Walk().deploy(SPEC_A, "a1").state
    walk = Walk(served)  # as a restarted condo's store first sees it, with no history
    walk.step(fsm.Observed(containers=()))  # a1 is gone meanwhile
    assert walk.outcomes() == [("app:1", "deploying", None), ("app:1", "failed", "a1")]
    assert walk.entries[1].started_at == 1.0  # the container's creation


def test_a_restart_with_the_history_kept_changes_nothing() -> None:
    before = Walk().deploy(SPEC_A, "a1")
    walk = Walk(before.state, before.entries)
    walk.observe(None)
    assert walk.entries == before.entries
    assert walk.stabilized == []


def test_a_container_adopted_from_labels_alone_gets_no_entry() -> None:
    box = fsm.Box(
        id="x", name="web_x", spec=SPEC_A, created_at=1.0, healthcheck=False, label_hash="old"
    )
    state = fsm.ServiceState(phase=fsm.Phase.Stable, desired=SPEC_A, current=box)
    entries, changes = deploys.advance((), None, state, 5.0)
    assert (entries, changes) == ((), ())


def test_the_history_keeps_the_last_fifty() -> None:
    walk = Walk()
    for n in range(60):
        spec = ServiceSpec(container={"Image": f"app:{n}"})
        walk.deploy(spec, f"c{n}")
    assert len(walk.entries) == deploys.MAX_ENTRIES
    assert walk.entries[0].image == "app:59" and walk.entries[0].outcome == "stable"
    assert walk.entries[-1].image == "app:10"


@pytest.mark.parametrize(
    ("image", "digests", "expected"),
    [
        (
            "reg:5000/app:1",
            ["other/app@sha256:1", "reg:5000/app@sha256:2"],
            "reg:5000/app@sha256:2",
        ),
        ("reg:5000/app", ["reg:5000/app@sha256:2"], "reg:5000/app@sha256:2"),
        ("app@sha256:9", ["app@sha256:9"], "app@sha256:9"),
        ("app:1", ["mirror/app@sha256:3"], "mirror/app@sha256:3"),
        ("app:1", [], None),
    ],
)
def test_the_digest_is_the_one_of_the_images_repository(
    image: str, digests: list[str], expected: str | None
) -> None:
    assert deploys.pick_digest(image, digests) == expected


@pytest.mark.parametrize(
    ("image", "digests", "expected"),
    [
        ("reg:5000/app:1", ["reg:5000/app@sha256:2"], "reg:5000/app@sha256:2"),
        ("reg:5000/app@sha256:2", ["reg:5000/app@sha256:2"], "reg:5000/app@sha256:2"),
        # The same image pushed to another repository is not where the spec pulls from.
        ("app:1", ["mirror/app@sha256:3"], None),
        ("condo-test/app:1", ["localhost:5000/condo-test/app@sha256:3"], None),
        ("app:1", [], None),
        ("sha256:aaa", ["app@sha256:3"], None),
        # Docker Hub's spellings of one repository.
        ("docker.io/library/nginx:1", ["nginx@sha256:4"], "nginx@sha256:4"),
        ("library/nginx", ["nginx@sha256:4"], "nginx@sha256:4"),
        ("docker.io/me/app:1", ["me/app@sha256:5"], "me/app@sha256:5"),
    ],
)
def test_a_revert_pins_only_the_digest_of_the_images_own_repository(
    image: str, digests: list[str], expected: str | None
) -> None:
    assert deploys.own_digest(image, digests) == expected


def test_entries_round_trip_through_json() -> None:
    walk = Walk().deploy(SPEC_A, "a1").deploy(SPEC_B_AFTER, "b1").step(fsm.DeadlineReached())
    entries = deploys.with_digest(walk.entries, "b1", "reg/app@sha256:1")
    assert entries[0].digest == "reg/app@sha256:1"
    assert tuple(DeployEntry.from_json(e.to_json()) for e in entries) == entries


@pytest.mark.parametrize(
    "change",
    [{"outcome": "exploded"}, {"strategy": []}, {"started_at": "soon"}, {"attempts": None}],
)
def test_an_unreadable_entry_is_an_entry_error(change: dict[str, object]) -> None:
    good = Walk().deploy(SPEC_A, "a1").entries[0].to_json()
    with pytest.raises(deploys.EntryError):
        DeployEntry.from_json({**good, **change})


def test_invariants_hold_on_random_walks_of_the_state_machine() -> None:
    rng = random.Random(13)
    for _ in range(300):
        walk = Walk()
        for _ in range(25):
            event = rng.choice(list(events_for(walk.state)))
            walk.step(event)
            _check(walk)


def _check(walk: Walk) -> None:
    state, entries = walk.state, walk.entries
    assert len(entries) <= deploys.MAX_ENTRIES
    assert sum(e.outcome == "deploying" for e in entries) <= 1, entries
    held = {b.id for b in (state.current, state.next, state.replacing) if b is not None}
    for entry in entries:
        assert (entry.ended_at is None) == entry.open, entry
        if entry.outcome == "stable":
            assert entry.container in held, (state, entry)
            assert entry.stable_at is not None
    serving = state.current if state.phase in deploys.SERVING else None
    if serving is not None and serving.label_hash is None:
        owners = [e for e in entries if e.outcome == "stable" and e.container == serving.id]
        assert len(owners) == 1, (state, entries)
    if state.starting is not None:
        assert any(
            e.outcome == "deploying" and e.spec_hash == state.starting.container_hash
            for e in entries
        ), (state, entries)
    # Entries never claim a container twice among the open ones.
    open_containers = [e.container for e in entries if e.open and e.container is not None]
    assert len(open_containers) == len(set(open_containers))
    assert all(attrs.has(type(e)) for e in entries)

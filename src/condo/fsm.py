"""The per-service state machine: a pure transition function, no I/O.

`step(state, event, now) -> (state, effects)` decides; the service driver (condo.service) executes
the effects against Docker, one at a time and in order, and feeds each result back as an event.
Deadlines are absolute Trio times carried in the state; the driver waits for its inbox under
`trio.move_on_at(state.deadline)` and sends `DeadlineReached` when it fires.

The phases are the original condo's states:

    Init          no container (nothing deployed yet, or everything retired)
    Wait          one candidate is starting or waiting to become Stable; nothing else serves
    TryAgain      the last attempt failed; nothing serves; retry at `deadline`
    Stable        `current` serves
    WaitNext      `current` serves while the candidate `next` starts beside it ([:After n]);
                  after `next` is Stable it drains for n seconds (`draining`)
    TryAgainNext  `current` serves; the last attempt at a new spec failed; retry at `deadline`

Invariants (checked by tests over every (phase, event) pair):
- `current` is set exactly in Wait (once started), Stable, WaitNext, TryAgainNext; `next` exactly in
  WaitNext once started. `starting` holds the spec of the one in-flight `Deploy`; while it is
  set no other `Deploy` is emitted.
- A container condo no longer needs is always retired (stopped and removed) by an effect: nothing
  leaks. The latest failed candidate alone is kept, stopped, in `failed` (for `docker logs`).
- Only a different `container_hash` redeploys; other spec changes (deploy strategy, timeouts) are
  adopted in place.
- Retries back off from 10 s, doubling to 5 min; a new spec retries at once.
- Probation (`:probation` seconds): a new container that turned Stable is `on_probation` until
  `deadline`; dying or turning unhealthy before then fails its deploy like a failed candidate
  (and Docker's RestartPolicy gets no grace). Only a completed probation resets `attempt`, so a
  spec that keeps failing its probation backs off like any failing spec.
- Revert (`:on-failure :revert`): `last_good` is the spec of the last container whose deploy
  completed its probation, pinned to the image it ran: by its registry digest (`Box.image_digest`,
  `repo@sha256:…`, which the engine can pull back if the image is removed), else by the engine's
  image id (`Box.image_id`: an image that never came from a registry), else its tag. A
  failed attempt at the desired spec, with a different last good, reverts: what still serves
  ([:After n], a [:Before] whose old container was never stopped) keeps serving, else the last
  good is deployed by its own strategy. `reverted` then blocks the desired spec's container hash:
  nothing deploys it again until the spec file's container part changes (no revert loop), and
  every deploy is of the last good (`_target`). Without a last good, a failure retries.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import attrs

from condo.spec import ServiceSpec

RETRY_FIRST_DELAY = 10.0
RETRY_MAX_DELAY = 300.0
# How long a Stable container that died may stay down while Docker's RestartPolicy is expected
# to bring it back, before condo redeploys it itself.
RESTART_GRACE = 30.0


class Phase(enum.Enum):
    """The six states of the original condo, by name."""

    Init = "Init"
    Wait = "Wait"
    TryAgain = "TryAgain"
    Stable = "Stable"
    WaitNext = "WaitNext"
    TryAgainNext = "TryAgainNext"


@attrs.frozen(kw_only=True)
class Instant:
    """A moment, both on Trio's clock (for deadlines) and on the wall clock (for display)."""

    mono: float
    wall: float

    def wall_at(self, mono: float) -> float:
        """The wall-clock time of another moment on Trio's clock."""
        return self.wall + (mono - self.mono)


@attrs.frozen(kw_only=True)
class Box:
    """A container condo created for this service."""

    id: str
    name: str
    spec: ServiceSpec
    created_at: float  # wall clock, unix seconds
    healthcheck: bool  # Docker runs a healthcheck for it (image's or spec's)
    restart_policy: str = ""
    image_id: str = ""  # the engine's id of the image it runs (unknown: "")
    # The registry digest (`repo@sha256:…`, of the spec's own repository) of the image it runs;
    # "" when unknown or when the image never came from (or went to) that registry.
    image_digest: str = ""
    stable_at: float | None = None  # wall clock, unix seconds
    # Set for a container adopted from the engine's labels alone (its record was lost): the hash
    # on its `condo.spec-hash` label. Its `spec` is then only a stand-in (the desired spec, for
    # timeouts and the deploy strategy), and the differing hash makes condo redeploy it.
    label_hash: str | None = None

    @property
    def hash(self) -> str:
        return self.label_hash or self.spec.container_hash


@attrs.frozen(kw_only=True)
class Failure:
    """The last error of a service, for the API and the log."""

    message: str
    at: float  # wall clock, unix seconds
    # The engine cannot be asked at all (condo.errors.EngineUnsupported): whatever the state
    # says was last seen before, and is not evidence of anything now (never a stale Stable).
    unobserved: bool = False
    # The spec itself cannot be deployed (its image does not exist, the engine rejects its
    # body): retrying changes nothing until somebody acts (`condo wait` fails at once).
    permanent: bool = False


@attrs.frozen(kw_only=True)
class Reverted:
    """A failed deploy of `spec_hash` (image `from_image`) was reverted to `to_image`."""

    from_image: str
    to_image: str
    reason: str
    at: float  # wall clock, unix seconds
    spec_hash: str  # the container hash not deployed again until the spec file changes


@attrs.frozen(kw_only=True)
class Seen:
    """A container of this service as the engine shows it (from list + inspect)."""

    id: str
    name: str
    spec_hash: str
    running: bool
    health: str | None
    created_at: float
    restart_policy: str = ""
    exit_code: int = 0
    # The image it runs, as `Box.image_id` / `Box.image_digest`: an adopted container pins a
    # revert to it like one condo saw start (the driver asks the digest only for containers
    # the state does not record: "" for the others).
    image_id: str = ""
    image_digest: str = ""


@attrs.frozen(kw_only=True)
class ServiceState:
    """Everything condo knows about one service. Persisted after every step."""

    phase: Phase = Phase.Init
    desired: ServiceSpec | None = None  # the latest valid spec; None once the file is removed
    removed: bool = False  # the spec file is gone: retire everything, then end
    current: Box | None = None
    next: Box | None = None
    starting: ServiceSpec | None = None  # the spec of the in-flight Deploy
    replacing: Box | None = None  # [:Before]: the stable box the in-flight Deploy retires
    draining: bool = False  # WaitNext: `next` is Stable, the old one serves its last n seconds
    deadline: float | None = None  # Trio time: health / stable-after / retry / drain / restart
    attempt: int = 0  # consecutive failed attempts
    error: Failure | None = None
    failed: Box | None = None  # the latest failed candidate, stopped, kept for `docker logs`
    on_probation: bool = False  # Stable: `current` is new and on probation until `deadline`
    last_good: ServiceSpec | None = None  # the last good deploy's spec, pinned to its image
    reverted: Reverted | None = None  # the desired spec failed and was reverted

    @property
    def retry_at(self) -> float | None:
        """The Trio time of the next retry, in TryAgain and TryAgainNext."""
        if self.phase in (Phase.TryAgain, Phase.TryAgainNext):
            return self.deadline
        return None

    @property
    def finished(self) -> bool:
        """The service's file is gone and nothing of it is left: its driver may end."""
        return self.removed and self.phase is Phase.Init and self.starting is None


# --- events -----------------------------------------------------------------------------------


@attrs.frozen
class SpecChanged:
    """The spec file has a new valid spec (or is gone, when `spec` is None)."""

    spec: ServiceSpec | None


@attrs.frozen(kw_only=True)
class ContainerStarted:
    """Result of `Deploy`: the container was created and started."""

    box: Box
    running: bool
    health: str | None


@attrs.frozen(kw_only=True)
class DeployFailed:
    """Result of `Deploy`: it failed. `replaced` says whether the box it was to replace was
    already retired; `leftover` is a created container that did not start (or None)."""

    message: str
    replaced: bool
    leftover: Box | None = None
    cancelled: bool = False  # the pull was cancelled because a newer spec arrived
    permanent: bool = False  # the spec cannot be deployed as it is (Failure.permanent)


@attrs.frozen
class ContainerHealthy:
    id: str


@attrs.frozen
class ContainerUnhealthy:
    id: str


@attrs.frozen(kw_only=True)
class ContainerDied:
    id: str
    exit_code: int


@attrs.frozen
class ContainerRestarted:
    """Docker (its RestartPolicy) started a container again."""

    id: str


@attrs.frozen
class ContainerDestroyed:
    id: str


@attrs.frozen
class ContainerCreated:
    """The engine created a container with this service's labels (ours, or a late one)."""

    id: str


@attrs.frozen(kw_only=True)
class RenameFailed:
    id: str
    message: str


@attrs.frozen(kw_only=True)
class Observed:
    """Every container of this service on the engine, after a start-up or an events gap.

    `latest` is a spec change that was waiting in the mailbox beside the resync: it is taken
    into the state *before* reconciling, so that the first action after a restart already uses
    the current spec (a spec changed or removed while condo was down never deploys its obsolete
    version first).
    """

    containers: tuple[Seen, ...]
    latest: SpecChanged | None = None


@attrs.frozen
class DeadlineReached:
    """The state's deadline passed."""


Event: TypeAlias = (
    SpecChanged
    | ContainerStarted
    | DeployFailed
    | ContainerHealthy
    | ContainerUnhealthy
    | ContainerDied
    | ContainerRestarted
    | ContainerDestroyed
    | ContainerCreated
    | RenameFailed
    | Observed
    | DeadlineReached
)


# --- effects ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Deploy:
    """Pull `spec`'s image (per its pull policy), retire `replace` if given, then create and
    start a container (named `name`, or `<service>_<random>` when None) and inspect it."""

    spec: ServiceSpec
    name: str | None
    replace: Box | None = None


@attrs.frozen(kw_only=True)
class Retire:
    """Stop `box` (grace: its spec's stop-timeout) and remove it, unless `keep`."""

    box: Box
    keep: bool = False


@attrs.frozen(kw_only=True)
class Rename:
    box: Box
    name: str


@attrs.frozen(kw_only=True)
class RemoveStray:
    """Remove a labelled container the state does not know (created before a crash)."""

    id: str
    name: str


Effect: TypeAlias = Deploy | Retire | Rename | RemoveStray
Step: TypeAlias = tuple[ServiceState, list[Effect]]


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1-based): 10 s doubling to 5 min."""
    return min(RETRY_FIRST_DELAY * 2.0 ** max(attempt - 1, 0), RETRY_MAX_DELAY)


# --- the transition function ----------------------------------------------------------------


def step(state: ServiceState, event: Event, now: Instant) -> Step:
    """Decide what `event` means for `state`: the next state and the effects to run, in order."""
    match event:
        case SpecChanged(spec):
            return _on_spec(state, spec, now)
        case ContainerStarted():
            return _on_started(state, event, now)
        case DeployFailed():
            return _on_deploy_failed(state, event, now)
        case ContainerHealthy(cid):
            return _on_healthy(state, cid, now)
        case ContainerUnhealthy(cid):
            return _on_unhealthy(state, cid, now)
        case ContainerDied(id=cid, exit_code=code):
            return _on_died(state, cid, code, now)
        case ContainerRestarted(cid):
            return _on_restarted(state, cid)
        case ContainerDestroyed(cid):
            return _on_gone(state, cid, "was removed", now)
        case ContainerCreated(cid):
            return _on_created(state, cid)
        case RenameFailed(id=cid, message=message):
            return _on_rename_failed(state, cid, message, now)
        case Observed(containers=containers, latest=latest):
            if latest is not None:
                state = _take_spec(state, latest.spec)
            return _on_observed(state, containers, now)
        case DeadlineReached():
            return _on_deadline(state, now)


# --- helpers that every handler uses ---------------------------------------------------------


def _converge(state: ServiceState, now: Instant) -> Step:
    """From a state at rest, start whatever makes it match `desired` (level-triggered)."""
    if state.starting is not None:
        return state, []  # the in-flight Deploy's result will bring us back here
    if state.removed:
        return _retire_all(state)
    desired = _target(state)
    if desired is None:
        return state, []
    match state.phase:
        case Phase.Init:
            return _deploy(state, desired, now)
        case Phase.Stable:
            assert state.current is not None
            if not _runs(state, state.current, desired):
                return _deploy(state, desired, now)
            return _rename_if_needed(_adopt_spec(state, desired))
        case Phase.Wait:
            assert state.current is not None
            if not _runs(state, state.current, desired):
                return _abandon_candidate_and_deploy(state, desired, now)
            return _adopt_spec(state, desired), []
        case Phase.WaitNext:
            assert state.current is not None
            assert state.next is not None
            if _runs(state, state.next, desired):
                return _adopt_spec(state, desired), []
            if _runs(state, state.current, desired):
                # Reverted to what already serves: drop the candidate, keep the stable one.
                back = attrs.evolve(
                    state, phase=Phase.Stable, next=None, draining=False, deadline=None
                )
                return _adopt_spec(back, desired), [Retire(box=state.next)]
            return _abandon_candidate_and_deploy(state, desired, now)
        case Phase.TryAgain | Phase.TryAgainNext:
            return state, []  # _on_spec resets the timer; the deadline redeploys


def _target(state: ServiceState) -> ServiceSpec | None:
    """The spec to run: the desired one, or the last good while the desired one is reverted."""
    desired = state.desired
    reverted = state.reverted
    if (
        desired is not None
        and reverted is not None
        and reverted.spec_hash == desired.container_hash
        and state.last_good is not None
    ):
        return state.last_good
    return desired


def _runs(state: ServiceState, box: Box, spec: ServiceSpec) -> bool:
    """`box` is a container of `spec`. The last good also counts as run by the container it was
    pinned from (a revert keeps that one serving rather than recreate it)."""
    if box.hash == spec.container_hash:
        return True
    return (
        spec == state.last_good
        and box.label_hash is None
        and pinned(box).container_hash == spec.container_hash
    )


def pinned(box: Box) -> ServiceSpec:
    """`box`'s spec pinned to the image it runs, so that a re-pushed tag cannot sneak in: by its
    registry digest, which the engine pulls again if the image was removed meanwhile; by the
    engine's image id when it has no digest (never pushed nor pulled: nothing to pull it from)."""
    image = box.image_digest or box.image_id
    if not image or box.spec.image == image:
        return box.spec
    return attrs.evolve(box.spec, container={**box.spec.container, "Image": image})


def _deploy(state: ServiceState, spec: ServiceSpec, now: Instant) -> Step:
    """Emit the Deploy for `spec`, choosing [:Before] or [:After] by the *new* spec."""
    stable = state.current if state.phase in (Phase.Stable, Phase.TryAgainNext) else None
    cleared = attrs.evolve(
        state, starting=spec, deadline=None, next=None, draining=False, on_probation=False
    )
    freed: list[Effect] = []
    failed = state.failed
    if failed is not None and failed.name in (spec.fixed_name, f"{spec.fixed_name}-next"):
        # The kept failed candidate holds the name this deploy needs: let it go first.
        freed = [Retire(box=failed)]
        cleared = attrs.evolve(cleared, failed=None)
    after, effects = _deploy_with(cleared, spec, stable)
    return after, freed + effects


def _deploy_with(cleared: ServiceState, spec: ServiceSpec, stable: Box | None) -> Step:
    if stable is None:
        return (
            attrs.evolve(cleared, phase=Phase.Wait, current=None, replacing=None),
            [Deploy(spec=spec, name=spec.fixed_name)],
        )
    if spec.deploy.strategy == "Before":
        return (
            attrs.evolve(cleared, phase=Phase.Wait, current=None, replacing=stable),
            [Deploy(spec=spec, name=spec.fixed_name, replace=stable)],
        )
    # [:After n]: start beside the stable one; a fixed :Name is taken, so use a temporary one.
    name = spec.fixed_name
    if name is not None and name == stable.name:
        name = f"{name}-next"
    return (
        attrs.evolve(cleared, phase=Phase.WaitNext, current=stable, replacing=None),
        [Deploy(spec=spec, name=name)],
    )


def _abandon_candidate_and_deploy(state: ServiceState, spec: ServiceSpec, now: Instant) -> Step:
    """A newer spec arrived while a candidate was on its way: retire it and deploy `spec`."""
    if state.phase is Phase.WaitNext:
        assert state.next is not None
        base = attrs.evolve(
            state, phase=Phase.TryAgainNext, next=None, draining=False, deadline=None
        )
        retired = [Retire(box=state.next)]
    else:
        assert state.current is not None
        base = attrs.evolve(state, phase=Phase.Init, current=None, deadline=None)
        retired = [Retire(box=state.current)]
    after, effects = _deploy(base, spec, now)
    return after, retired + effects


def _adopt_spec(state: ServiceState, spec: ServiceSpec) -> ServiceState:
    """Take a spec whose container is unchanged (deploy strategy, timeouts) into the boxes."""

    def adopt(box: Box | None) -> Box | None:
        if box is None or box.hash != spec.container_hash or box.spec == spec:
            return box
        return attrs.evolve(box, spec=spec)

    return attrs.evolve(state, current=adopt(state.current), next=adopt(state.next))


def _rename_if_needed(state: ServiceState) -> Step:
    """A Stable box started under a temporary name takes its fixed :Name once it is free.

    The new name is recorded at once; a `RenameFailed` puts the old one back.
    """
    box = state.current
    if state.phase is not Phase.Stable or box is None:
        return state, []
    fixed = box.spec.fixed_name
    if fixed is None or box.name == fixed:
        return state, []
    return attrs.evolve(state, current=attrs.evolve(box, name=fixed)), [Rename(box=box, name=fixed)]


def _fail(
    state: ServiceState,
    message: str,
    candidate: Box | None,
    now: Instant,
    failing: ServiceSpec | None = None,
    *,
    permanent: bool = False,
) -> Step:
    """The attempt failed: keep the candidate stopped for logs, back off, keep what serves.
    With `:on-failure :revert` and a last good spec, revert instead (`_reverts`)."""
    if state.removed:
        # Nobody wants it any more: no retry, no kept candidate; just clean up.
        serving = state.current if state.phase in (Phase.WaitNext, Phase.TryAgainNext) else None
        gone = attrs.evolve(
            state, starting=None, replacing=None, next=None, current=state.replacing or serving
        )
        after, cleanup = _retire_all(gone)
        return after, ([] if candidate is None else [Retire(box=candidate)]) + cleanup
    attempt = state.attempt + 1
    effects: list[Effect] = []
    failed = state.failed
    if candidate is not None:
        if failed is not None and failed.id != candidate.id:
            effects.append(Retire(box=failed))
        effects.append(Retire(box=candidate, keep=True))
        failed = candidate
    serving = state.current if state.phase in (Phase.WaitNext, Phase.TryAgainNext) else None
    if state.replacing is not None:
        serving = state.replacing  # [:Before] whose old box was never touched
    failing = failing or state.starting or (candidate.spec if candidate is not None else None)
    if failing is not None and _reverts(state, failing):
        assert state.last_good is not None
        reverted = Reverted(
            from_image=failing.image,
            to_image=serving.spec.image if serving is not None else state.last_good.image,
            reason=message,
            at=now.wall,
            spec_hash=failing.container_hash,
        )
        base = attrs.evolve(
            state,
            phase=Phase.Stable if serving is not None else Phase.Init,
            current=serving,
            next=None,
            starting=None,
            replacing=None,
            draining=False,
            on_probation=False,
            deadline=None,
            attempt=0,
            error=Failure(message=message, at=now.wall, permanent=permanent),
            failed=failed,
            reverted=reverted,
        )
        after, more = _converge(base, now)
        return after, effects + more
    phase = Phase.TryAgainNext if serving is not None else Phase.TryAgain
    return (
        attrs.evolve(
            state,
            phase=phase,
            current=serving,
            next=None,
            starting=None,
            replacing=None,
            draining=False,
            on_probation=False,
            deadline=now.mono + backoff(attempt),
            attempt=attempt,
            error=Failure(message=message, at=now.wall, permanent=permanent),
            failed=failed,
        ),
        effects,
    )


def _reverts(state: ServiceState, failing: ServiceSpec) -> bool:
    """A failure of `failing` reverts: it is the desired spec, which says `:on-failure
    :revert`, and a different last good exists (a first deploy, or the last good itself
    failing, retries)."""
    desired, good = state.desired, state.last_good
    return (
        desired is not None
        and good is not None
        and desired.on_failure == "revert"
        and failing.container_hash == desired.container_hash
        and good.container_hash != failing.container_hash
    )


def _become_stable(state: ServiceState, box: Box, now: Instant) -> Step:
    """`box` is Stable: it serves alone; the previous failure is forgotten. With a probation,
    its deploy is good only once the probation is over (`_deploy_good`)."""
    effects: list[Effect] = []
    if state.failed is not None:
        effects.append(Retire(box=state.failed))
    stable = attrs.evolve(box, stable_at=box.stable_at or now.wall)
    probation = box.spec.probation
    after = attrs.evolve(
        state,
        phase=Phase.Stable,
        current=stable,
        next=None,
        draining=False,
        deadline=now.mono + probation if probation > 0 else None,
        on_probation=probation > 0,
        error=None,
        failed=None,
    )
    if probation <= 0:
        after = _deploy_good(after)
    after, more = _converge(after, now)
    return after, effects + more


def _deploy_good(state: ServiceState) -> ServiceState:
    """The Stable container's deploy is good (its probation, if any, is over): it is the last
    good one, unless it was adopted from labels alone (its spec is unknown)."""
    current = state.current
    good = state.last_good
    if current is not None and current.label_hash is None:
        good = pinned(current)
    return attrs.evolve(state, on_probation=False, deadline=None, attempt=0, last_good=good)


def _retire_all(state: ServiceState) -> Step:
    """The spec file is gone: stop and remove every container of the service."""
    boxes = [b for b in (state.current, state.next, state.failed) if b is not None]
    return (
        attrs.evolve(
            state,
            phase=Phase.Init,
            current=None,
            next=None,
            failed=None,
            draining=False,
            on_probation=False,
            reverted=None,
            deadline=None,
            attempt=0,
            error=None,
        ),
        [Retire(box=b) for b in boxes],
    )


def _candidate(state: ServiceState) -> Box | None:
    """The container on its way to Stable (Wait's current, WaitNext's next)."""
    if state.phase is Phase.Wait:
        return state.current
    if state.phase is Phase.WaitNext:
        return state.next
    return None


def _candidate_ready(state: ServiceState, box: Box, now: Instant) -> Step:
    """The candidate passed its health check (or stable-after): promote or start draining."""
    if state.phase is Phase.Wait:
        return _become_stable(state, box, now)
    delay = box.spec.deploy.delay
    stable_next = attrs.evolve(box, stable_at=now.wall)
    if delay > 0:
        return attrs.evolve(state, next=stable_next, draining=True, deadline=now.mono + delay), []
    return _promote_next(attrs.evolve(state, next=stable_next), now)


def _promote_next(state: ServiceState, now: Instant) -> Step:
    """WaitNext is done: retire the old box, the candidate becomes the Stable one."""
    assert state.current is not None
    assert state.next is not None
    old, new = state.current, state.next
    after, effects = _become_stable(attrs.evolve(state, current=None), new, now)
    return after, [Retire(box=old), *effects]


# --- handlers ---------------------------------------------------------------------------------


def _on_spec(state: ServiceState, spec: ServiceSpec | None, now: Instant) -> Step:
    return _converge(_take_spec(state, spec), now)


def _take_spec(state: ServiceState, spec: ServiceSpec | None) -> ServiceState:
    """`spec` is now the desired one (None: the file is gone); nothing is acted on yet."""
    if spec is None:
        return attrs.evolve(state, desired=None, removed=True)
    changed = state.desired is None or state.desired.container_hash != spec.container_hash
    state = attrs.evolve(state, desired=spec, removed=False)
    if state.reverted is not None and state.reverted.spec_hash != spec.container_hash:
        # The container part changed: the reverted spec is no longer wanted; try the new one.
        state = attrs.evolve(state, reverted=None)
    if changed and state.phase in (Phase.TryAgain, Phase.TryAgainNext):
        # A new spec retries at once, with a fresh backoff.
        if state.phase is Phase.TryAgain:
            state = attrs.evolve(state, phase=Phase.Init, current=None, deadline=None, attempt=0)
        else:
            state = attrs.evolve(state, phase=Phase.Stable, deadline=None, attempt=0)
    return state


def _on_started(state: ServiceState, event: ContainerStarted, now: Instant) -> Step:
    box = event.box
    if state.starting is None:
        # Nothing was in flight (cannot happen with one driver); never leak the container.
        return state, [Retire(box=box)]
    state = attrs.evolve(state, starting=None, replacing=None)
    if not event.running:
        return _fail(state, f"container {box.name} exited at once", box, now)
    if state.phase is Phase.WaitNext:
        state = attrs.evolve(state, next=box)
    else:
        state = attrs.evolve(state, phase=Phase.Wait, current=box)
    target = _target(state)
    if state.removed or (target is not None and not _runs(state, box, target)):
        return _converge(state, now)  # a newer spec (or a removal) arrived meanwhile
    if event.health == "healthy":
        return _candidate_ready(state, box, now)
    if event.health == "unhealthy":
        return _fail(state, f"container {box.name} is unhealthy", box, now)
    if box.healthcheck:
        deadline = now.mono + box.spec.health_timeout
    else:
        deadline = now.mono + box.spec.stable_after
        if box.spec.stable_after <= 0:
            return _candidate_ready(state, box, now)
    return attrs.evolve(state, deadline=deadline), []


def _on_deploy_failed(state: ServiceState, event: DeployFailed, now: Instant) -> Step:
    if state.starting is None:
        leftovers: list[Effect] = [] if event.leftover is None else [Retire(box=event.leftover)]
        return state, leftovers
    if event.cancelled:
        # Superseded before anything was created: rest, and let the newer spec (the driver's
        # very next input) decide what to deploy.
        serving = state.replacing if not event.replaced else None
        if state.phase is Phase.WaitNext:
            serving = state.current
        base = attrs.evolve(
            state,
            phase=Phase.Stable if serving is not None else Phase.Init,
            current=serving,
            starting=None,
            replacing=None,
        )
        leftover: list[Effect] = [] if event.leftover is None else [Retire(box=event.leftover)]
        return base, leftover
    if event.replaced:
        state = attrs.evolve(state, replacing=None)
    return _fail(state, event.message, event.leftover, now, permanent=event.permanent)


def _on_healthy(state: ServiceState, cid: str, now: Instant) -> Step:
    box = _candidate(state)
    if box is None or box.id != cid or state.draining:
        return state, []
    return _candidate_ready(state, box, now)


def _on_unhealthy(state: ServiceState, cid: str, now: Instant) -> Step:
    candidate = _candidate(state)
    if candidate is not None and candidate.id == cid and not state.draining:
        return _fail(state, f"container {candidate.name} turned unhealthy", candidate, now)
    if state.phase is Phase.Stable and state.current is not None and state.current.id == cid:
        if state.on_probation:
            return _probation_failed(state, "turned unhealthy", now)
        # Docker never acts on unhealthy; condo replaces it, by the spec's own strategy.
        return _replace_broken(state, "turned unhealthy", now)
    return state, []


def _on_died(state: ServiceState, cid: str, exit_code: int, now: Instant) -> Step:
    candidate = _candidate(state)
    if candidate is not None and candidate.id == cid:
        # Even while draining: a candidate that dies is no successor; the old one keeps serving.
        return _fail(state, f"container {candidate.name} died (exit {exit_code})", candidate, now)
    current = state.current
    if current is None or current.id != cid:
        return state, []
    if state.phase is Phase.Stable:
        if state.on_probation:
            return _probation_failed(state, f"died (exit {exit_code})", now)
        if _docker_will_restart(current, exit_code):
            message = f"container {current.name} died (exit {exit_code}); Docker restarts it"
            return (
                attrs.evolve(
                    state,
                    deadline=now.mono + RESTART_GRACE,
                    error=Failure(message=message, at=now.wall),
                ),
                [],
            )
        return _replace_broken(state, f"died (exit {exit_code})", now)
    return _on_gone(state, cid, f"died (exit {exit_code})", now)


def _probation_failed(state: ServiceState, why: str, now: Instant) -> Step:
    """The new Stable container broke during its probation: its deploy failed."""
    assert state.current is not None
    box = state.current
    message = f"container {box.name} {why} during its {box.spec.probation:g} s probation"
    base = attrs.evolve(state, phase=Phase.Wait, on_probation=False, deadline=None)
    return _fail(base, message, box, now)


def _docker_will_restart(box: Box, exit_code: int) -> bool:
    policy = box.restart_policy
    return policy in ("always", "unless-stopped") or (policy == "on-failure" and exit_code != 0)


def _on_restarted(state: ServiceState, cid: str) -> Step:
    current = state.current
    if state.phase is Phase.Stable and current is not None and current.id == cid:
        if state.on_probation:
            return state, []  # the deadline ends the probation (it cannot have died in it)
        return attrs.evolve(state, deadline=None), []
    if state.failed is not None and state.failed.id == cid:
        # A failed candidate started after all (a start answered too late): stop it again.
        return state, [Retire(box=state.failed, keep=True)]
    return state, []


def _on_created(state: ServiceState, cid: str) -> Step:
    """A container of this service appeared. With no Deploy in flight and unknown to the state,
    it is a stray: a create the engine carried out after condo had given up on it."""
    known = {b.id for b in (state.current, state.next, state.failed, state.replacing) if b}
    if state.starting is not None or cid in known:
        return state, []
    return state, [RemoveStray(id=cid, name=cid[:12])]


def _replace_broken(state: ServiceState, why: str, now: Instant) -> Step:
    """The Stable container broke: start a fresh one (its own spec's strategy decides)."""
    assert state.current is not None
    broken = state.current
    failure = Failure(message=f"container {broken.name} {why}", at=now.wall)
    if state.removed:
        return _retire_all(state)  # nobody wants it any more: no replacement
    spec = _target(state) or broken.spec
    state = attrs.evolve(state, error=failure, deadline=None)
    if spec.deploy.strategy == "After" and why == "turned unhealthy":
        return _deploy(state, spec, now)  # it may still serve a little; start beside it
    base = attrs.evolve(state, phase=Phase.Init, current=None)
    after, effects = _deploy(base, spec, now)
    return after, [Retire(box=broken), *effects]


def _on_gone(state: ServiceState, cid: str, why: str, now: Instant) -> Step:
    """A container vanished or died under us (removed by hand, engine trouble)."""
    if state.failed is not None and state.failed.id == cid:
        return attrs.evolve(state, failed=None), []
    candidate = _candidate(state)
    if candidate is not None and candidate.id == cid:
        message = f"container {candidate.name} {why}"
        return _fail(_forget_candidate(state), message, None, now, failing=candidate.spec)
    current = state.current
    if current is None or current.id != cid:
        return state, []
    failure = Failure(message=f"container {current.name} {why}", at=now.wall)
    match state.phase:
        case Phase.Stable:
            base = attrs.evolve(
                state,
                phase=Phase.Init,
                current=None,
                error=failure,
                on_probation=False,
                deadline=None,
            )
            after, effects = _converge(base, now)
            return after, [RemoveStray(id=current.id, name=current.name), *effects]
        case Phase.WaitNext:
            # The old one is gone; the candidate is all there is now.
            if state.next is None:  # still being deployed
                waiting = attrs.evolve(state, phase=Phase.Wait, current=None, error=failure)
                return waiting, [RemoveStray(id=current.id, name=current.name)]
            waiting = attrs.evolve(
                state, phase=Phase.Wait, current=state.next, next=None, error=failure
            )
            dead = RemoveStray(id=current.id, name=current.name)
            if state.draining:
                after, effects = _become_stable(waiting, state.next, now)
                return after, [dead, *effects]
            return waiting, [dead]
        case Phase.TryAgainNext:
            return (
                attrs.evolve(state, phase=Phase.TryAgain, current=None, error=failure),
                [RemoveStray(id=current.id, name=current.name)],
            )
        case _:
            return state, []


def _forget_candidate(state: ServiceState) -> ServiceState:
    if state.phase is Phase.WaitNext:
        return attrs.evolve(state, next=None)
    return attrs.evolve(state, current=None)


def _on_rename_failed(state: ServiceState, cid: str, message: str, now: Instant) -> Step:
    box = state.current
    if box is None or box.id != cid:
        return state, []
    failure = Failure(message=f"cannot rename {box.name}: {message}", at=now.wall)
    # Keep the temporary name; the next convergence (a spec event, a resync) tries again.
    return attrs.evolve(state, error=failure), []


def _on_deadline(state: ServiceState, now: Instant) -> Step:
    if state.deadline is None or now.mono < state.deadline:
        return state, []  # a stale wake-up
    state = attrs.evolve(state, deadline=None)
    match state.phase:
        case Phase.TryAgain:
            return _converge(attrs.evolve(state, phase=Phase.Init, current=None), now)
        case Phase.TryAgainNext:
            return _converge(attrs.evolve(state, phase=Phase.Stable), now)
        case Phase.WaitNext if state.draining:
            return _promote_next(state, now)
        case Phase.Wait | Phase.WaitNext:
            box = _candidate(state)
            if box is None:
                return state, []
            if box.healthcheck:
                timeout = box.spec.health_timeout
                return _fail(
                    state, f"container {box.name} not healthy after {timeout:g} s", box, now
                )
            return _candidate_ready(state, box, now)
        case Phase.Stable if state.on_probation:
            return _converge(_deploy_good(state), now)
        case Phase.Stable:
            return _replace_broken(state, "died and Docker did not restart it", now)
        case Phase.Init:
            return state, []


def _on_observed(state: ServiceState, containers: tuple[Seen, ...], now: Instant) -> Step:
    """Reconcile with what the engine really has (after a restart of condo, or an events gap).

    Unknown labelled containers are strays (created just before a crash) and are removed, except
    one that the interrupted `Deploy` created, which is adopted as the candidate. With nothing
    recorded at all (a lost, foreign or older-format state file), the service is rebuilt from
    its labelled containers: a running one made from the desired spec is adopted as the
    candidate; the newest running one made from another spec is adopted as the Stable container
    it was (serving beside that candidate, in WaitNext), and the desired spec replaces it by its
    own strategy, never by removing it first.
    """
    seen = {c.id: c for c in containers}
    effects: list[Effect] = []
    known = {b.id for b in (state.current, state.next, state.failed, state.replacing) if b}
    strays = sorted((c for c in containers if c.id not in known), key=lambda c: c.created_at)
    adopted: Seen | None = None
    if (
        state.phase is Phase.Init
        and state.starting is None
        and state.desired is not None
        and not state.removed
    ):
        desired = state.desired
        running = [c for c in strays if c.running]
        older = [c for c in running if c.spec_hash != desired.container_hash]
        if older:
            # Nothing recorded, and what runs was made from another spec: it serves until the
            # desired spec replaces it.
            serving = older[-1]
            strays = [c for c in strays if c is not serving]
            adopted_box = Box(
                id=serving.id,
                name=serving.name,
                spec=desired,
                label_hash=serving.spec_hash or "unknown",
                created_at=serving.created_at,
                healthcheck=serving.health is not None,
                restart_policy=serving.restart_policy,
                stable_at=now.wall,
            )
            state = attrs.evolve(state, phase=Phase.Stable, current=adopted_box)
            if len(older) < len(running):
                # A candidate of the desired spec runs beside it ([:After n] was under way):
                # resume WaitNext, so the old one serves until the candidate is ready.
                state = attrs.evolve(state, phase=Phase.WaitNext, starting=desired)
        else:
            # Nothing recorded: a running container made from the very spec we want is adopted
            # rather than duplicated.
            state = attrs.evolve(state, phase=Phase.Wait, starting=desired)
    if state.starting is not None:
        matching = [c for c in strays if c.running and c.spec_hash == state.starting.container_hash]
        adopted = matching[-1] if matching else None
    effects += [RemoveStray(id=c.id, name=c.name) for c in strays if c is not adopted]

    if state.starting is not None:
        state, more = _resume_interrupted_deploy(state, seen, adopted, now)
        effects += more

    state = _with_engine_names(state, seen)
    unstopped: str | None = None
    for box in (state.failed, state.current, state.next):
        if box is None:
            continue
        fact = seen.get(box.id)
        if fact is None:
            state, more = _on_gone(state, box.id, "is gone", now)
        elif box is state.failed:
            unstopped = box.id if fact.running else None
            continue
        elif not fact.running:
            state, more = _on_died(state, box.id, fact.exit_code, now)
        elif fact.health == "healthy":
            state, more = _on_healthy(state, box.id, now)
        elif fact.health == "unhealthy":
            state, more = _on_unhealthy(state, box.id, now)
        else:
            continue
        effects += more
    after, more = _converge(state, now)
    if after.failed is not None and after.failed.id == unstopped:
        # Recorded as failed, but condo died before stopping it: stop it now.
        more = [Retire(box=after.failed, keep=True), *more]
    return after, effects + more


def _with_engine_names(state: ServiceState, seen: dict[str, Seen]) -> ServiceState:
    """The engine's names win (a rename interrupted by a crash, or one done by hand)."""

    def named(box: Box | None) -> Box | None:
        fact = None if box is None else seen.get(box.id)
        if box is None or fact is None or fact.name == box.name:
            return box
        return attrs.evolve(box, name=fact.name)

    return attrs.evolve(
        state, current=named(state.current), next=named(state.next), failed=named(state.failed)
    )


def _resume_interrupted_deploy(
    state: ServiceState, seen: dict[str, Seen], adopted: Seen | None, now: Instant
) -> Step:
    """condo died during a Deploy: adopt what it created, or go back to what serves."""
    spec = state.starting
    assert spec is not None
    effects: list[Effect] = []
    replacing = state.replacing
    if replacing is not None:
        fact = seen.get(replacing.id)
        if adopted is None and fact is not None and fact.running:
            # The old box was never touched: it still serves.
            back = attrs.evolve(
                state, phase=Phase.Stable, current=replacing, replacing=None, starting=None
            )
            return back, []
        if fact is not None:
            effects.append(RemoveStray(id=replacing.id, name=replacing.name))
        state = attrs.evolve(state, replacing=None)
    if adopted is not None:
        box = Box(
            id=adopted.id,
            name=adopted.name,
            spec=spec,
            created_at=adopted.created_at,
            healthcheck=adopted.health is not None,
            restart_policy=adopted.restart_policy,
            image_id=adopted.image_id,
            image_digest=adopted.image_digest,
        )
        started = ContainerStarted(box=box, running=True, health=adopted.health)
        after, more = _on_started(state, started, now)
        return after, effects + more
    if state.phase is Phase.WaitNext and state.current is not None:
        return attrs.evolve(state, phase=Phase.Stable, starting=None), effects
    return attrs.evolve(state, phase=Phase.Init, current=None, starting=None), effects

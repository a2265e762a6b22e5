"""Deploy notices: what a change of one service's state means for the people watching (pure).

Owns the rules that turn consecutive states of one service (`fsm.ServiceState`, as the Store
holds them after every step) into notices for `--notify` receivers, the notices' JSON body
(doc/contract.md "Notifications") and the scrubbing that keeps secrets out of it. No I/O and no
clock: the caller (condo.notify) passes the wall-clock time in.

One *deploy* is the attempts at one container hash (the `target`): it starts once, fails at most
once (its retries back off quietly; /v1/state and the log show every attempt) and ends Stable,
replaced by a newer deploy, or removed with the service. The rules, per step from `old` to `new`:

- `deploy.started`   a new target is being deployed (from rest, or superseding another
                     target); a Stable container that broke and is being replaced by its own
                     spec is a new deploy too, with the breakage as `error`.
- `deploy.failed`    the current target's first failed attempt (TryAgain / TryAgainNext).
- `deploy.stable`    the service is Stable again while a deploy was under way.
- `service.removed`  the spec file is gone and every container of the service is retired.
- `deploy.reverted`  the current target failed and `:on-failure :revert` went back to the last
                     good spec (`ServiceState.reverted` is new): `image` is what serves again,
                     `previous_image` the failed one. It ends that deploy (no deploy.failed);
                     bringing the last good back, when it must be recreated, is a deploy of its
                     own (deploy.started, then deploy.stable).

The first state seen of a service is a baseline, never a notice: after a restart condo does not
announce what it merely adopted (a deploy it resumes still ends with `deploy.stable`).

Invariant: a notice carries an image reference, an error message and names, never a spec's
`Env` or labels; error messages are scrubbed of every Env value of the service's specs and of
the tokens condo was given (`scrub`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from condo.fsm import Box, Phase, ServiceState
from condo.spec import ServiceSpec

# Env values shorter than this are not scrubbed: "1", "on" or "dev" would mangle every message
# they occur in, and are no secrets.
MIN_SECRET_LENGTH = 4
REDACTED = "[redacted]"

_RETRYING = (Phase.TryAgain, Phase.TryAgainNext)


class Kind(enum.Enum):
    """The notices condo sends (the JSON's `event`)."""

    STARTED = "deploy.started"
    STABLE = "deploy.stable"
    FAILED = "deploy.failed"
    REVERTED = "deploy.reverted"
    REMOVED = "service.removed"


@attrs.frozen(kw_only=True)
class Notice:
    """One notice about one service, before the host and the text are added."""

    kind: Kind
    service: str
    image: str | None
    previous_image: str | None = None
    error: str | None = None
    at: float  # wall clock, unix seconds

    def text(self, host: str) -> str:
        """One human sentence (what Slack and Mattermost incoming webhooks show)."""
        where = f"{self.service} on {host}"
        was = (
            f" (was {self.previous_image})"
            if self.previous_image and self.previous_image != self.image
            else ""
        )
        because = f": {self.error}" if self.error else ""
        match self.kind:
            case Kind.STARTED if self.error:
                return f"Redeploying {where} with {self.image}{because}."
            case Kind.STARTED:
                return f"Deploying {where}: {self.image}{was}."
            case Kind.STABLE:
                return f"{where} is stable on {self.image}{was}."
            case Kind.FAILED:
                return f"Deploy of {self.image} failed for {where}{because} (retrying)."
            case Kind.REVERTED:
                return f"{where} reverted to {self.image} from {self.previous_image}{because}."
            case Kind.REMOVED:
                ran = f" (it ran {self.image})" if self.image else ""
                return f"{where} was removed{ran}."

    def to_json(self, host: str) -> dict[str, Any]:
        """The body POSTed to every receiver."""
        return {
            "event": self.kind.value,
            "host": host,
            "service": self.service,
            "image": self.image,
            "previous_image": self.previous_image,
            "error": self.error,
            "at": self.at,
            "text": self.text(host),
        }


@attrs.frozen(kw_only=True)
class Track:
    """What the rules remember of one service between steps."""

    target: str | None = None  # container hash of the deploy under way (None at rest)
    image: str | None = None  # its image
    previous_image: str | None = None  # what served when it started
    failed: bool = False  # its deploy.failed was sent
    serving_hash: str | None = None  # the last Stable container's hash and image
    serving_image: str | None = None
    removed: bool = False  # service.removed was sent


def baseline(state: ServiceState) -> Track:
    """The track of a service first seen in `state` (no notice for it)."""
    track = _at_rest(Track(), state)
    target = _target(state)
    if target is None:
        return track
    return attrs.evolve(
        track,
        target=target.container_hash,
        image=target.image,
        previous_image=track.serving_image,
        failed=state.phase in _RETRYING,
        removed=state.finished,
    )


def follow(
    service: str, track: Track, old: ServiceState, new: ServiceState, at: float
) -> tuple[Track, list[Notice]]:
    """The notices of one step of `service` from `old` to `new` (at wall time `at`)."""
    notices: list[Notice] = []
    if new.finished:
        if not track.removed:
            notices.append(
                Notice(kind=Kind.REMOVED, service=service, image=track.serving_image, at=at)
            )
        return attrs.evolve(track, target=None, failed=False, removed=True), notices
    track = attrs.evolve(track, removed=False)
    reverted = new.reverted
    if reverted is not None and reverted != old.reverted:
        notices.append(
            Notice(
                kind=Kind.REVERTED,
                service=service,
                image=reverted.to_image,
                previous_image=reverted.from_image,
                error=reverted.reason,
                at=reverted.at,
            )
        )
        track = attrs.evolve(track, target=None, image=None, previous_image=None, failed=False)
    target = _target(new)
    if target is not None and target.container_hash != track.target:
        # A new deploy: from rest (previous = what served), or superseding one under way (the
        # previous image stays what served before the first of them).
        previous = track.previous_image if track.target is not None else track.serving_image
        broken = target.container_hash == track.serving_hash and track.target is None
        error = new.error.message if broken and new.error is not None else None
        track = attrs.evolve(
            track,
            target=target.container_hash,
            image=target.image,
            previous_image=previous,
            failed=False,
        )
        notices.append(
            Notice(
                kind=Kind.STARTED,
                service=service,
                image=target.image,
                previous_image=previous,
                error=error,
                at=at,
            )
        )
    attempt_failed = new.phase in _RETRYING and (
        old.phase not in _RETRYING or new.attempt > old.attempt
    )
    if attempt_failed and track.target is not None and not track.failed:
        notices.append(
            Notice(
                kind=Kind.FAILED,
                service=service,
                image=track.image,
                previous_image=track.previous_image,
                error=None if new.error is None else new.error.message,
                at=new.error.at if new.error is not None else at,
            )
        )
        track = attrs.evolve(track, failed=True)
    if new.phase is Phase.Stable and new.current is not None and track.target is not None:
        image = new.current.spec.image
        notices.append(
            Notice(
                kind=Kind.STABLE,
                service=service,
                image=image,
                previous_image=track.previous_image,
                at=at,
            )
        )
        track = attrs.evolve(track, target=None, image=None, previous_image=None, failed=False)
    return _at_rest(track, new), notices


def _target(state: ServiceState) -> ServiceSpec | None:
    """The spec being deployed (or retried) in `state`; None at rest."""
    if state.finished:
        return None
    if state.starting is not None:
        return state.starting
    candidate = _box_spec(state.current if state.phase is Phase.Wait else None)
    if state.phase is Phase.WaitNext:
        candidate = _box_spec(state.next)
    if state.phase in (Phase.Wait, Phase.WaitNext, *_RETRYING):
        return candidate or state.desired
    return None


def _box_spec(box: Box | None) -> ServiceSpec | None:
    # A box adopted from labels alone carries a stand-in spec whose hash is not its own.
    if box is None or box.label_hash is not None:
        return None
    return box.spec


def _at_rest(track: Track, state: ServiceState) -> Track:
    """Remember what serves, once it serves Stable."""
    if state.phase is not Phase.Stable or state.current is None:
        return track
    return attrs.evolve(
        track, serving_hash=state.current.hash, serving_image=state.current.spec.image
    )


# --- secrets ----------------------------------------------------------------------------------


def secrets_of(state: ServiceState) -> set[str]:
    """Every Env value (of MIN_SECRET_LENGTH or more) of every spec `state` knows."""
    specs = [state.desired, state.starting]
    specs += [box.spec for box in (state.current, state.next, state.failed, state.replacing) if box]
    found: set[str] = set()
    for spec in specs:
        if spec is not None:
            found |= _env_values(spec.container)
    return found


def _env_values(container: Mapping[str, Any]) -> set[str]:
    env = container.get("Env")
    if not isinstance(env, list):
        return set()
    values = (str(item).partition("=")[2] for item in env)
    return {value for value in values if len(value) >= MIN_SECRET_LENGTH}


def scrub(text: str | None, secrets: Iterable[str]) -> str | None:
    """`text` with every secret replaced by `[redacted]` (longest first, so that a secret that
    contains another is not left half visible)."""
    if text is None:
        return None
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text

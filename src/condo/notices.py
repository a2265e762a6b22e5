"""Deploy notices: a service's deploy history's changes told to the people watching (pure).

Owns which changes of the deploy history (condo.deploys: the one set of rules that decides a
deploy started, turned stable, failed, was reverted or removed) are news for `--notify`
receivers, the notices' JSON body (doc/contract.md "Notifications") and the scrubbing that keeps
secrets out of it. No I/O and no clock: `project` is handed one `deploys.Step`.

The projection, per change of one step (an entry before → after):

- `deploy.started`   a deploy the state started (`Change.started`: a new entry, not a retry of
                     a failed one, not a container the history adopted); when it redeploys the
                     spec that served (a container that broke), `error` is the state's why.
- `deploy.failed`    an entry turned `failed`: a deploy's first attempt (its retries reopen the
                     entry and fail quietly: /v1/state and the log show every attempt), or a
                     deploy that served and broke, unless its spec is redeployed in the same
                     step (that `deploy.started` says why).
- `deploy.stable`    an entry turned from `deploying` to `stable`.
- `deploy.reverted`  an entry turned `reverted`: `image` is what serves again
                     (`ServiceState.reverted`), `previous_image` the failed one.
- `service.removed`  the step in which the service finished retiring (its spec file is gone and
                     every container of it is removed), whatever its deploys' outcomes (a
                     service that never served, or was failing, is removed too); `image` is
                     what served last. A service fact, not an entry's change: the only one.

`previous_image` is what served before: the image of the newest older entry that turned stable.
The first state seen of a service (`old` None) is a baseline, never a notice: after a restart
condo does not announce what the history merely catches up with (a deploy it resumes still ends
with `deploy.stable`).

Invariant: a notice carries an image reference, an error message and names, never a spec's
`Env` or labels; error messages are scrubbed of every Env value of the service's specs and of
the tokens condo was given (`scrub`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from condo.deploys import Change, DeployEntry, Entries, Step
from condo.fsm import ServiceState

# Env values shorter than this are not scrubbed: "1", "on" or "dev" would mangle every message
# they occur in, and are no secrets.
MIN_SECRET_LENGTH = 4
REDACTED = "[redacted]"


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


def project(step: Step) -> list[Notice]:
    """The notices of one step of a service: its history's changes in it."""
    if step.old is None:
        return []
    restarted = {c.after.spec_hash for c in step.changes if c.started}
    broken = [c.after for c in step.changes if _broke(c)]
    error, reverted = step.new.error, step.new.reverted
    found: list[Notice] = []
    # Oldest first: what ended or turned stable, then what started.
    for change in reversed(step.changes):
        entry = change.after
        served = _served_before(step.entries, entry)
        base = Notice(
            kind=Kind.STARTED,
            service=step.service,
            image=entry.image,
            previous_image=None if served is None else served.image,
            at=step.at,
        )
        if change.started:
            again = error is not None and _redeploys(entry, served, broken)
            found.append(attrs.evolve(base, error=error.message if again and error else None))
        elif change.stabilized:
            found.append(attrs.evolve(base, kind=Kind.STABLE))
        elif entry.outcome == "failed" and _failed(change, restarted):
            when = step.at if error is None else error.at
            found.append(attrs.evolve(base, kind=Kind.FAILED, error=entry.error, at=when))
        elif entry.outcome == "reverted":
            image, when = (None, step.at) if reverted is None else (reverted.to_image, reverted.at)
            found.append(
                attrs.evolve(
                    base,
                    kind=Kind.REVERTED,
                    image=image,
                    previous_image=entry.image,
                    error=entry.error,
                    at=when,
                )
            )
    if step.new.finished and not step.old.finished:
        last = _served_before(step.entries, None)
        image = None if last is None else last.image
        found.append(Notice(kind=Kind.REMOVED, service=step.service, image=image, at=step.at))
    return found


def _failed(change: Change, restarted: set[str]) -> bool:
    """A deploy's first attempt failed (its retries reopen the entry and fail quietly), or a
    deploy that served broke and is not redeployed in the same step (that deploy says why)."""
    if _broke(change):
        return change.after.spec_hash not in restarted
    return change.after.attempts == 1


def _broke(change: Change) -> bool:
    """A deploy that served failed."""
    was = None if change.before is None else change.before.outcome
    return was == "stable" and change.after.outcome == "failed"


def _redeploys(entry: DeployEntry, served: DeployEntry | None, broken: list[DeployEntry]) -> bool:
    """`entry` deploys again the spec that serves, or served until it broke in this step: the
    state's error says why."""
    if served is None or served.spec_hash != entry.spec_hash:
        return False
    return served.outcome == "stable" or served in broken


def _served_before(entries: Entries, entry: DeployEntry | None) -> DeployEntry | None:
    """The newest entry older than `entry` (any, when None) that turned stable: what served."""
    older = entries
    if entry is not None:
        index = next((i for i, e in enumerate(entries) if e is entry), len(entries))
        older = entries[index + 1 :]
    return next((e for e in older if e.stable_at is not None), None)


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

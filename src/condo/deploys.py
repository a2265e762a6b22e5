"""The deploy history's entries, and the rules that derive them from a service's states (pure).

A DEPLOY (doc/contract.md, `GET /v1/history`) is one spec's container on its way to serving, then
serving, then gone: `image`, `digest`, `spec_hash`, `strategy`, `started_at`, `stable_at`,
`ended_at`, `outcome`, `error`, plus `attempts` and `container` (extensions). `advance(entries,
old, new, at)` turns one transition of a `ServiceState` into the service's new entries (newest
first) and the `Change`s of the step; it needs nothing else, so the history can be rebuilt from
any sequence of states, including the first one a restarted condo sees. These rules are the only
ones that decide a deploy started, turned stable, failed, was reverted or removed: the `--notify`
notices are told from the changes (condo.notices), never from the states.

The rules are level-triggered: each open entry (`deploying`, `stable`) is checked against the new
state alone, and the old state only tells a fresh error from one that was already there.

- A deploy starts when the state starts one (`starting`): a new `deploying` entry, unless the
  newest entry is a failed attempt of the same spec that never turned Stable: the retry reopens
  it (`attempts` + 1), so retries of a bad spec cannot push what serves out of the history.
- `deploying` follows its candidate container (`container`) and turns `stable` when the state
  serves it alone (`Stable`, or serving beside a later candidate), with the registry digest its
  container's record carries (`Box.image_digest`, what a revert pins to); without one, the
  digest is filled in later by whoever asks the engine (`with_digest`): `Change.stabilized`
  tells the entries that just turned stable.
- An open entry that the state no longer holds ends (`ended_at`): `removed` when the spec file
  is gone; `failed` (with the error) when the step brought a fresh error or a retry timer, unless
  a newer deploy was replacing it; `replaced` otherwise (a newer deploy took its place).
- A container the state serves or tries that no entry knows (a lost history file) gets one, from
  what the state says of it; a container adopted from labels alone (its spec unknown) gets none.
- At most `MAX_ENTRIES` per service, newest first.

- A deploy whose failure the step reverted (`ServiceState.reverted`, fresh, of its spec) ends
  `reverted` (with the error) rather than `failed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, cast, get_args

import attrs

from condo.fsm import Box, Phase, Reverted, ServiceState
from condo.spec import DeployStrategy, ServiceSpec

MAX_ENTRIES: Final = 50

Outcome = Literal["deploying", "stable", "replaced", "failed", "reverted", "removed"]
OUTCOMES: Final[tuple[str, ...]] = get_args(Outcome)
OPEN: Final = frozenset({"deploying", "stable"})
# The phases in which `current` serves.
SERVING: Final = frozenset({Phase.Stable, Phase.WaitNext, Phase.TryAgainNext})


class EntryError(ValueError):
    """A stored entry cannot be read back."""


@attrs.frozen(kw_only=True)
class DeployEntry:
    """One deploy of one spec (its retries included)."""

    image: str
    spec_hash: str
    strategy: DeployStrategy
    started_at: float  # wall clock, unix seconds
    outcome: Outcome = "deploying"
    digest: str | None = None  # the engine's RepoDigests entry for the image it ran
    stable_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    attempts: int = 1
    container: str | None = None  # the id of the container this deploy made (the last one)

    @property
    def open(self) -> bool:
        return self.outcome in OPEN

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "digest": self.digest,
            "spec_hash": self.spec_hash,
            "strategy": self.strategy.to_json(),
            "started_at": self.started_at,
            "stable_at": self.stable_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "error": self.error,
            "attempts": self.attempts,
            "container": self.container,
        }

    @classmethod
    def from_json(cls, data: Any) -> DeployEntry:
        """Read an entry back; EntryError when it is not one."""
        try:
            outcome = str(data["outcome"])
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            strategy = data["strategy"]
            return cls(
                image=str(data["image"]),
                digest=_optional_str(data["digest"]),
                spec_hash=str(data["spec_hash"]),
                strategy=DeployStrategy(strategy[0], *strategy[1:]),
                started_at=float(data["started_at"]),
                stable_at=_optional_float(data["stable_at"]),
                ended_at=_optional_float(data["ended_at"]),
                outcome=cast("Outcome", outcome),
                error=_optional_str(data["error"]),
                attempts=int(data["attempts"]),
                container=_optional_str(data["container"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EntryError(f"unreadable history entry: {exc!r}") from exc


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


Entries = tuple[DeployEntry, ...]


@attrs.frozen
class Change:
    """One entry's change in one step: `before` is None for an entry the step added."""

    before: DeployEntry | None
    after: DeployEntry

    @property
    def started(self) -> bool:
        """A deploy the state started: a new entry with no container yet (one the history
        finds already running, adopted or its history lost, has its container)."""
        return (
            self.before is None
            and self.after.outcome == "deploying"
            and self.after.container is None
        )

    @property
    def stabilized(self) -> bool:
        """A deploy under way turned stable (its digest is asked for unless it came along)."""
        was = None if self.before is None else self.before.outcome
        return was == "deploying" and self.after.outcome == "stable"


@attrs.frozen
class Step:
    """One step of a service and its entries' changes in it (what the history tells)."""

    service: str
    old: ServiceState | None  # None: the first state seen of the service
    new: ServiceState
    entries: Entries  # after the step
    changes: tuple[Change, ...]
    at: float  # its wall time


def advance(
    entries: Entries, old: ServiceState | None, new: ServiceState, at: float
) -> tuple[Entries, tuple[Change, ...]]:
    """The service's entries after the step `old` → `new` (at wall time `at`), and what changed
    in it (newest first)."""
    fresh = new.error is not None and (old is None or old.error != new.error)
    reverted = new.reverted
    if reverted is not None and old is not None and old.reverted == reverted:
        reverted = None  # reverted in an earlier step
    replacing = None if old is None or old.replacing is None else old.replacing.id
    held = {b.id for b in (new.current, new.next, new.replacing) if b is not None}
    candidate = _candidate(new)
    serving = new.current if new.phase in SERVING else None
    # A container that serves under a stable entry is that entry's: a redeploy of the same spec
    # (a broken container replaced beside itself) is never mistaken for it.
    owned = {e.container for e in entries if e.outcome == "stable" and e.container in held}
    result: list[DeployEntry] = []
    for entry in entries:
        if entry.outcome == "stable":
            if entry.container not in held:
                cause = "replaced" if entry.container == replacing else _cause(new, fresh)
                entry = _ended(entry, _or_reverted(cause, entry, reverted), new, at)
        elif entry.outcome == "deploying":
            if serving is not None and serving.id not in owned and _made(entry, serving):
                entry = attrs.evolve(
                    entry,
                    outcome="stable",
                    container=serving.id,
                    stable_at=serving.stable_at or at,
                    error=None,
                    digest=serving.image_digest or entry.digest,
                )
            elif candidate is not None and _made(entry, candidate):
                entry = attrs.evolve(entry, container=candidate.id)
            elif new.starting is None or new.starting.container_hash != entry.spec_hash:
                failed = new.phase in (Phase.TryAgain, Phase.TryAgainNext)
                cause = "failed" if failed else _cause(new, fresh)
                entry = _ended(entry, _or_reverted(cause, entry, reverted), new, at)
        result.append(entry)
    result = _unknown(_started(result, new, at), serving, candidate, at)
    # Entries are only changed in place or added in front: the step's changes, by position.
    added = len(result) - len(entries)
    changes = [Change(None, entry) for entry in result[:added]]
    changes += [Change(b, a) for b, a in zip(entries, result[added:], strict=True) if a != b]
    return tuple(result[:MAX_ENTRIES]), tuple(changes)


def with_digest(entries: Entries, container: str, digest: str | None) -> Entries:
    """`entries` with `digest` set on the entry of `container`."""
    return tuple(attrs.evolve(e, digest=digest) if e.container == container else e for e in entries)


def pick_digest(image: str, repo_digests: Sequence[str]) -> str | None:
    """The RepoDigests entry of `image`'s repository (an image pushed to several has several),
    else the first one; None for an image that never came from a registry."""
    own = own_digest(image, repo_digests)
    if own is not None:
        return own
    return repo_digests[0] if repo_digests else None


def own_digest(image: str, repo_digests: Sequence[str]) -> str | None:
    """The RepoDigests entry of `image`'s own repository, or None: what a revert pins to. Never
    another repository's (the same image pushed elsewhere): a pin must pull from where the spec
    says, with that registry's credentials."""
    repository = _repository(image)
    for digest in repo_digests:
        if _repository(digest) == repository:
            return digest
    return None


def _repository(reference: str) -> str:
    """The repository of an image reference, without tag or digest, in one spelling for Docker
    Hub (`nginx`, `library/nginx`, `docker.io/library/nginx` are one)."""
    repository = reference.partition("@")[0]
    slash, colon = repository.rfind("/"), repository.rfind(":")
    if colon > slash:
        repository = repository[:colon]
    for hub in ("docker.io/", "index.docker.io/"):
        repository = repository.removeprefix(hub)
    return repository.removeprefix("library/")


def document(entries: Mapping[str, Entries]) -> dict[str, list[dict[str, Any]]]:
    """`{name: [DEPLOY...]}`, names sorted, entries newest first."""
    return {name: [e.to_json() for e in entries[name]] for name in sorted(entries)}


# --- the rules' parts -------------------------------------------------------------------------


def _candidate(state: ServiceState) -> Box | None:
    """The container on its way to Stable."""
    if state.phase is Phase.Wait:
        return state.current
    if state.phase is Phase.WaitNext:
        return state.next
    return None


def _made(entry: DeployEntry, box: Box) -> bool:
    """`box` is this deploy's container (a candidate not yet known to it is matched by spec)."""
    if entry.container is not None:
        return entry.container == box.id
    return box.label_hash is None and box.hash == entry.spec_hash


def _cause(state: ServiceState, fresh_error: bool) -> Outcome:
    if state.removed:
        return "removed"
    return "failed" if fresh_error else "replaced"


def _or_reverted(cause: Outcome, entry: DeployEntry, reverted: Reverted | None) -> Outcome:
    """A failure that the step reverted is the outcome `reverted`."""
    if cause == "failed" and reverted is not None and reverted.spec_hash == entry.spec_hash:
        return "reverted"
    return cause


def _ended(entry: DeployEntry, outcome: Outcome, state: ServiceState, at: float) -> DeployEntry:
    failed = outcome in ("failed", "reverted")
    error = state.error.message if failed and state.error is not None else None
    return attrs.evolve(entry, outcome=outcome, ended_at=at, error=error)


def _started(entries: list[DeployEntry], state: ServiceState, at: float) -> list[DeployEntry]:
    """A deploy the state starts and no open entry follows: a new entry, or a retry."""
    spec = state.starting
    if spec is None or any(
        e.outcome == "deploying" and e.spec_hash == spec.container_hash for e in entries
    ):
        return entries
    newest = entries[0] if entries else None
    if (
        newest is not None
        and newest.outcome == "failed"
        and newest.spec_hash == spec.container_hash
        and newest.stable_at is None
    ):
        retry = attrs.evolve(
            newest,
            outcome="deploying",
            attempts=newest.attempts + 1,
            ended_at=None,
            error=None,
            container=None,
            strategy=spec.deploy,
        )
        return [retry, *entries[1:]]
    return [_entry(spec, at), *entries]


def _unknown(
    entries: list[DeployEntry], serving: Box | None, candidate: Box | None, at: float
) -> list[DeployEntry]:
    """Containers the state holds that no open entry knows (the history was lost)."""
    known = {e.container for e in entries if e.open}
    # A deploy whose container is not known yet (a candidate met in the step that started it).
    expected = {e.spec_hash for e in entries if e.outcome == "deploying" and e.container is None}
    for box, outcome in ((serving, "stable"), (candidate, "deploying")):
        if box is None or box.id in known or box.label_hash is not None or box.hash in expected:
            continue
        entry = attrs.evolve(
            _entry(box.spec, box.created_at),
            outcome=cast("Outcome", outcome),
            container=box.id,
            stable_at=(box.stable_at or at) if outcome == "stable" else None,
            digest=(box.image_digest or None) if outcome == "stable" else None,
        )
        entries = [entry, *entries]
    return entries


def _entry(spec: ServiceSpec, at: float) -> DeployEntry:
    return DeployEntry(
        image=spec.image, spec_hash=spec.container_hash, strategy=spec.deploy, started_at=at
    )

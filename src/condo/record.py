"""The outside JSON shape of a service's state: the state file record and the API view.

One module owns both directions so that what condo writes it can always read back:

- `to_record(state, now)` / `from_record(data, now)`: the state file. Trio-clock deadlines are
  stored as wall-clock unix seconds and turned back into Trio times on load (a past retry time
  fires at once). Everything else round-trips exactly.
- `state_document(host, records, self_deploy)` / `read_document(document, host, now)`: the state
  file's envelope (`version`, `host`, `services`, `self`). Records are only ever read from a file
  of the same host and this version (`ForeignDocument` otherwise): anything else belongs to
  somebody else (another `--host` sharing the path, a condo of another version) and its records
  must not steer this one.
- `StateEncoder`: the state file's bytes, re-encoding only the records whose state changed.
- `to_view(state, now, spec_error)`: a SERVICE object of the HTTP API (doc/contract.md): `state`,
  `current`, `next`, `retry_at`, `error`, `spec_error`, plus condo's extensions.

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from condo.errors import SpecError
from condo.fsm import Box, Failure, Instant, Phase, Reverted, ServiceState, pinned
from condo.routes import listener_views
from condo.spec import ServiceSpec

RECORD_VERSION = 1


class RecordError(ValueError):
    """A stored record cannot be read back (written by another version, or damaged)."""


class ForeignDocument(ValueError):
    """A state file this condo may not read its records from (`reason` says whose it is)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Restored:
    """What a state file gives a starting condo (nothing, for a missing file)."""

    records: dict[str, ServiceState] = attrs.Factory(dict)
    # The last self-deploy (`"self"`: hash, state, error), remembered across restarts.
    self_deploy: Mapping[str, Any] | None = None
    # Records that could not be read back, with why: dropped (the engine's labels remain).
    dropped: dict[str, str] = attrs.Factory(dict)


def state_document(
    host: str, records: dict[str, Any], self_deploy: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The whole state file: the envelope around every service's record."""
    document: dict[str, Any] = {"version": RECORD_VERSION, "host": host, "services": records}
    if self_deploy is not None:
        # A failed self-deploy is remembered across restarts (not retried until it changes).
        document["self"] = dict(self_deploy)
    return document


def nested_json(value: object, depth: int) -> str:
    """`value` as it appears `depth` levels deep in the state file (condo.persist.encode_state:
    two-space indent, UTF-8 as is, no NaN). JSON text has no raw newline inside a string, so
    indenting every line after the first is nesting it."""
    text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    return text.replace("\n", "\n" + "  " * depth) if depth else text


class StateEncoder:
    """The state file's bytes: exactly `persist.encode_state(state_document(...))`, but each
    record is encoded again only when its service's state is another object (or carries a
    deadline: its wall-clock form moves with `now`).

    Why: JSON with an indent is CPython's pure-Python encoder, about 0.1 ms per record; the
    state is written before every Docker call (write-ahead), so with 200 services each write
    re-encoded 200 unchanged records in the Trio thread (~25 ms) ahead of the one that changed.
    """

    def __init__(self) -> None:
        self._fragments: dict[str, tuple[ServiceState, str]] = {}
        self.encoded = 0  # records encoded so far (tests count them)

    def encode(
        self,
        host: str,
        states: Iterable[tuple[str, ServiceState]],
        self_deploy: Mapping[str, Any] | None,
        now: Instant,
    ) -> bytes:
        fragments: dict[str, tuple[ServiceState, str]] = {}
        for name, state in states:
            cached = self._fragments.get(name)
            if cached is not None and cached[0] is state and state.deadline is None:
                fragments[name] = cached
            else:
                fragments[name] = (state, nested_json(to_record(state, now), 2))
                self.encoded += 1
        self._fragments = fragments
        services = (
            "{\n    "
            + ",\n    ".join(
                f"{nested_json(name, 0)}: {text}" for name, (_, text) in fragments.items()
            )
            + "\n  }"
            if fragments
            else "{}"
        )
        envelope = state_document(host, {}, self_deploy)
        members = [
            f"{nested_json(key, 0)}: {services if key == 'services' else nested_json(value, 1)}"
            for key, value in envelope.items()
        ]
        return ("{\n  " + ",\n  ".join(members) + "\n}\n").encode()


def read_document(document: object, host: str, now: Instant) -> Restored:
    """Every readable record of a state file of `host` and this version; ForeignDocument for a
    file of anybody else."""
    if not isinstance(document, dict):
        raise ForeignDocument("not a JSON object")
    reason = _foreign_reason(document, host)
    if reason is not None:
        raise ForeignDocument(reason)
    records: dict[str, ServiceState] = {}
    dropped: dict[str, str] = {}
    for name, entry in document["services"].items():
        try:
            records[str(name)] = from_record(entry, now)
        except RecordError as exc:
            dropped[str(name)] = str(exc)
    self_deploy = document.get("self")
    return Restored(records, self_deploy if isinstance(self_deploy, dict) else None, dropped)


def _foreign_reason(document: dict[str, Any], host: str) -> str | None:
    """Why `document` is not a state file this condo may read its records from (None: it is)."""
    version = document.get("version")
    if version != RECORD_VERSION:
        return f"version {version!r} is not {RECORD_VERSION} (written by another condo version)"
    written_by = document.get("host")
    if written_by != host:
        return f"written by host {written_by!r}, not {host!r}"
    if not isinstance(document.get("services"), dict):
        return "no services object"
    return None


def to_record(state: ServiceState, now: Instant) -> dict[str, Any]:
    """The state file record of one service."""
    return {
        "phase": state.phase.value,
        "desired": _spec_out(state.desired),
        "removed": state.removed,
        "current": _box_out(state.current),
        "next": _box_out(state.next),
        "starting": _spec_out(state.starting),
        "replacing": _box_out(state.replacing),
        "draining": state.draining,
        "deadline_at": None if state.deadline is None else now.wall_at(state.deadline),
        "attempt": state.attempt,
        "error": None if state.error is None else attrs.asdict(state.error),
        "failed": _box_out(state.failed),
        "on_probation": state.on_probation,
        "last_good": _spec_out(state.last_good),
        "reverted": _reverted_out(state.reverted),
    }


def from_record(data: Any, now: Instant) -> ServiceState:
    """Read a record back; raises RecordError when it is not one."""
    try:
        deadline_at = data["deadline_at"]
        error = data["error"]
        return ServiceState(
            phase=Phase(data["phase"]),
            desired=_spec_in(data["desired"]),
            removed=bool(data["removed"]),
            current=_box_in(data["current"]),
            next=_box_in(data["next"]),
            starting=_spec_in(data["starting"]),
            replacing=_box_in(data["replacing"]),
            draining=bool(data["draining"]),
            deadline=None if deadline_at is None else now.mono + (_finite(deadline_at) - now.wall),
            attempt=int(_finite(data["attempt"])),
            error=None
            if error is None
            else Failure(
                message=str(error["message"]),
                at=_finite(error["at"]),
                unobserved=error.get("unobserved") is True,
                permanent=error.get("permanent") is True,
            ),
            failed=_box_in(data["failed"]),
            # Absent from records written before probations existed.
            on_probation=data.get("on_probation") is True,
            last_good=_spec_in(data["last_good"]) if "last_good" in data else _good_of(data),
            reverted=_reverted_in(data.get("reverted")),
        )
    except (KeyError, TypeError, ValueError, OverflowError, SpecError) as exc:
        # Every way a foreign or damaged record can fail to read ends here, as one error.
        raise RecordError(f"unreadable service record: {exc!r}") from exc


def _good_of(data: Any) -> ServiceSpec | None:
    """The last good spec of a record written before reverts existed: the container that served
    then (every Stable container's deploy was good: there were no probations), so that the
    first `:on-failure :revert` after an upgrade has something to go back to."""
    current = _box_in(data["current"])
    serving = Phase(data["phase"]) in (Phase.Stable, Phase.WaitNext, Phase.TryAgainNext)
    if current is None or not serving or current.label_hash is not None:
        return None
    return pinned(current)


def to_view(state: ServiceState, now: Instant, spec_error: SpecError | None) -> dict[str, Any]:
    """The API's SERVICE object (doc/contract.md), with condo's extensions."""
    next_box = state.next
    return {
        "state": state.phase.value,
        "current": _box_view(state.current),
        "next": _box_view(next_box),
        "retry_at": None if state.retry_at is None else now.wall_at(state.retry_at),
        "error": _failure_view(state.error),
        "spec_error": None
        if spec_error is None
        else {"file": spec_error.file, "line": spec_error.line, "message": spec_error.message},
        # extensions
        "image": None if state.desired is None else state.desired.image,
        "deploy": None if state.desired is None else state.desired.deploy.to_json(),
        "deploying": None if state.starting is None else state.starting.image,
        "draining": state.draining,
        "attempt": state.attempt,
        "failed": _box_view(state.failed),
        "removed": state.removed,
        "reverted": _reverted_view(state.reverted),
        # Stable, but its deploy is good only after this (wall clock; null: not on probation).
        "probation_until": None
        if not state.on_probation or state.deadline is None
        else now.wall_at(state.deadline),
        # What `condo plan` compares spec files with (condo.plan): fingerprints and the keys
        # adopted in place, never the create body itself (Env and labels stay hidden).
        "spec_hash": None if state.desired is None else state.desired.container_hash,
        "spec_fields": None if state.desired is None else state.desired.field_hashes,
        # The container hash of what serves (after a revert: the last good's, not the desired's).
        "serving_hash": None if state.current is None else state.current.hash,
        "options": None if state.desired is None else state.desired.options_json,
        # `:proxy`: each listener and the container it leads to (condo.routes).
        "proxy": listener_views(state),
        "warnings": [] if state.desired is None else list(state.desired.warnings),
    }


def _failure_view(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    view: dict[str, Any] = {"message": failure.message, "at": failure.at}
    if failure.unobserved:
        view["unobserved"] = True  # the state could not be confirmed by the engine
    if failure.permanent:
        view["permanent"] = True  # the spec cannot be deployed as it is: retries will fail too
    return view


def _reverted_out(reverted: Reverted | None) -> dict[str, Any] | None:
    if reverted is None:
        return None
    return {**_revert_fields(reverted), "spec_hash": reverted.spec_hash}


def _reverted_view(reverted: Reverted | None) -> dict[str, Any] | None:
    return None if reverted is None else _revert_fields(reverted)


def _revert_fields(reverted: Reverted) -> dict[str, Any]:
    return {
        "from": reverted.from_image,
        "to": reverted.to_image,
        "reason": reverted.reason,
        "at": reverted.at,
    }


def _reverted_in(data: Any) -> Reverted | None:
    if data is None:
        return None
    return Reverted(
        from_image=str(data["from"]),
        to_image=str(data["to"]),
        reason=str(data["reason"]),
        at=_finite(data["at"]),
        spec_hash=str(data["spec_hash"]),
    )


def _finite(value: Any) -> float:
    """A number that deadlines and the state file can hold (never NaN or infinite)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _spec_out(spec: ServiceSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.to_json()


def _spec_in(data: Any) -> ServiceSpec | None:
    return None if data is None else ServiceSpec.from_json(data)


def _box_out(box: Box | None) -> dict[str, Any] | None:
    if box is None:
        return None
    return {
        "id": box.id,
        "name": box.name,
        "spec": box.spec.to_json(),
        "created_at": box.created_at,
        "healthcheck": box.healthcheck,
        "restart_policy": box.restart_policy,
        "stable_at": box.stable_at,
        "label_hash": box.label_hash,
        "image_id": box.image_id,
        "image_digest": box.image_digest,
    }


def _box_in(data: Any) -> Box | None:
    if data is None:
        return None
    stable_at = data["stable_at"]
    return Box(
        id=str(data["id"]),
        name=str(data["name"]),
        spec=ServiceSpec.from_json(data["spec"]),
        created_at=_finite(data["created_at"]),
        healthcheck=bool(data["healthcheck"]),
        restart_policy=str(data["restart_policy"]),
        stable_at=None if stable_at is None else _finite(stable_at),
        # Absent from records written before it existed.
        label_hash=None if data.get("label_hash") is None else str(data["label_hash"]),
        image_id=str(data.get("image_id") or ""),
        image_digest=str(data.get("image_digest") or ""),
    )


def _box_view(box: Box | None) -> dict[str, Any] | None:
    if box is None:
        return None
    return {
        "id": box.id,
        "name": box.name,
        "image": box.spec.image,
        "created_at": box.created_at,
        "stable_at": box.stable_at,
    }

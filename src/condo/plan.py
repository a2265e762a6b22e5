"""`condo plan`'s decision: what the spec files would change in what a condo runs (pure).

`make_plan(local, remote)` compares the services read from spec files (condo.specdir's rules)
with the SERVICE views of `/v1/state` and says, per service, what condo would do:

    +  create            no spec of that name runs
    ~  redeploy          the container hash differs: a new container replaces the old one
    =  update in place   only keys that never touch the container differ (deploy, timeouts...)
    -  remove            the file is gone: condo retires the service
    !  invalid           the file cannot be used (condo keeps what runs); file:line: message
       unchanged         shown only on request

The rule is condo's own, never a copy of it: a redeploy is a different
`ServiceSpec.container_hash` (the view's `spec_hash`, what the fsm compares); an update in place
is a difference in `ServiceSpec.options_json` (the view's `options`, what the fsm adopts into
the running boxes). The view shows only fingerprints of the create body's keys
(`ServiceSpec.field_hashes`), so a plan names the fields that differ, never what they hold.

Invariants: pure (no I/O); nothing here can change what runs. A missing file says "remove" only
when every PREFIX could be listed (as condo itself, which removes nothing while one cannot).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from condo.errors import SpecError
from condo.spec import ServiceSpec, canonical_json

EXIT_UNCHANGED: Final = 0
EXIT_INVALID: Final = 1
EXIT_CHANGES: Final = 2
"""terraform's `-detailed-exitcode`: 0 nothing to do, 1 invalid specs or errors, 2 changes."""


class Action(enum.Enum):
    """What condo would do with one service; the value is the plan line's mark."""

    create = "+"
    redeploy = "~"
    update = "="
    remove = "-"
    invalid = "!"
    unchanged = " "


_WORDS: Final = {
    Action.create: "create",
    Action.redeploy: "redeploy",
    Action.update: "update in place",
    Action.remove: "remove",
    Action.invalid: "invalid",
    Action.unchanged: "unchanged",
}


class ViewTooOld(ValueError):
    """The condo asked does not show `spec_hash`: it predates `condo plan`."""


@attrs.frozen
class OptionChange:
    """One key that does not touch the container, before and after (JSON values)."""

    key: str
    before: Any
    after: Any


@attrs.frozen(kw_only=True)
class Change:
    """One service's line of the plan."""

    service: str
    action: Action
    image_before: str | None = None
    image_after: str | None = None
    fields: tuple[str, ...] = ()  # redeploy: the create body's top-level keys that differ
    options: tuple[OptionChange, ...] = ()
    error: SpecError | None = None  # invalid: why


@attrs.frozen
class Plan:
    """Every service's change, sorted by name, and the problems beyond single services."""

    changes: tuple[Change, ...]
    problems: tuple[SpecError, ...] = ()

    @property
    def exit_code(self) -> int:
        if self.problems or any(c.action is Action.invalid for c in self.changes):
            return EXIT_INVALID
        if any(c.action is not Action.unchanged for c in self.changes):
            return EXIT_CHANGES
        return EXIT_UNCHANGED


def make_plan(
    local: Mapping[str, ServiceSpec | SpecError],
    remote: Mapping[str, Mapping[str, Any]],
    *,
    problems: Sequence[SpecError] = (),
    complete: bool = True,
) -> Plan:
    """Compare the spec files' services (`local`) with `/v1/state`'s SERVICE views (`remote`).

    `complete` is False when a PREFIX could not be listed: its services may exist, so nothing
    is said to be removed. Raises ViewTooOld when a view lacks `spec_hash`.
    """
    running: dict[str, Mapping[str, Any]] = {}
    for name, view in remote.items():
        if "spec_hash" not in view:
            raise ViewTooOld(f"the view of {name!r} has no spec_hash")
        # A service without a desired spec (its file was removed, or never valid) runs nothing
        # condo would keep: a file of that name creates it.
        if view["spec_hash"] is not None and not view.get("removed"):
            running[name] = view
    changes = [_change(name, spec, running.get(name)) for name, spec in local.items()]
    if complete:
        changes.extend(
            Change(service=name, action=Action.remove, image_before=view.get("image"))
            for name, view in running.items()
            if name not in local
        )
    return Plan(tuple(sorted(changes, key=lambda c: c.service)), tuple(problems))


def _change(name: str, spec: ServiceSpec | SpecError, view: Mapping[str, Any] | None) -> Change:
    before = None if view is None else view.get("image")
    if isinstance(spec, SpecError):
        return Change(service=name, action=Action.invalid, image_before=before, error=spec)
    if view is None:
        return Change(service=name, action=Action.create, image_after=spec.image)
    options = _option_changes(spec.options_json, view.get("options") or {})
    if _back_to_what_serves(spec, view):
        # The file names again what serves while the desired spec is reverted: condo keeps that
        # container and drops the held-off spec, nothing is created.
        return Change(
            service=name, action=Action.update, image_before=before, image_after=spec.image,
            options=options,
        )  # fmt: skip
    if spec.container_hash != view["spec_hash"]:
        return Change(
            service=name,
            action=Action.redeploy,
            image_before=before,
            image_after=spec.image,
            fields=_field_changes(spec.field_hashes, view.get("spec_fields") or {}),
            options=options,
        )
    action = Action.update if options else Action.unchanged
    return Change(
        service=name, action=action, image_before=before, image_after=spec.image, options=options
    )


def _back_to_what_serves(spec: ServiceSpec, view: Mapping[str, Any]) -> bool:
    """The desired spec is held off by a revert (`reverted` is shown only then) and `spec` is what
    the serving container runs."""
    return view.get("reverted") is not None and spec.container_hash == view.get("serving_hash")


def _field_changes(local: Mapping[str, str], remote: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k for k in local.keys() | remote.keys() if local.get(k) != remote.get(k)))


def _option_changes(
    local: Mapping[str, Any], remote: Mapping[str, Any]
) -> tuple[OptionChange, ...]:
    # Compared as canonical JSON: the view's numbers went through JSON (10 and 10.0 are one).
    return tuple(
        OptionChange(key, remote.get(key), local.get(key))
        for key in sorted(local.keys() | remote.keys())
        if _canonical(local.get(key)) != _canonical(remote.get(key))
    )


def _canonical(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(value, list):
        value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return canonical_json(value)


# --- words ----------------------------------------------------------------------------------------


def render(plan: Plan, *, show_unchanged: bool = False) -> list[str]:
    """The plan's lines: one per service (unchanged ones on request), problems, a summary."""
    lines = [_line(c) for c in plan.changes if show_unchanged or c.action is not Action.unchanged]
    lines.extend(f"! {problem}" for problem in plan.problems)
    counts = dict.fromkeys(Action, 0)
    for change in plan.changes:
        counts[change.action] += 1
    summary = ", ".join(
        f"{counts[action]} {'to ' if action.value in '+~=-' else ''}{_WORDS[action]}"
        for action in Action
        if counts[action]
    )
    if plan.problems:
        summary += (", " if summary else "") + f"{len(plan.problems)} other problem(s)"
    lines.append(f"Plan: {summary or 'no services'}.")
    return lines


def _line(change: Change) -> str:
    head = f"{change.action.value} {change.service}: {_WORDS[change.action]}"
    match change.action:
        case Action.create:
            return f"{head} ({change.image_after})"
        case Action.remove:
            return f"{head} ({change.image_before})"
        case Action.invalid:
            kept = f" (keeps running {change.image_before})" if change.image_before else ""
            return f"{head}: {change.error}{kept}"
        case Action.unchanged:
            return f"{head} ({change.image_after})"
        case _:
            details = []
            if change.fields:
                details.append(" ".join(f":{field}" for field in change.fields))
            if change.image_before != change.image_after:
                details.append(f"image {change.image_before} → {change.image_after}")
            details.extend(
                f":{o.key.replace('_', '-')} {_show(o.before)} → {_show(o.after)}"
                for o in change.options
            )
            return f"{head}: {'; '.join(details)}" if details else head


def _show(value: Any) -> str:
    """An option's value as a spec file writes it (`[:After 2]`, `:always`, `10`)."""
    if value is None:
        return "(unset)"
    if isinstance(value, list) and value and isinstance(value[0], str):
        return "[" + " ".join([f":{value[0]}", *(_show(v) for v in value[1:])]) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f":{value}"
    return str(value)

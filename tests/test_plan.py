"""`condo plan`'s diff (condo.plan): spec files against the SERVICE views condo really serves.

The views are made by `record.to_view` from a state whose desired spec is parsed from EDN, and
go through JSON as the HTTP API sends them, so these tests compare exactly what `condo plan`
compares in real life.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from condo import fsm
from condo.errors import SpecError
from condo.plan import (
    EXIT_CHANGES,
    EXIT_INVALID,
    EXIT_UNCHANGED,
    Action,
    OptionChange,
    ViewTooOld,
    make_plan,
    render,
)
from condo.record import to_view
from condo.spec import ServiceSpec, parse_spec

NOW = fsm.Instant(mono=100.0, wall=1_700_000_000.0)
BASE = '{:spec {:Image "app:1" :Env ["SECRET=hunter2"] :Cmd ["serve"]}}'


def body(text: str, options: str = "") -> str:
    """A spec whose create body is `text` (EDN map entries) and top-level `options`."""
    return f"{{:spec {{{text}}} {options}}}"


def with_options(options: str) -> str:
    return BASE[:-1] + " " + options + "}"


def spec(text: str) -> ServiceSpec:
    return parse_spec(text.encode(), "x.edn")


def view(text: str | None, **state: Any) -> dict[str, Any]:
    """The SERVICE view condo serves for a service whose desired spec is `text`, via JSON."""
    desired = None if text is None else spec(text)
    served = to_view(fsm.ServiceState(desired=desired, **state), NOW, None)
    loaded: dict[str, Any] = json.loads(json.dumps(served))
    return loaded


@pytest.mark.parametrize(
    ("local", "action", "fields", "options"),
    [
        (BASE, Action.unchanged, (), ()),
        # Same meaning, other text: key order, whitespace, comments do not count.
        (
            body(':Cmd ["serve"] ;; why\n :Env ["SECRET=hunter2"] :Image "app:1"'),
            Action.unchanged,
            (),
            (),
        ),
        # Explicit defaults are the defaults.
        (with_options(":health-timeout 10 :deploy [:Before]"), Action.unchanged, (), ()),
        (BASE.replace("app:1", "app:2"), Action.redeploy, ("Image",), ()),
        (BASE.replace("hunter2", "other"), Action.redeploy, ("Env",), ()),
        (body(':Image "app:1" :Cmd ["serve"]'), Action.redeploy, ("Env",), ()),
        (BASE.replace(":Cmd", ':Name "app-1" :Cmd'), Action.redeploy, ("Name",), ()),
        (
            body(':Image "app:2" :Env ["SECRET=hunter2"] :Cmd ["run"]', ":stop-timeout 3"),
            Action.redeploy,
            ("Cmd", "Image"),
            (OptionChange("stop_timeout", 10.0, 3.0),),
        ),
        (
            with_options(":deploy [:After 2]"),
            Action.update,
            (),
            (OptionChange("deploy", ["Before"], ["After", 2.0]),),
        ),
        (
            with_options(":health-timeout 30 :pull :always :stable-after 1.5"),
            Action.update,
            (),
            (
                OptionChange("health_timeout", 10.0, 30.0),
                OptionChange("pull", None, "always"),
                OptionChange("stable_after", 0.0, 1.5),
            ),
        ),
        (
            with_options(":on-failure :revert :probation 30"),
            Action.update,
            (),
            (
                OptionChange("on_failure", "retry", "revert"),
                OptionChange("probation", 0.0, 30.0),
            ),
        ),
    ],
)
def test_a_changed_file_is_judged_by_condos_own_rule(
    local: str, action: Action, fields: tuple[str, ...], options: tuple[OptionChange, ...]
) -> None:
    plan = make_plan({"web": spec(local)}, {"web": view(BASE)})
    [change] = plan.changes
    assert (change.action, change.fields, change.options) == (action, fields, options)
    # The rule is the fsm's: a redeploy exactly when the container hash differs.
    redeploys = spec(local).container_hash != spec(BASE).container_hash
    assert (action is Action.redeploy) == redeploys
    assert plan.exit_code == (EXIT_UNCHANGED if action is Action.unchanged else EXIT_CHANGES)


def test_one_of_each_kind_and_the_words() -> None:
    error = SpecError("/specs/bad.edn", "unknown key :deplyo", 2)
    plan = make_plan(
        {
            "new": spec('{:spec {:Image "new:1"}}'),
            "web": spec(BASE.replace("app:1", "app:2")),
            "api": spec(with_options(":deploy [:After 5]")),
            "same": spec(BASE),
            "bad": error,
        },
        {
            "web": view(BASE),
            "api": view(BASE),
            "same": view(BASE),
            "bad": view(BASE),
            "old": view('{:spec {:Image "old:3"}}'),
        },
    )
    lines = render(plan)
    assert lines[:-1] == [
        "= api: update in place: :deploy [:Before] → [:After 5]",
        "! bad: invalid: /specs/bad.edn:2: unknown key :deplyo (keeps running app:1)",
        "+ new: create (new:1)",
        "- old: remove (old:3)",
        "~ web: redeploy: :Image; image app:1 → app:2",
    ]
    assert lines[-1] == (
        "Plan: 1 to create, 1 to redeploy, 1 to update in place, 1 to remove, 1 invalid,"
        " 1 unchanged."
    )
    assert "  same: unchanged (app:1)" in render(plan, show_unchanged=True)
    assert plan.exit_code == EXIT_INVALID  # an invalid file wins over changes
    assert "hunter2" not in json.dumps(view(BASE))  # the view shows fingerprints, never Env


def test_nothing_to_do_exits_0_and_says_so() -> None:
    plan = make_plan({"same": spec(BASE)}, {"same": view(BASE)})
    assert plan.exit_code == EXIT_UNCHANGED
    assert render(plan) == ["Plan: 1 unchanged."]
    assert make_plan({}, {}).exit_code == EXIT_UNCHANGED


def test_a_service_condo_is_already_removing_or_never_had_is_created() -> None:
    gone = view(None, removed=True)  # the file was removed: desired is None
    never = view(None)  # its file was never valid
    plan = make_plan({"a": spec(BASE), "b": spec(BASE)}, {"a": gone, "b": never})
    assert [c.action for c in plan.changes] == [Action.create, Action.create]
    assert make_plan({}, {"a": gone, "b": never}).exit_code == EXIT_UNCHANGED


def test_an_unlisted_prefix_removes_nothing_and_fails() -> None:
    problem = SpecError("/specs", "cannot list the spec directory (No such file or directory)")
    plan = make_plan({}, {"web": view(BASE)}, problems=[problem], complete=False)
    assert plan.changes == ()
    assert plan.exit_code == EXIT_INVALID
    assert render(plan) == [f"! {problem}", "Plan: 1 other problem(s)."]


def test_a_condo_without_spec_hashes_cannot_be_planned_against() -> None:
    old = view(BASE)
    del old["spec_hash"]
    with pytest.raises(ViewTooOld):
        make_plan({"web": spec(BASE)}, {"web": old})


def test_the_file_back_on_what_serves_after_a_revert_is_no_redeploy() -> None:
    # [:After n] kept the last good's own container serving and reverted the bad spec: writing
    # the last good spec back into the file keeps that container (fsm._runs), so no redeploy.
    good, bad = spec(BASE), spec(BASE.replace("app:1", "app:2"))
    serving = fsm.Box(id="a", name="web_a", spec=good, created_at=1.0, healthcheck=False)
    reverted = fsm.Reverted(
        spec_hash=bad.container_hash, from_image="app:2", to_image="app:1", reason="died", at=2.0
    )
    held_off = view(
        BASE.replace("app:1", "app:2"),
        phase=fsm.Phase.Stable,
        current=serving,
        last_good=good,
        reverted=reverted,
    )
    assert held_off["serving_hash"] == good.container_hash != held_off["spec_hash"]
    [change] = make_plan({"web": good}, {"web": held_off}).changes
    assert (change.action, change.image_after) == (Action.update, "app:1")
    # Without a revert the same views are a redeploy, as before.
    plain = {**held_off, "reverted": None}
    [change] = make_plan({"web": good}, {"web": plain}).changes
    assert change.action is Action.redeploy

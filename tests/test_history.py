"""The deploy history's keeping (condo.history): its file read back, a foreign or damaged one
moved aside, and the bound on removed services."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from condo import fsm, history, persist
from condo.history import History, history_path, open_history
from condo.spec import ServiceSpec


def serving(image: str, cid: str) -> fsm.ServiceState:
    spec = ServiceSpec(container={"Image": image})
    box = fsm.Box(id=cid, name=f"c_{cid}", spec=spec, created_at=1.0, healthcheck=False)
    return fsm.ServiceState(phase=fsm.Phase.Stable, desired=spec, current=box)


def test_the_file_is_beside_the_state_file(tmp_path: Path) -> None:
    assert history_path(tmp_path / "state.json") == tmp_path / "state.json.history.json"


def test_what_was_written_is_read_back(tmp_path: Path) -> None:
    kept = History(history_path(tmp_path / "s.json"), "h1")
    kept.on_transition("web", None, serving("app:1", "a1"))
    path = history_path(tmp_path / "s.json")
    path.write_text(json.dumps(kept.document()))
    again = open_history(tmp_path / "s.json", "h1")
    assert again.entries == kept.entries
    assert [e.outcome for e in again.entries["web"]] == ["stable"]


def test_the_file_bytes_are_the_document_encoding_only_changed_services_again() -> None:
    kept = History(None, "h\u00e9")
    assert kept.file_bytes() == persist.encode_state(kept.document())
    for i in range(5):
        kept.on_transition(f"s{i}", None, serving(f"app:{i}", f"a{i}"))
    assert kept.file_bytes() == persist.encode_state(kept.document())
    encoded = kept.encoded
    kept.on_transition("s2", serving("app:2", "a2"), fsm.ServiceState(removed=True))
    assert kept.file_bytes() == persist.encode_state(kept.document())
    assert kept.encoded == encoded + 1  # s2 alone
    assert kept.file_bytes() == persist.encode_state(kept.document())
    assert kept.encoded == encoded + 1  # nothing changed: nothing encoded


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        ('{"version": 1, "host": "other", "services": {}}', "foreign"),
        ('{"version": 99, "host": "h1", "services": {}}', "foreign"),
        ("{not json", "corrupt"),
    ],
)
def test_a_foreign_or_damaged_file_is_moved_aside(tmp_path: Path, content: str, kind: str) -> None:
    path = history_path(tmp_path / "s.json")
    path.write_text(content)
    loaded = open_history(tmp_path / "s.json", "h1")
    assert loaded.entries == {}
    assert not path.exists()
    [aside] = tmp_path.glob(f"s.json.history.json.{kind}-*")
    assert aside.read_text() == content


def test_an_unreadable_service_is_dropped_alone(tmp_path: Path) -> None:
    kept = History(None, "h1")
    kept.on_transition("web", None, serving("app:1", "a1"))
    document = kept.document()
    document["services"]["bad"] = [{"outcome": "stable"}]
    path = history_path(tmp_path / "s.json")
    path.write_text(json.dumps(document))
    loaded = open_history(tmp_path / "s.json", "h1")
    assert set(loaded.entries) == {"web"}


def test_only_the_last_removed_services_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "MAX_GONE", 3)
    kept = History()
    kept.on_transition("live", None, serving("app:0", "l0"))
    for n in range(5):
        state = serving(f"app:{n}", f"c{n}")
        kept.on_transition(f"gone{n}", None, state)
        gone = attrs.evolve(state, phase=fsm.Phase.Init, current=None, desired=None, removed=True)
        kept.on_transition(f"gone{n}", state, gone)
    assert set(kept.entries) == {"live", "gone2", "gone3", "gone4"}


class _NoEngine:
    """An engine that must not be asked: the digest is already known."""

    async def inspect(self, cid_or_name: str) -> history._Inspected:
        raise AssertionError(f"inspect {cid_or_name}")

    async def image_digests(self, image: str) -> tuple[str, ...]:
        raise AssertionError(f"image_digests {image}")


async def test_a_digest_the_driver_learned_is_taken_without_asking_the_engine_again() -> None:
    kept = History()
    stable = serving("reg/app:1", "a1")
    assert stable.current is not None and stable.desired is not None
    deploying = fsm.ServiceState(
        phase=fsm.Phase.Wait, desired=stable.desired, starting=stable.desired
    )
    digest = "reg/app@sha256:" + "d" * 64
    stable = attrs.evolve(stable, current=attrs.evolve(stable.current, image_digest=digest))
    kept.on_transition("web", None, deploying)
    kept.on_transition("web", deploying, stable)
    assert [(e.outcome, e.digest) for e in kept.entries["web"]] == [("stable", digest)]
    # Nothing left to look up: the lookup loop never calls the engine.
    with trio.move_on_after(0.2):
        await kept.run(_NoEngine())

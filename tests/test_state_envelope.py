"""The state file's envelope: records are only taken from a file of this host and version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from condo import fsm, persist, record
from condo.config import Config
from condo.run import load_state
from condo.store import Store, now
from tests.fsm_explore import SPEC_A, explore


def write(path: Path, host: object, version: object) -> None:
    box = fsm.Box(id="c1", name="web_c1", spec=SPEC_A, created_at=1.0, healthcheck=False)
    state = fsm.ServiceState(phase=fsm.Phase.Stable, desired=SPEC_A, current=box)
    document = record.state_document("h", {"web": record.to_record(state, now())})
    document.update(host=host, version=version)
    path.write_text(json.dumps(document))


def config(path: Path) -> Config:
    return Config(prefixes=(path.parent,), state_path=path, host="h")


async def test_a_file_of_this_host_and_version_gives_its_records(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write(path, "h", record.RECORD_VERSION)
    records = load_state(config(path)).records
    assert records["web"].current is not None and records["web"].current.id == "c1"
    assert path.exists()


@pytest.mark.parametrize(
    ("host", "version", "why"),
    [
        ("other", record.RECORD_VERSION, "written by host 'other'"),
        (None, record.RECORD_VERSION, "written by host None"),
        ("h", 0, "version 0"),
        ("h", None, "version None"),
        ("h", record.RECORD_VERSION + 1, f"version {record.RECORD_VERSION + 1}"),
    ],
)
async def test_a_file_of_another_host_or_version_is_moved_aside_unread(
    tmp_path: Path, host: object, version: object, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "state.json"
    write(path, host, version)
    original = path.read_bytes()
    assert load_state(config(path)).records == {}
    assert not path.exists()
    [aside] = tmp_path.glob("state.json.foreign-*")
    assert aside.read_bytes() == original  # kept whole for the operator
    logged = capsys.readouterr().out
    assert "state.foreign" in logged and why in logged


def test_every_reachable_state_reads_back_from_its_record_exactly() -> None:
    # Wall time runs exactly 1000 s ahead of Trio's, as in the explorer: deadlines are exact.
    at = fsm.Instant(mono=100.0, wall=1100.0)
    states = {step.after for step in explore(5)}
    assert any(state.reverted is not None for state in states)
    for state in states:
        stored = json.loads(json.dumps(record.to_record(state, at)))
        assert record.from_record(stored, at) == state


async def test_a_boxs_image_digest_survives_the_state_file() -> None:
    """What a revert pins to (the digest, else the id) is in the file: a kill -9 keeps it."""
    box = fsm.Box(
        id="c1",
        name="web_c1",
        spec=SPEC_A,
        created_at=1.0,
        healthcheck=False,
        image_id="sha256:aaa",
        image_digest="app@sha256:" + "d" * 64,
    )
    state = fsm.ServiceState(phase=fsm.Phase.Stable, desired=SPEC_A, current=box)
    text = json.dumps(record.to_record(state, now()))
    back = record.from_record(json.loads(text), now())
    assert back.current == box
    # A record written before the digest existed reads back without one.
    old = json.loads(text)
    del old["current"]["image_digest"]
    legacy = record.from_record(old, now()).current
    assert legacy is not None and legacy.image_digest == "" and legacy.image_id == "sha256:aaa"


def _encoded(
    items: list[tuple[str, fsm.ServiceState]], self_deploy: object, at: fsm.Instant
) -> bytes:
    records = {name: record.to_record(state, at) for name, state in items}
    return persist.encode_state(record.state_document("h", records, self_deploy))  # type: ignore[arg-type]


def test_the_state_encoder_writes_encode_states_bytes_and_re_encodes_only_what_changed() -> None:
    """The state is written before every Docker call: re-encoding 200 unchanged records each time
    (CPython's pure-Python encoder, for an indented document) delayed the one that changed."""
    at = fsm.Instant(mono=100.0, wall=1100.0)
    states = sorted({step.after for step in explore(4)}, key=repr)
    assert any(state.deadline is not None for state in states)
    items = sorted(
        [(f"s{i:04d}", state) for i, state in enumerate(states)] + [("wéb ☃", states[0])]
    )
    self_deploy = {"hash": "abc", "state": "failed", "error": "no\nway ☃"}
    encoder = record.StateEncoder()
    assert encoder.encode("h", items, self_deploy, at) == _encoded(items, self_deploy, at)
    assert encoder.encoded == len(items)

    changed = [(items[0][0], fsm.ServiceState()), *items[1:]]
    later = fsm.Instant(mono=160.0, wall=1160.0)  # deadlines move on the wall clock
    assert encoder.encode("h", changed, None, later) == _encoded(changed, None, later)
    with_deadline = sum(1 for _, state in changed[1:] if state.deadline is not None)
    assert encoder.encoded == len(items) + 1 + with_deadline  # the changed one and the deadlines

    gone = changed[1:]
    assert encoder.encode("h", gone, None, later) == _encoded(gone, None, later)
    assert record.StateEncoder().encode("h", [], None, at) == _encoded([], None, at)


async def test_the_store_gives_the_state_writer_encode_states_bytes() -> None:
    store = Store("h")
    box = fsm.Box(id="c1", name="web_c1", spec=SPEC_A, created_at=1.0, healthcheck=False)
    store.set_state("web", fsm.ServiceState(phase=fsm.Phase.Stable, desired=SPEC_A, current=box))
    store.set_state("db", fsm.ServiceState())
    store.set_self_deploy({"hash": "abc", "state": "ok"})
    assert store.state_bytes() == persist.encode_state(store.state_document())

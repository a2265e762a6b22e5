"""The state file's envelope: records are only taken from a file of this host and version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from condo import fsm, record
from condo.config import Config
from condo.run import load_state
from condo.store import now
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

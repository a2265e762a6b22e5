"""Red team 13b (pure, fake engine, virtual time): what a revert pins to and goes back to."""

from __future__ import annotations

import json

import trio
import trio.testing

from condo import fsm, record
from condo.fsm import Phase
from condo.spec import DeployStrategy, ServiceSpec
from tests.fakes import FakeEngine
from tests.test_service import driving, spec

IMAGE_ID = "sha256:" + "ab" * 32


async def test_an_image_id_is_never_pulled_even_under_pull_always(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A revert pins an image without a registry digest (or whose digest could not be asked for)
    to its image id; under `:pull :always` a pull of `sha256:…` (Docker Hub's `sha256`
    repository to the engine) would fail every revert although the image is right there."""
    engine = FakeEngine(local_images={IMAGE_ID})
    with trio.fail_after(1000):
        async with driving(engine) as d:
            d.mailbox.set_spec(spec(IMAGE_ID, pull="always"))
            stable = await d.wait_phase(Phase.Stable)
    assert stable.current is not None and stable.current.spec.image == IMAGE_ID
    assert not [call for call in engine.calls if call.startswith("pull")]


def test_a_record_from_before_reverts_gives_the_serving_container_as_last_good() -> None:
    """A record written before `last_good` existed (every Stable deploy was good then): the
    container that serves is the last good, so the first `:on-failure :revert` after the
    upgrade reverts instead of retrying a bad spec with nothing serving ([:Before])."""
    good = ServiceSpec(container={"Image": "app:1"})
    box = fsm.Box(
        id="c1",
        name="web_c1",
        spec=good,
        created_at=1.0,
        healthcheck=False,
        image_id="sha256:" + "a" * 64,
        image_digest="app@sha256:" + "d" * 64,
    )
    state = fsm.ServiceState(phase=fsm.Phase.Stable, desired=good, current=box)
    at = fsm.Instant(mono=0.0, wall=1000.0)
    old = json.loads(json.dumps(record.to_record(state, at)))
    for key in ("last_good", "on_probation", "reverted"):
        del old[key]
    back = record.from_record(old, at)
    assert back.last_good is not None and back.last_good.image == "app@sha256:" + "d" * 64
    # The same state read from a record that says there is no last good keeps it so.
    assert record.from_record({**old, "last_good": None}, at).last_good is None

    bad = ServiceSpec(
        container={"Image": "app:2"}, deploy=DeployStrategy("Before"), on_failure="revert"
    )
    trying, _ = fsm.step(back, fsm.SpecChanged(bad), at)
    reverted, effects = fsm.step(
        trying, fsm.DeployFailed(message="create: no such image", replaced=True), at
    )
    assert reverted.reverted is not None
    assert [e.spec.image for e in effects if isinstance(e, fsm.Deploy)] == [
        "app@sha256:" + "d" * 64
    ]

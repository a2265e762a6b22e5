"""Red team 13b (fake engine, virtual time): a spec pinned to an image id is never pulled."""

from __future__ import annotations

import trio
import trio.testing

from condo.fsm import Phase
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

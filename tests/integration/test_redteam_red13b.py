"""Red team 13b on the real engine: what a revert pins to, for a container condo adopted.

A container that condo created but never recorded (a kill -9 between the engine's create and the
state file) is adopted on the restart; once it is good it is the last good, and a revert to it
must run the image it ran (its registry digest), never what its tag says by then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from condo import labels
from condo.docker import DockerClient
from condo.spec import parse_spec
from tests.integration.conftest import DockerCli
from tests.integration.harness import condo_files, running_condo
from tests.integration.test_revert_digest import (  # noqa: F401 (fixtures)
    BAD,
    MakeImage,
    good_spec,
    make_image,
    reference,
)

pytestmark = pytest.mark.docker


async def test_an_adopted_container_is_pinned_to_its_digest_for_a_revert(
    tmp_path: Path,
    docker: DockerClient,
    docker_cli: DockerCli,
    reference: str,  # noqa: F811
    make_image: MakeImage,  # noqa: F811
) -> None:
    old_id, old_digest = await make_image("old")
    text = good_spec(reference)
    spec = parse_spec(text.encode(), "web.edn")
    async with condo_files(tmp_path, docker) as files:
        # What the interrupted deploy left: the desired spec's container, running, with condo's
        # labels, and no state file that records it.
        body = dict(spec.container)
        body["Labels"] = labels.for_container(files.host, "web", spec.container_hash)
        made = await docker.create(body, name=labels.generated_name("web"))
        await docker.start(made)
        files.write("web", text)
        async with running_condo(files) as condo:
            adopted = await condo.wait_state("web", "Stable", image=reference, limit=30)
            assert adopted["current"]["id"] == made  # adopted, not replaced
            # The tag moves on (the same tag re-pushed, and pulled here), then S' fails.
            new_id, _ = await make_image("new")
            assert new_id != old_id
            condo.write("web", BAD)
            bad = await condo.wait_state("web", "Stable", image="condo-test/busybox:2", limit=30)
            await docker_cli("kill", bad["current"]["id"])
            view = await condo.wait(
                lambda v: (
                    v["services"]["web"]["reverted"] is not None
                    and v["services"]["web"]["state"] == "Stable"
                ),
                limit=30,
            )
        web = view["services"]["web"]
        assert web["reverted"]["to"] == old_digest
        assert (await docker.inspect(web["current"]["id"])).image_id == old_id

"""A revert pins the last good spec to its image's registry digest, on the real engine and registry.

Each test makes an image of its own (condo-test/busybox:1 plus a unique label, so a unique image
id), pushes it to the registry on localhost:5000 under a unique tag, and removes what it made
afterwards: the shared condo-test images are never removed. The last good spec S runs it; then a
bad spec S' (`:probation 60 :on-failure :revert`, [:Before]: S's container is gone) turns Stable
and is killed in its probation by the test, after the test removed S's image from the engine
(`docker rmi -f`, as an operator or an image prune does). The revert must pull S's image back by
its digest (an image id cannot be pulled: condo would retry forever), and never take a tag
re-pushed meanwhile.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo import deploys
from condo.docker import DockerClient, RegistryAuth, open_docker
from condo.errors import DockerApiError
from tests.integration.conftest import DockerCli
from tests.integration.harness import CondoUnderTest, condo_files, free_port, running_condo
from tests.integration.test_docker_client import PASSWORD, PRIVATE_REGISTRY, USER

pytestmark = pytest.mark.docker

# Killed by the test during its probation (it would serve forever otherwise).
BAD = """{:spec {:Image "condo-test/busybox:2"}
 :pull :never :stop-timeout 1 :probation 60 :on-failure :revert}"""


def good_spec(image: str) -> str:
    # The default pull policy (:missing for a fixed tag): a pinned digest is pulled when absent.
    return f'{{:spec {{:Image "{image}"}} :stop-timeout 1}}'


MakeImage = Callable[[str], Awaitable[tuple[str, str]]]


async def image_id_of(docker_cli: DockerCli, reference: str) -> str:
    return (await docker_cli("image", "inspect", "-f", "{{.Id}}", reference)).strip()


@pytest.fixture
async def reference() -> str:
    """A tag of this test's own on the local registry."""
    return f"localhost:5000/condo-test/pin:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_image(
    reference: str, docker: DockerClient, docker_cli: DockerCli
) -> AsyncIterator[MakeImage]:
    """`await make_image(content)`: a new image (its own id) tagged `reference` and pushed; its
    id and registry digest. Every image made is removed from the engine afterwards."""
    made: list[str] = []

    async def make(content: str) -> tuple[str, str]:
        dockerfile = f"FROM condo-test/busybox:1\nLABEL condo-test.pin={reference}-{content}\n"
        await docker_cli(
            "build", "-q", "-t", reference, "-",
            stdin=dockerfile.encode(), env={"DOCKER_BUILDKIT": "0"},
        )  # fmt: skip
        image_id = await image_id_of(docker_cli, reference)
        made.append(image_id)
        await docker_cli("push", "-q", reference)
        [digest] = await docker.image_digests(image_id)
        assert digest.startswith("localhost:5000/condo-test/pin@sha256:")
        return image_id, digest

    yield make
    with trio.move_on_after(30, shield=True):
        for image_id in made:
            if await docker.image_present(image_id):
                await trio.run_process(["docker", "rmi", "-f", image_id], capture_stdout=True)


async def bad_on_probation(condo: CondoUnderTest) -> dict[str, Any]:
    """Deploy BAD over the last good; BAD's service view once it is Stable, on probation."""
    condo.write("web", BAD)
    return await condo.wait_state("web", "Stable", image="condo-test/busybox:2", limit=30)


@pytest.mark.parametrize("repushed", [False, True], ids=["removed", "tag-repushed"])
async def test_a_revert_pulls_the_last_good_back_by_digest(
    tmp_path: Path,
    docker: DockerClient,
    docker_cli: DockerCli,
    reference: str,
    make_image: MakeImage,
    repushed: bool,
) -> None:
    old_id, old_digest = await make_image("old")
    async with condo_files(tmp_path, docker) as files, running_condo(files) as condo:
        condo.write("web", good_spec(reference))
        await condo.wait_state("web", "Stable", image=reference, limit=30)
        bad = await bad_on_probation(condo)
        assert await docker.image_present(old_id)  # not removed by condo, though unused now
        new_id = None
        if repushed:
            # The same tag, other content, pushed and pulled after S went Stable.
            new_id, new_digest = await make_image("new")
            assert new_id != old_id and new_digest != old_digest
        await docker_cli("rmi", "-f", old_id)  # the last good's image is gone from the engine
        await docker_cli("kill", bad["current"]["id"])  # S' dies in its probation
        view = await condo.wait(
            lambda v: (
                v["services"]["web"]["reverted"] is not None
                and v["services"]["web"]["state"] == "Stable"
            ),
            limit=30,
        )
        web = view["services"]["web"]
        # Back on S's own content, pulled by its digest, not on whatever the tag says now.
        assert web["current"]["image"] == old_digest
        assert (await docker.inspect(web["current"]["id"])).image_id == old_id
        assert web["reverted"]["to"] == old_digest
        assert web["reverted"]["from"] == "condo-test/busybox:2"
        if new_id is not None:
            assert await image_id_of(docker_cli, reference) == new_id  # the tag is untouched
        assert condo.running is not None
        history = condo.running.history.view("web")["web"]
        assert (history[0]["image"], history[0]["outcome"]) == (old_digest, "stable")


async def poll_web(client: httpx.AsyncClient, ok: Callable[[dict[str, Any]], bool]) -> Any:
    """`/v1/state`'s web (condo is another process) once `ok` holds."""
    while True:
        try:
            response = await client.get("/v1/state")
        except httpx.TransportError:  # not listening yet (a restart)
            response = None
        if response is not None and response.status_code == 200:
            web = response.json()["services"].get("web")
            if web is not None and ok(web):
                return web
        await trio.sleep(0.1)


async def test_a_kill9_in_the_probation_of_the_next_spec_still_reverts_by_digest(
    tmp_path: Path,
    docker: DockerClient,
    docker_cli: DockerCli,
    reference: str,
    make_image: MakeImage,
    nursery: trio.Nursery,
) -> None:
    old_id, old_digest = await make_image("old")
    port = free_port()
    async with (
        condo_files(tmp_path, docker) as condo,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client,
    ):
        await condo.spawn(nursery, server=f"127.0.0.1:{port}")
        condo.write("web", good_spec(reference))
        with trio.fail_after(30):
            await poll_web(client, lambda w: w["state"] == "Stable" and w["deploying"] is None)
        condo.write("web", BAD)
        with trio.fail_after(30):
            bad = await poll_web(
                client,
                lambda w: (
                    w["state"] == "Stable"
                    and w["current"]["image"] == "condo-test/busybox:2"
                    and w["probation_until"] is not None
                ),
            )
        # The kill comes once the state file says so too: `/v1/state` is condo's memory, and
        # the file is written just after (coalesced, fsynced). A kill -9 before that write
        # restarts from the record before the probation (the container is then started again,
        # not reverted): CI once killed it in that window.
        with trio.fail_after(30):
            while not condo.state_file()["services"]["web"].get("on_probation"):
                await trio.sleep(0.05)
        condo.kill9()
        assert condo.process is not None
        await condo.process.wait()
        # What the file says the last good is: pinned to the digest.
        record = condo.state_file()["services"]["web"]
        assert record["last_good"]["spec"]["Image"] == old_digest
        await docker_cli("rmi", "-f", old_id)
        await docker_cli("kill", bad["current"]["id"])  # died while condo was down
        await condo.spawn(nursery, server=f"127.0.0.1:{port}")
        with trio.fail_after(30):
            web = await poll_web(
                client, lambda w: w["state"] == "Stable" and w["reverted"] is not None
            )
        assert web["current"]["image"] == old_digest
        assert (await docker.inspect(web["current"]["id"])).image_id == old_id
        assert web["reverted"]["to"] == old_digest


async def test_a_pinned_digest_is_pulled_with_its_registrys_credentials(
    tmp_path: Path, docker: DockerClient, docker_cli: DockerCli
) -> None:
    """What a revert deploys, `repo@sha256:…`, is pulled by digest from the repository's own
    registry, with that registry's credentials (the private one on localhost:5001)."""
    private = f"{PRIVATE_REGISTRY}/condo-test/pin:{uuid.uuid4().hex[:12]}"
    login = {"DOCKER_CONFIG": str(tmp_path)}
    await docker_cli(
        "login", "--username", USER, "--password-stdin", PRIVATE_REGISTRY,
        stdin=PASSWORD.encode(), env=login,
    )  # fmt: skip
    dockerfile = f"FROM condo-test/busybox:1\nLABEL condo-test.pin={private}\n"
    await docker_cli(
        "build", "-q", "-t", private, "-", stdin=dockerfile.encode(), env={"DOCKER_BUILDKIT": "0"}
    )
    image_id = await image_id_of(docker_cli, private)
    try:
        await docker_cli("push", "-q", private, env=login)
        pinned = deploys.own_digest(private, await docker.image_digests(image_id))
        assert pinned is not None and pinned.startswith(f"{PRIVATE_REGISTRY}/condo-test/pin@")
        await docker_cli("rmi", "-f", image_id)
        assert not await docker.image_present(pinned)
        with trio.fail_after(60):
            with pytest.raises(DockerApiError, match="no basic auth credentials"):
                await docker.pull(pinned)  # the client without credentials
            auth = RegistryAuth.load(tmp_path / "config.json")  # what `docker login` wrote
            async with open_docker(auth=auth) as client:
                await client.pull(pinned)
        assert await docker.image_present(pinned)
        assert await image_id_of(docker_cli, pinned) == image_id
    finally:
        with trio.move_on_after(30, shield=True):
            if await docker.image_present(image_id):
                await trio.run_process(["docker", "rmi", "-f", image_id], capture_stdout=True)

"""Self-deploy, end to end: condo in its image, on the host engine, replacing itself via self.edn.

The first condo container is started by hand (as an operator would); writing `self.edn` makes it
start its successor, which adopts the workloads. Every condo container carries the test's labels
(or `condo.self=<unique host>` for the ones condo starts) and is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from condo import labels
from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from condo.selfdeploy import SELF_LABEL
from tests.integration.conftest import DockerCli
from tests.integration.harness import remove_host_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WORKLOAD = '{:spec {:Image "condo-test/busybox:1"}}\n'


class Site:
    """A spec directory mounted into condo containers, and their common host name."""

    def __init__(self, specs: Path, host: str) -> None:
        self.specs = specs
        self.host = host

    def state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.specs / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    async def wait_stable(self, service: str, limit: float = 60) -> dict[str, Any]:
        with trio.fail_after(limit):
            while True:
                record = ((self.state() or {}).get("services") or {}).get(service)
                if record is not None and record["phase"] == "Stable":
                    return record  # type: ignore[no-any-return]
                await trio.sleep(0.2)

    def self_spec(self, image: str, *extra: str) -> str:
        return (
            f'{{:Image "{image}" :Env ["CONDO_SERVER=off"] {" ".join(extra)}\n'
            f' :HostConfig {{:Binds ["/var/run/docker.sock:/var/run/docker.sock"\n'
            f'                       "{self.specs}:/var/lib/condo"]}}}}\n'
        )


@pytest.fixture
async def site(tmp_path: Path, docker: DockerClient) -> AsyncIterator[Site]:
    specs = tmp_path / "specs"
    specs.mkdir()
    host = f"test-{uuid.uuid4().hex[:10]}"
    yield Site(specs, host)
    with trio.move_on_after(60, shield=True):
        # condo containers first, so that none replaces a workload during the cleanup
        for row in await docker.list_containers(labels={SELF_LABEL: host}):
            with contextlib.suppress(ContainerNotFound):  # AutoRemove may beat us
                await docker.remove(row.id)
        await remove_host_containers(docker, host)


async def start_first_condo(
    docker_cli: DockerCli, image: str, site: Site, container_labels: Mapping[str, str]
) -> ContainerId:
    label_args = [a for k, v in container_labels.items() for a in ("--label", f"{k}={v}")]
    out = await docker_cli(
        "run", "-d", *label_args,
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{site.specs}:/var/lib/condo",
        "-e", f"CONDO_HOST={site.host}", "-e", "CONDO_SERVER=off",
        image,
    )  # fmt: skip
    return ContainerId(out.strip())


async def test_self_deploy_hands_over_without_touching_workloads(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    site: Site,
    container_labels: Mapping[str, str],
) -> None:
    second_tag = f"{condo_image}-next"
    await docker_cli("tag", condo_image, second_tag)
    try:
        first = await start_first_condo(docker_cli, condo_image, site, container_labels)
        (site.specs / "web.edn").write_text(WORKLOAD)
        before = await site.wait_stable("web")

        (site.specs / "self.edn").write_text(site.self_spec(second_tag))
        with trio.fail_after(90):
            while (info := await docker.inspect(first)).running:
                await trio.sleep(0.3)
            exit_code = info.exit_code
        assert exit_code == 0
        successors = await docker.list_containers(labels={SELF_LABEL: site.host})
        assert len(successors) == 1
        successor = await docker.inspect(successors[0].id)
        assert successor.running
        assert successor.image == second_tag
        assert successor.labels["condo.self-hash"]

        # The workload kept running throughout, and the new condo adopted it.
        rows = await docker.list_containers(labels=labels.owned_by(site.host, "web"))
        assert [r.id for r in rows] == [before["current"]["id"]]
        (site.specs / "more.edn").write_text(WORKLOAD)  # the successor supervises
        await site.wait_stable("more")
        after = await site.wait_stable("web")
        assert after["current"]["id"] == before["current"]["id"]
    finally:
        await docker_cli("rmi", "--no-prune", second_tag)


async def test_a_broken_successor_is_removed_and_the_old_condo_resumes(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    site: Site,
    container_labels: Mapping[str, str],
) -> None:
    first = await start_first_condo(docker_cli, condo_image, site, container_labels)
    (site.specs / "web.edn").write_text(WORKLOAD)
    before = await site.wait_stable("web")
    # This successor exits at once (its PREFIX does not exist): it never becomes healthy.
    (site.specs / "self.edn").write_text(
        site.self_spec(condo_image, ':Cmd ["run" "/does-not-exist"]')
    )
    with trio.fail_after(60):
        while not (await docker.list_containers(labels={SELF_LABEL: site.host})):
            await trio.sleep(0.2)
        while await docker.list_containers(labels={SELF_LABEL: site.host}):
            await trio.sleep(0.3)  # removed again
    assert (await docker.inspect(first)).running
    (site.specs / "more.edn").write_text(WORKLOAD)  # resumed: it deploys new specs
    await site.wait_stable("more")
    rows = await docker.list_containers(labels=labels.owned_by(site.host, "web"))
    assert [r.id for r in rows] == [before["current"]["id"]]

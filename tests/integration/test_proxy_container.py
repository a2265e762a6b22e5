"""condo in a container with `:proxy`: HAProxy runs as a container of condo's own image (host
networking), and a self-deploy of condo under load refuses and cuts no connection (issue 14).
A condo container with host networking and CAP_NET_ADMIN carries the `:tcp` listener on its NAT
table instead (no HAProxy container), across a self-deploy just as well.

The first condo is started by hand as test_selfdeploy does (bridge network, the engine's socket
and the spec folder bound, no API); the workload is test_proxy's busybox httpd behind a listener
on a free 127.0.0.1 port. A poller GETs through the listener every 50 ms on new connections, and
one slow request is open across the hand-over: none may fail, the slow one is answered by the
container it reached, and the successor adopts the same HAProxy container and still routes (a
deploy after the hand-over switches).

Cleanup: the site removes the host's containers and successors; the proxy container (labelled
`condo.proxy=<host>`) is removed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from condo.proxy.haproxy import PROXY_LABEL
from tests.integration.conftest import DockerCli
from tests.integration.harness import free_port
from tests.integration.test_proxy import (
    Poller,
    collapse,
    delete_nat_table,
    get,
    nat_table,
    spec,
    wait_answer,
)
from tests.integration.test_selfdeploy import Site, open_site, start_first_condo

pytestmark = [pytest.mark.docker, pytest.mark.slow]


async def proxy_containers(docker: DockerClient, host: str) -> list[ContainerId]:
    return [row.id for row in await docker.list_containers(labels={PROXY_LABEL: host})]


async def first_condo_serving_one(
    docker_cli: DockerCli,
    image: str,
    site: Site,
    container_labels: Mapping[str, str],
    port: int,
    *run_args: str,
) -> ContainerId:
    """condo's first container (started by hand, more `docker run` arguments if given), its
    workload "one" answering through the listener on `port`."""
    first = await start_first_condo(docker_cli, image, site, container_labels, *run_args)
    (site.specs / "web.edn").write_text(spec("one", port))
    await site.wait_stable("web", limit=90)
    await wait_answer(port, "one", limit=60)
    return first


async def self_deploy_under_load(
    docker: DockerClient, site: Site, port: int, first: ContainerId, successor: str
) -> None:
    """condo (`first`) self-deploys to the `successor` self spec while a poller GETs through
    the listener on `port` and one slow request is open; then a deploy through the successor
    switches "one" to "two". No request may fail; the slow one is answered by "one", the
    container it reached."""
    poller = Poller(port)
    slow_answer: list[str] = []

    async def slow_get() -> None:
        slow_answer.append(await get(port, "/cgi-bin/slow"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        nursery.start_soon(slow_get)
        await trio.sleep(0.3)  # the slow request is in
        (site.specs / "self.edn").write_text(successor)
        while (await docker.inspect(first)).running:
            await trio.sleep(0.2)
        # The successor routes: a deploy switches.
        (site.specs / "web.edn").write_text(spec("two", port))
        await wait_answer(port, "two", limit=90)
        while not slow_answer:
            await trio.sleep(0.05)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()

    assert poller.failures == []
    assert slow_answer == ["one"]
    assert collapse(poller.answers) == ["one", "two"]


async def test_condo_in_a_container_self_deploys_under_load_through_its_proxy(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    tmp_path: Path,
    container_labels: Mapping[str, str],
) -> None:
    second_tag = f"{condo_image}-proxy"
    await docker_cli("tag", condo_image, second_tag)
    site: Site | None = None
    try:
        async with open_site(tmp_path, docker) as site:
            port = free_port()
            with trio.fail_after(180):
                first = await first_condo_serving_one(
                    docker_cli, condo_image, site, container_labels, port
                )

                # HAProxy is a container of condo's image, with host networking.
                [proxy_id] = await proxy_containers(docker, site.host)
                proxy = await docker.inspect(proxy_id)
                assert proxy.running and proxy.image_id == (await docker.inspect(first)).image_id
                started = await docker_cli("inspect", "-f", "{{.State.StartedAt}}", proxy_id)

                # The successor adopts HAProxy and routes.
                await self_deploy_under_load(docker, site, port, first, site.self_spec(second_tag))
                assert await proxy_containers(docker, site.host) == [proxy_id]
                # Never restarted: the same process served throughout.
                assert (
                    await docker_cli("inspect", "-f", "{{.State.StartedAt}}", proxy_id) == started
                )
    finally:
        if site is not None:
            with trio.move_on_after(30, shield=True):
                for cid in await proxy_containers(docker, site.host):
                    with contextlib.suppress(ContainerNotFound):
                        await docker.remove(cid)
        await docker_cli("rmi", "--no-prune", second_tag)


async def test_condo_in_a_host_network_container_self_deploys_on_its_nat(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    tmp_path: Path,
    container_labels: Mapping[str, str],
) -> None:
    second_tag = f"{condo_image}-nat"
    await docker_cli("tag", condo_image, second_tag)
    site: Site | None = None
    try:
        async with open_site(tmp_path, docker) as site:
            port = free_port()
            with trio.fail_after(180):
                first = await first_condo_serving_one(
                    docker_cli, condo_image, site, container_labels, port,
                    "--network", "host", "--cap-add", "NET_ADMIN",
                )  # fmt: skip
                # The kernel's NAT carries the listener: condo's table, no HAProxy container.
                assert "dnat to 127.0.0.1:" in await nat_table(site.host)
                assert await proxy_containers(docker, site.host) == []

                # The successor rewrites the table from its store and routes.
                successor = (
                    f'{{:Image "{second_tag}" :Env ["CONDO_SERVER=off"]\n'
                    ' :HostConfig {:NetworkMode "host" :CapAdd ["NET_ADMIN"]\n'
                    '              :Binds ["/var/run/docker.sock:/var/run/docker.sock"\n'
                    f'                      "{site.specs}:/var/lib/condo"]}}}}\n'
                )
                await self_deploy_under_load(docker, site, port, first, successor)
                assert await proxy_containers(docker, site.host) == []
    finally:
        if site is not None:
            await delete_nat_table(site.host)
        await docker_cli("rmi", "--no-prune", second_tag)

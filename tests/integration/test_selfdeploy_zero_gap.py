"""Self-deploy without API gap: host networking and `--server-reuse-port` (issue item 7).

The first condo container is started by hand with `--network host`, listening with SO_REUSEPORT on
a free loopback port this test picks; `self.edn` asks for the same. Both are the README's example
("Self-deploy without API gap"), run with bash, with this test's port, folder, host name, image
and container name (and labels) substituted. Nothing is published, so
there is no port clash: the successor starts beside the old condo and listens on the same port
while the old one still does; then the old one exits. Pollers ask `/healthz` and `/v1/state`
every 20 ms, each on a fresh connection, through the whole hand-over: none may fail.

Cleanup: the hand-started condo carries the test's labels; the successor and the workload carry
the test's unique host name (`condo.self=<host>`, condo's own labels) and are removed by it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from condo import labels
from condo.docker import DockerClient
from condo.selfdeploy import HAND_OVER_LABEL, SELF_LABEL
from tests.integration.conftest import DockerCli
from tests.integration.harness import free_port
from tests.integration.test_selfdeploy import WORKLOAD, Site, bash, open_site, readme_block

pytestmark = [pytest.mark.docker, pytest.mark.slow]

POLL_INTERVAL = 0.02
AFTER_EXIT = 1.0  # keep polling this long after the old condo exited: the successor answers


@attrs.define
class Poller:
    """GET `path` every POLL_INTERVAL on a new connection each time; every failure is kept.

    A request cut at the very moment the old condo closes (its accept queue reset, or a
    connection it accepted but had not read yet) is retried once on a new connection, as the
    README tells clients to: only what fails again, or any answer but 200, is a failure.
    """

    url: str
    answered: int = 0
    retried: int = 0
    failures: list[str] = attrs.Factory(list)
    last: Any = None

    async def run(self) -> None:
        # No keep-alive: each request is a new connection, accepted by whichever condo the kernel
        # picks, which is what a hand-over can break.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=2, limits=limits, trust_env=False) as client:
            while True:
                try:
                    try:
                        answer = await client.get(self.url)
                    except httpx.TransportError:
                        self.retried += 1
                        answer = await client.get(self.url)
                    if answer.status_code == 200:
                        self.answered += 1
                        self.last = answer.json()
                    else:
                        self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                await trio.sleep(POLL_INTERVAL)


@pytest.fixture
async def site(tmp_path: Path, docker: DockerClient) -> AsyncIterator[Site]:
    async with open_site(tmp_path, docker) as made:
        yield made


async def wait_answers(url: str) -> None:
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.2)


async def test_host_networking_with_reuse_port_hands_over_without_a_failed_request(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    site: Site,
    container_labels: Mapping[str, str],
    container_name: Callable[[str], str],
) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    second_tag = f"{condo_image}-zero-gap"
    await docker_cli("tag", condo_image, second_tag)
    try:
        with trio.fail_after(120):
            # The README's example as written, on this test's port, folder, host, image, name.
            def readme(containing: str) -> str:
                label_args = " ".join(f"--label {k}={v}" for k, v in container_labels.items())
                return (
                    readme_block(containing)
                    .replace("4281", str(port))  # first: the names below are random hex
                    .replace("--name condo", f"--name {container_name('condo')} {label_args}")
                    .replace("$(hostname)", site.host)
                    .replace("/srv/condo", str(site.specs))
                    .replace("condo:dev", condo_image)
                    .replace("condo:1.1", second_tag)
                )

            await bash(readme("-e CONDO_SERVER_REUSE_PORT=1"))
            first = (await docker.inspect(container_name("condo"))).id
            await wait_answers(f"{api}/healthz")
            (site.specs / "web.edn").write_text(WORKLOAD)
            before = await site.wait_stable("web")

            pollers = [Poller(f"{api}/healthz"), Poller(f"{api}/v1/state")]
            async with trio.open_nursery() as polling:
                for poller in pollers:
                    polling.start_soon(poller.run)
                await bash(readme(':NetworkMode "host"'))
                while (info := await docker.inspect(first)).running:
                    status = (pollers[1].last or {}).get("self") or {}
                    if status.get("state") == "failed":  # no need to wait for the time cap
                        pytest.fail(f"the self-deploy failed: {status}")
                    await trio.sleep(0.1)
                answered_before_exit = sum(p.answered for p in pollers)
                # From here on only the successor listens on the port: what answers now is it.
                await trio.sleep(AFTER_EXIT)
                polling.cancel_scope.cancel()
            assert info.exit_code == 0

        retried = [p.retried for p in pollers]
        assert [p.failures for p in pollers] == [[], []], f"retried once: {retried}"
        assert sum(p.answered for p in pollers) - answered_before_exit > AFTER_EXIT / 0.1
        # Start-beside, not stop-then-start: no hand-over container was ever needed.
        assert await docker.list_containers(labels={HAND_OVER_LABEL: site.host}) == []
        [row] = await docker.list_containers(labels={SELF_LABEL: site.host})
        successor = await docker.inspect(row.id)
        assert successor.running and successor.image == second_tag
        assert successor.labels["condo.self-hash"]
        # The workload was never touched.
        rows = await docker.list_containers(labels=labels.owned_by(site.host, "web"))
        assert [r.id for r in rows] == [before["current"]["id"]]
    finally:
        await docker_cli("rmi", "--no-prune", second_tag)

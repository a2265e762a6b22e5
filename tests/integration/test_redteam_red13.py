"""Red team of issue 13 (safe deploys) on the real engine: a `condo run` process killed with
-9 in the middle of a revert comes back to the last good spec alone (no duplicate container,
no new attempt of the reverted spec, `reverted` kept)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo import labels
from condo.docker import DockerClient
from tests.integration.harness import CondoUnderTest, condo_files, free_port

pytestmark = pytest.mark.docker

GOOD = "condo-test/healthy:1"
GOOD_SPEC = f'{{:spec {{:Image "{GOOD}"}} :pull :never :stop-timeout 1}}'
# Healthy at its first check, dies 2 s after it started: in its probation.
DIES_SOON = """{:spec {:Image "condo-test/busybox:2"
        :Cmd ["sh" "-c" "sleep 2; exit 7"]
        :Healthcheck {:Test ["CMD" "true"] :Interval 100000000}}
 :pull :never :stop-timeout 1 :probation 5 :on-failure :revert}"""


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def poll_web(
    client: httpx.AsyncClient, ok: Callable[[dict[str, Any]], bool], *, every: float = 0.1
) -> dict[str, Any]:
    """Poll `/v1/state` (condo is another process) until web's view satisfies `ok`."""
    while True:
        try:
            response = await client.get("/v1/state")
        except httpx.TransportError:  # not listening yet (a restart)
            response = None
        if response is not None and response.status_code == 200:
            web: dict[str, Any] | None = response.json()["services"].get("web")
            if web is not None and ok(web):
                return web
        await trio.sleep(every)


async def test_kill9_in_the_middle_of_a_revert_comes_back_to_the_last_good_alone(
    condo: CondoUnderTest, docker: DockerClient, nursery: trio.Nursery
) -> None:
    port = free_port()
    await condo.spawn(nursery, server=f"127.0.0.1:{port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        condo.write("web", GOOD_SPEC)
        with trio.fail_after(30):
            good = await poll_web(
                client,
                lambda w: w["state"] == "Stable" and (w["current"] or {}).get("image") == GOOD,
            )
        good_image = (await docker.inspect(good["current"]["id"])).image_id
        condo.write("web", DIES_SOON)
        # The revert is decided ([:Before]: nothing serves, the last good is on its way): kill.
        with trio.fail_after(30):
            mid = await poll_web(client, lambda w: w["reverted"] is not None, every=0.02)
        condo.kill9()
        assert condo.process is not None
        await condo.process.wait()
        await condo.spawn(nursery, server=f"127.0.0.1:{port}")
        with trio.fail_after(30):
            back = await poll_web(
                client,
                lambda w: w["state"] == "Stable" and w["current"]["image"] == good_image,
            )
        assert back["reverted"]["from"] == "condo-test/busybox:2", mid
        # Long enough for a new attempt of the bad spec (it would die in 2 s) to show.
        await trio.sleep(4)
        web = await poll_web(client, lambda w: True)
    assert web["state"] == "Stable" and web["deploying"] is None
    assert web["current"]["id"] == back["current"]["id"]
    assert web["reverted"] == back["reverted"]
    containers = await condo.containers("web")
    assert [c.id for c in containers] == [web["current"]["id"]]
    assert all(c.labels.get(labels.SPEC_HASH) != web["spec_hash"] for c in containers)

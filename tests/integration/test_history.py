"""The deploy history on the real engine: a `condo run` process deploys v1, v2 ([:After]), a
failing v3, then loses its spec; `/v1/history` shows each outcome, with the digest the engine
reports, and a kill -9 and restart keep all of it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo.docker import DockerClient
from condo.history import history_path
from tests.integration.harness import CondoUnderTest, condo_files, free_port

pytestmark = pytest.mark.docker

V1 = "localhost:5000/condo-test/busybox:1"  # pushed: the engine knows its registry digest
V2 = "condo-test/http:2"  # never pushed: no digest
V3 = "condo-test/exits:1"  # exits at once


def spec(image: str, extra: str = "") -> str:
    # httpd, PID 1, ignores SIGTERM: a short stop timeout keeps the retire (and the test) short.
    return f'{{:spec {{:Image "{image}"}} :deploy [:After 0] :pull :never :stop-timeout 1{extra}}}'


# V3 must run this long to be stable. With the default 0, a V3 that the engine still shows
# running when condo inspects it after the start (1 start in 5, more under load: exiting takes
# a moment) is stable at once and replaces V2, and the history rightly shows that instead.
V3_STABLE_AFTER = " :stable-after 3"


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def wait_history(
    client: httpx.AsyncClient, ok: Callable[[list[dict[str, Any]]], bool], limit: float = 30
) -> list[dict[str, Any]]:
    """Poll `/v1/history?name=web` (condo is another process) until `ok` holds."""
    with trio.fail_after(limit):
        while True:
            try:
                response = await client.get("/v1/history", params={"name": "web"})
            except httpx.TransportError:  # not listening yet (a restart)
                response = None
            if response is not None and response.status_code == 200:
                deploys: list[dict[str, Any]] = response.json()["services"]["web"]
                if ok(deploys):
                    return deploys
            await trio.sleep(0.1)


def outcomes(deploys: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(d["image"], d["outcome"]) for d in deploys]


async def test_history_of_each_outcome_survives_kill9(
    condo: CondoUnderTest, docker: DockerClient, nursery: trio.Nursery
) -> None:
    port = free_port()
    await condo.spawn(nursery, server=f"127.0.0.1:{port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        condo.write("web", spec(V1))
        [first] = await wait_history(
            client, lambda d: outcomes(d) == [(V1, "stable")] and d[0]["digest"] is not None
        )
        # The digest is the engine's RepoDigests entry of the image the container runs.
        container = await docker.inspect(first["container"])
        assert first["digest"] in await docker.image_digests(container.image_id)
        assert first["digest"].startswith("localhost:5000/condo-test/busybox@sha256:")
        assert first["strategy"] == ["After", 0]
        assert first["stable_at"] >= first["started_at"]

        condo.write("web", spec(V2))
        await wait_history(client, lambda d: outcomes(d) == [(V2, "stable"), (V1, "replaced")])

        condo.write("web", spec(V3, V3_STABLE_AFTER))
        deploys = await wait_history(
            client, lambda d: outcomes(d)[:2] == [(V3, "failed"), (V2, "stable")]
        )
        # "exited at once" (gone by the inspect after the start) or "died (exit 3)" (after it).
        assert "exit" in deploys[0]["error"]
        assert deploys[0]["stable_at"] is None and deploys[0]["ended_at"] is not None

        condo.remove("web")
        deploys = await wait_history(client, lambda d: outcomes(d)[1] == (V2, "removed"))
        assert outcomes(deploys) == [(V3, "failed"), (V2, "removed"), (V1, "replaced")]
        assert deploys[1]["digest"] is None  # a local-only image
        assert deploys[2]["digest"] == first["digest"]

        # On disk before the kill (the writer coalesces; give it its moment).
        path = history_path(condo.state_path)
        with trio.fail_after(10):
            while json.loads(path.read_text())["services"]["web"] != deploys:
                await trio.sleep(0.05)
        condo.kill9()
        assert condo.process is not None
        await condo.process.wait()
        await condo.spawn(nursery, server=f"127.0.0.1:{port}")
        after = await wait_history(client, lambda d: True)
        assert after == deploys

        unknown = await client.get("/v1/history", params={"name": "nope"})
        blank = await client.get("/v1/history", params={"name": " "})
        everything = await client.get("/v1/history")
    assert unknown.status_code == 404
    assert blank.status_code == 400
    assert everything.json() == {"services": {"web": deploys}}

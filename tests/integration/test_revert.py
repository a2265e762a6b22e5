"""Safe deploys on the real engine: `:probation` and `:on-failure :revert`.

A bad image that turns healthy and dies seconds later, under `:probation 5 :on-failure :revert`,
brings the previous image back, pinned to its registry digest, and is never tried again, with a
`deploy.reverted` notice to a webhook; a
`[:Before]` spec that never turns healthy lets the previous spec serve again. `condo wait` on an
image that failed for good (reverted, or an image that does not exist) exits 3 at once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from condo import labels
from condo.config import Bind
from condo.docker import DockerClient
from condo.run import run_condo
from condo.web import ApiServer
from tests.integration.harness import CondoUnderTest, condo_files, free_port
from tests.integration.test_notify import TOKEN, Hook

pytestmark = pytest.mark.docker

# The registry's copy (pulled if a test removed the local one): it has a digest to pin.
GOOD = "localhost:5000/condo-test/healthy:1"
PINNED = "localhost:5000/condo-test/healthy@sha256:"
GOOD_SPEC = f'{{:spec {{:Image "{GOOD}"}} :pull :missing :stop-timeout 1}}'
# Healthy at its first check (0.1 s), dies 2 s after it started: after turning Stable.
DIES_SOON = """{:spec {:Image "condo-test/busybox:2"
        :Cmd ["sh" "-c" "sleep 2; exit 7"]
        :Healthcheck {:Test ["CMD" "true"] :Interval 100000000}}
 :pull :never :stop-timeout 1 :probation 5 :on-failure :revert}"""
NEVER_HEALTHY = """{:spec {:Image "condo-test/unhealthy:1"}
 :pull :never :stop-timeout 1 :health-timeout 4 :on-failure :revert}"""


@pytest.fixture
async def api() -> ApiServer:
    """condo's HTTP API on a port of its own (for `condo wait`)."""
    return await ApiServer.listen(Bind(host="127.0.0.1", port=0))


@pytest.fixture
async def hook(nursery: trio.Nursery) -> Hook:
    """A webhook of the test's own, for `--notify`."""
    receiver = Hook(free_port())
    await nursery.start(receiver.serve)
    return receiver


@pytest.fixture
async def condo(
    tmp_path: Path, docker: DockerClient, api: ApiServer, hook: Hook
) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as files, trio.open_nursery() as nursery:
        config = attrs.evolve(
            files.config(),
            server=Bind(host="127.0.0.1", port=0),
            notify_urls=(f"http://127.0.0.1:{hook.port}/hooks/{TOKEN}",),
        )
        files.running = await nursery.start(functools.partial(run_condo, config, web=api))
        try:
            yield files
        finally:
            files.running.shutdown()


async def condo_wait(url: str, image: str) -> tuple[int, str]:
    """`condo wait` (the real command) for web on `image`: its exit code and stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "condo", "wait", "--name", "web", "--image", image,
         "--timeout", "120", "--url", url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )  # fmt: skip
    return result.returncode, result.stderr.decode()


def reverted(view: dict[str, Any]) -> bool:
    web = view["services"].get("web")
    return web is not None and web["reverted"] is not None and web["state"] == "Stable"


async def serve_good(condo: CondoUnderTest, docker: DockerClient) -> str:
    """Deploy GOOD; the id of the image it runs."""
    condo.write("web", GOOD_SPEC)
    web = await condo.wait_state("web", "Stable", image=GOOD, limit=30)
    return (await docker.inspect(web["current"]["id"])).image_id


async def test_a_container_dying_in_its_probation_is_reverted_to_the_previous_image(
    condo: CondoUnderTest, docker: DockerClient, api: ApiServer, hook: Hook
) -> None:
    good_image = await serve_good(condo, docker)
    condo.write("web", DIES_SOON)
    # `condo wait` on the bad image, started before the revert, ends at once with exit 3.
    with trio.fail_after(40):
        code, stderr = await condo_wait(api.url, "condo-test/busybox:2")
    assert code == 3, stderr
    assert f"condo-test/busybox:2 failed on {condo.host}: reverted to {PINNED}" in stderr
    assert "during its 5 s probation" in stderr
    view = await condo.wait(reverted, limit=30)
    web = view["services"]["web"]
    # Back on the image the previous spec ran, pinned by its registry digest (a re-pushed tag
    # cannot sneak in).
    pinned = web["current"]["image"]
    assert pinned.startswith(PINNED)
    assert (await docker.inspect(web["current"]["id"])).image_id == good_image
    assert web["reverted"]["from"] == "condo-test/busybox:2"
    assert web["reverted"]["to"] == pinned
    assert "died (exit 7) during its 5 s probation" in web["reverted"]["reason"]
    assert web["attempt"] == 0 and web["retry_at"] is None
    # No further attempt of the bad spec: its failed container went once the last good was
    # Stable again, none was made since, and its history entry counts one attempt.
    await trio.sleep(3)
    web = condo.service("web")
    assert web is not None and web["state"] == "Stable" and web["deploying"] is None
    bad = [
        c
        for c in await condo.containers("web")
        if c.labels.get(labels.SPEC_HASH) == web["spec_hash"]
    ]
    assert bad == []
    assert condo.running is not None
    history = condo.running.history.view("web")["web"]
    assert [(d["image"], d["outcome"]) for d in history] == [
        (pinned, "stable"),
        ("condo-test/busybox:2", "reverted"),
        (GOOD, "replaced"),
    ]
    assert history[1]["attempts"] == 1
    # The webhook was told, in order, with what serves again and why.
    events = await hook.wait_events(5)
    assert events[:5] == [
        "deploy.started",
        "deploy.stable",
        "deploy.started",
        "deploy.stable",
        "deploy.reverted",
    ], events
    told = hook.bodies[4]
    assert (told["image"], told["previous_image"]) == (pinned, "condo-test/busybox:2")
    assert "during its 5 s probation" in told["error"]


async def test_before_a_spec_that_never_turns_healthy_lets_the_previous_one_serve_again(
    condo: CondoUnderTest, docker: DockerClient
) -> None:
    good_image = await serve_good(condo, docker)
    condo.write("web", NEVER_HEALTHY)
    # Within its health timeout plus a start.
    view = await condo.wait(reverted, limit=20)
    web = view["services"]["web"]
    assert web["current"]["image"].startswith(PINNED)
    assert (await docker.inspect(web["current"]["id"])).image_id == good_image
    assert web["reverted"]["from"] == "condo-test/unhealthy:1"
    assert await condo.running_ids("web") == {web["current"]["id"]}


async def test_condo_wait_fails_at_once_for_an_image_that_does_not_exist(
    condo: CondoUnderTest, api: ApiServer
) -> None:
    condo.write("web", '{:spec {:Image "condo-test/nope:1"} :pull :never}')
    with trio.fail_after(40):
        code, stderr = await condo_wait(api.url, "condo-test/nope:1")
    assert code == 3, stderr
    assert f"condo-test/nope:1 failed on {condo.host}: pull condo-test/nope:1:" in stderr

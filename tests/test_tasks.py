"""run_beside: the single error leaves unwrapped; the watcher and the body end each other."""

from __future__ import annotations

import pytest
import trio

from condo.docker import published_host_ports
from condo.selfdeploy import own_container_id
from condo.tasks import run_beside


async def idle(task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    await trio.sleep_forever()


async def test_the_body_result_comes_back_and_the_watcher_is_cancelled() -> None:
    async def body() -> int:
        await trio.lowlevel.checkpoint()
        return 7

    with trio.fail_after(5):
        assert await run_beside(body, idle) == 7


async def test_a_watcher_that_returns_cancels_the_body() -> None:
    async def watcher(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()

    async def body() -> int:
        await trio.sleep(3600)  # cancelled by the watcher's return long before
        return 1

    with trio.fail_after(5):
        assert await run_beside(body, watcher) is None


@pytest.mark.parametrize("where", ["body", "watcher", "watcher start"])
async def test_a_single_error_leaves_as_itself(where: str) -> None:
    async def body() -> None:
        if where == "body":
            raise KeyError("boom")
        await trio.sleep_forever()

    async def watcher(task_status: trio.TaskStatus[None]) -> None:
        if where == "watcher start":
            raise KeyError("boom")
        task_status.started()
        if where == "watcher":
            raise KeyError("boom")
        await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(KeyError, match="boom"):
        await run_beside(body, watcher)


def test_own_container_id_from_mountinfo() -> None:
    cid = "a" * 64
    line = f"612 600 8:1 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 rw\n"
    assert own_container_id("1 0 8:1 / / rw - ext4 rw\n" + line) == cid
    assert own_container_id("1 0 8:1 / / rw - ext4 rw\n") is None


@pytest.mark.parametrize(
    ("bindings", "ports"),
    [
        ({"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "4280"}]}, {"4280/tcp"}),
        ({"53/udp": [{"HostPort": "53"}], "80": [{"HostPort": ""}]}, {"53/udp"}),
        (None, set()),
    ],
)
def test_published_host_ports(bindings: object, ports: set[str]) -> None:
    assert published_host_ports(bindings) == ports

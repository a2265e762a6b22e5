"""`--notify` on the real engine: a webhook (a small Trio HTTP server of the test's own, on a port
it picked) gets every deploy notice, also those that happened while it was down, and never a
secret (a spec's Env value that the engine's own error message repeats, the API token in the
URL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from condo.docker import DockerClient
from tests.integration.harness import condo_files, free_port, running_condo

pytestmark = pytest.mark.docker

SECRET = "pw-8f3a9c1d7e"
TOKEN = "tok-5b7e2a90c4"
LIMIT = 60


class Hook:
    """A webhook on 127.0.0.1:`port`: records every POSTed body; `serve` opens the port, `down`
    closes it (connections are then refused)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.raw: list[bytes] = []
        self._arrived = trio.Event()
        self._scope: trio.CancelScope | None = None

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.raw]

    @property
    def events(self) -> list[str]:
        return [body["event"] for body in self.bodies]

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._answer, listeners)
                task_status.started()

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def wait_events(self, count: int) -> list[str]:
        with trio.fail_after(LIMIT):
            while len(self.raw) < count:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.events

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0].startswith(f"POST /hooks/{TOKEN} ")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            assert headers["content-type"] == "application/json"
            while len(body) < int(headers["content-length"]):
                body += await stream.receive_some()
            self.raw.append(body)
            self._arrived.set()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )


def spec(image: str, *extra: str) -> str:
    return f'{{:spec {{:Image "{image}" :Env ["PASSWORD={SECRET}"] {" ".join(extra)}}}}}'


async def test_notices_reach_a_webhook_that_was_down_and_carry_no_secret(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    hook = Hook(free_port())
    await nursery.start(hook.serve)
    url = f"http://127.0.0.1:{hook.port}/hooks/{TOKEN}"
    async with (
        condo_files(tmp_path, docker) as files,
        running_condo(files, notify_urls=(url,), api_token=TOKEN) as condo,
    ):
        condo.write("web", spec("condo-test/busybox:1"))
        assert await hook.wait_events(2) == ["deploy.started", "deploy.stable"]

        # The engine cannot start this one, and its error repeats the command: the secret.
        condo.write("web", spec("condo-test/busybox:1", f':Cmd ["/{SECRET}"]') + "\n")
        assert (await hook.wait_events(4))[2:] == ["deploy.started", "deploy.failed"]

        hook.down()
        condo.write("web", spec("condo-test/busybox:2"))
        await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
        condo.remove("web")
        await condo.wait(lambda view: "web" not in view["services"])
        assert condo.running is not None and condo.running.notifier is not None
        with trio.fail_after(LIMIT):
            while not next(c.failed for c in condo.running.notifier.counts().values()):
                await trio.sleep(0.1)  # the first attempt is made (and refused) at once
        assert len(hook.raw) == 4

        await nursery.start(hook.serve)
        events = await hook.wait_events(7)
        with trio.fail_after(LIMIT):
            # Counted once the answer is read, a moment after the hook has the body.
            while next(c.sent for c in condo.running.notifier.counts().values()) < 7:
                await trio.sleep(0.01)
        [counts] = condo.running.notifier.counts().values()

    assert events == [
        "deploy.started",
        "deploy.stable",
        "deploy.started",
        "deploy.failed",
        "deploy.started",
        "deploy.stable",
        "service.removed",
    ]
    bodies = hook.bodies
    images = [(b["image"], b["previous_image"]) for b in bodies]
    assert images == [
        ("condo-test/busybox:1", None),
        ("condo-test/busybox:1", None),
        ("condo-test/busybox:1", "condo-test/busybox:1"),
        ("condo-test/busybox:1", "condo-test/busybox:1"),
        ("condo-test/busybox:2", "condo-test/busybox:1"),
        ("condo-test/busybox:2", "condo-test/busybox:1"),
        ("condo-test/busybox:2", None),
    ]
    assert {(b["host"], b["service"]) for b in bodies} == {(files.host, "web")}
    assert all(isinstance(b["at"], float) and b["text"].endswith(".") for b in bodies)
    failed = bodies[3]
    assert "[redacted]" in failed["error"], failed
    assert failed["text"].startswith(
        f"Deploy of condo-test/busybox:1 failed for web on {files.host}"
    )
    for raw in hook.raw:
        assert SECRET.encode() not in raw
        assert TOKEN.encode() not in raw
    assert (counts.sent, counts.dropped) == (7, 0)
    assert counts.failed >= 1

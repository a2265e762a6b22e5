"""DockerClient against the real engine and the local registries (scripts/test-env)."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from condo.docker import ContainerId, DockerClient, RegistryAuth, open_docker
from condo.errors import (
    BadRequest,
    ConfigError,
    ContainerNotFound,
    DockerApiError,
    DockerUnavailable,
    EngineUnsupported,
    ImageNotFound,
    NameConflict,
)
from tests.integration.sockets import read_head, unix_listener

if TYPE_CHECKING:
    from tests.integration.conftest import DockerCli

pytestmark = pytest.mark.docker

BUSYBOX = "condo-test/busybox:1"
OPEN_COPY = "localhost:5000/condo-test/busybox:1"
PRIVATE = "localhost:5001/condo-test/private:1"
PRIVATE_REGISTRY = "localhost:5001"
USER, PASSWORD = "condo", "condo-test-secret"

Namer = Callable[[str], str]
RemoveImage = Callable[[str], Awaitable[None]]


def sleeper(labels: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    return {"Image": BUSYBOX, "Labels": dict(labels), **extra}


# --- endpoint and engine --------------------------------------------------------------------


async def test_ping_negotiates_the_api_version(docker: DockerClient) -> None:
    with trio.fail_after(10):
        assert await docker.ping() == "1.41"
        assert docker.api_version == "1.41"
        assert (await docker.engine_version()).startswith("20.10.")


@pytest.mark.parametrize(
    "url",
    [
        "/var/run/docker.sock",
        "unix://var/run/docker.sock",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:notaport",
        "https://127.0.0.1:2376",
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:2375/some/path",
    ],
)
async def test_malformed_url_is_config_error(url: str) -> None:
    with trio.fail_after(5), pytest.raises(ConfigError, match="docker URL"):
        async with open_docker(url):
            pass


async def test_credentials_in_url_are_refused_without_echo() -> None:
    with trio.fail_after(5), pytest.raises(ConfigError) as caught:
        async with open_docker("tcp://admin:hunter2@127.0.0.1:2375"):
            pass
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("url", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"])
async def test_unreachable_engine_opens_then_calls_are_unavailable(url: str) -> None:
    with trio.fail_after(10):
        async with open_docker(url) as client:  # opening never needs the engine
            with pytest.raises(DockerUnavailable) as caught:
                await client.ping()
            assert caught.value.transient
            with pytest.raises(DockerUnavailable):
                await client.inspect("anything")


# --- containers -----------------------------------------------------------------------------


async def test_container_round_trip(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    name, renamed = container_name("trip"), container_name("trip-renamed")
    with trio.fail_after(30):
        before = time.time()
        cid = await docker.create(
            sleeper(container_labels, HostConfig={"RestartPolicy": {"Name": "unless-stopped"}}),
            name=name,
        )
        created = await docker.inspect(cid)
        assert (created.name, created.status, created.running) == (name, "created", False)

        await docker.start(cid)
        await docker.start(cid)  # already started: 304, fine
        running = await docker.inspect(name)  # by name works too
        assert running.id == cid
        assert running.image == BUSYBOX
        assert dict(running.labels).items() >= dict(container_labels).items()
        assert (running.status, running.running, running.health) == ("running", True, None)
        assert running.restart_policy == "unless-stopped"
        assert before - 1 <= running.created_at <= time.time() + 1

        await docker.rename(cid, renamed)
        assert (await docker.inspect(cid)).name == renamed
        with pytest.raises(ContainerNotFound):
            await docker.inspect(name)

        await docker.stop(cid, grace=5)
        await docker.stop(cid, grace=5)  # already stopped: 304, fine
        stopped = await docker.inspect(cid)
        # The test image traps TERM and exits 0: a clean stop, not a kill.
        assert (stopped.status, stopped.running, stopped.exit_code) == ("exited", False, 0)

        await docker.remove(cid)
        with pytest.raises(ContainerNotFound) as gone:
            await docker.inspect(cid)
        assert not gone.value.transient
        with pytest.raises(ContainerNotFound):
            await docker.remove(cid)
        with pytest.raises(ContainerNotFound):
            await docker.start(cid)


async def test_remove_kills_a_running_container(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    with trio.fail_after(30):
        cid = await docker.create(sleeper(container_labels), name=container_name("rm"))
        await docker.start(cid)
        await docker.remove(cid)
        assert await docker.list_containers(labels=container_labels) == []


async def test_healthcheck_shows_in_inspect(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    with trio.fail_after(30):
        cid = await docker.create(
            {"Image": "condo-test/healthy:1", "Labels": dict(container_labels)},
            name=container_name("hc"),
        )
        await docker.start(cid)
        assert (await docker.inspect(cid)).health in ("starting", "healthy")


async def test_name_conflict(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    with trio.fail_after(30):
        first = await docker.create(sleeper(container_labels), name=container_name("a"))
        with pytest.raises(NameConflict) as on_create:
            await docker.create(sleeper(container_labels), name=container_name("a"))
        other = await docker.create(sleeper(container_labels), name=container_name("b"))
        with pytest.raises(NameConflict) as on_rename:
            await docker.rename(other, container_name("a"))
    assert on_create.value.status == on_rename.value.status == 409
    assert not on_create.value.transient
    assert first[:12] in on_create.value.message


async def test_bad_create_body_is_bad_request(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    body = sleeper(container_labels, Healthcheck={"Test": ["CMD", "true"], "Interval": 1})
    with trio.fail_after(10), pytest.raises(BadRequest) as caught:
        await docker.create(body, name=container_name("bad"))
    assert caught.value.status == 400
    assert not caught.value.transient
    assert "Interval" in caught.value.message


async def test_create_from_a_missing_image_is_image_not_found(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    body = {"Image": "condo-test/busybox:no-such-tag", "Labels": dict(container_labels)}
    with trio.fail_after(10), pytest.raises(ImageNotFound) as caught:
        await docker.create(body, name=container_name("noimage"))
    assert not caught.value.transient
    assert "No such image" in caught.value.message


async def test_list_by_labels(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Namer
) -> None:
    with trio.fail_after(30):
        plain = await docker.create(sleeper(container_labels), name=container_name("plain"))
        marked_labels = {**container_labels, "condo-test.extra": "yes"}
        marked = await docker.create(sleeper(marked_labels), name=container_name("marked"))
        await docker.start(marked)
        every = await docker.list_containers(labels=container_labels)
        only_marked = await docker.list_containers(labels=marked_labels)
        none = await docker.list_containers(labels={**container_labels, "condo-test.extra": "no"})
    assert {c.id for c in every} == {plain, marked}
    assert [c.id for c in only_marked] == [marked]
    assert none == []
    summary = only_marked[0]
    assert (summary.name, summary.image, summary.state) == (
        container_name("marked"),
        BUSYBOX,
        "running",
    )
    assert summary.labels["condo-test.extra"] == "yes"
    assert abs(summary.created_at - time.time()) < 60
    assert {c.id: c.state for c in every}[plain] == "created"


@pytest.mark.parametrize("tty", [False, True])
async def test_logs_tail(
    docker: DockerClient,
    container_labels: Mapping[str, str],
    container_name: Namer,
    docker_cli: DockerCli,
    tty: bool,
) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; done; sleep 0.3; echo boom >&2; exit 3"
    body = sleeper(container_labels, Cmd=["sh", "-c", script], Tty=tty)
    with trio.fail_after(30):
        cid = await docker.create(body, name=container_name("logs"))
        await docker.start(cid)
        assert (await docker_cli("wait", cid)).strip() == "3"
        tail = await docker.logs_tail(cid, lines=3)
        everything = await docker.logs_tail(cid, lines=100)
    newline = "\r\n" if tty else "\n"  # a TTY turns "\n" into "\r\n"; no frame headers either way
    assert tail == newline.join(["out4", "out5", "boom", ""])
    assert everything.splitlines() == ["out1", "out2", "out3", "out4", "out5", "boom"]


# --- images and pulls -----------------------------------------------------------------------


async def test_image_present(docker: DockerClient) -> None:
    with trio.fail_after(10):
        assert await docker.image_present(BUSYBOX)
        assert not await docker.image_present("condo-test/busybox:no-such-tag")
        assert not await docker.image_present("condo-test/no-such-image")


async def test_pull_from_the_open_registry(
    docker: DockerClient, remove_local_image: RemoveImage
) -> None:
    with trio.fail_after(60):
        await remove_local_image(OPEN_COPY)
        await docker.pull(OPEN_COPY)
        assert await docker.image_present(OPEN_COPY)


@pytest.mark.parametrize(
    "image",
    [
        "localhost:5000/condo-test/busybox:no-such-tag",
        "localhost:5000/condo-test/no-such-repo:1",
        # No tag means :latest (never "every tag"), and the registry has no :latest.
        "localhost:5000/condo-test/busybox",
    ],
)
async def test_pull_of_a_missing_image_is_image_not_found(docker: DockerClient, image: str) -> None:
    with trio.fail_after(30), pytest.raises(ImageNotFound) as caught:
        await docker.pull(image)
    assert not caught.value.transient
    assert "manifest unknown" in caught.value.message


async def test_pull_from_an_absent_registry_is_transient(docker: DockerClient) -> None:
    with trio.fail_after(30), pytest.raises(DockerApiError) as caught:
        await docker.pull("localhost:5999/condo-test/busybox:1")
    assert not isinstance(caught.value, ImageNotFound)
    assert caught.value.transient
    assert "connection refused" in caught.value.message


async def test_private_pull_without_credentials_fails_on_auth(
    docker: DockerClient, remove_local_image: RemoveImage
) -> None:
    with trio.fail_after(30):
        await remove_local_image(PRIVATE)
        with pytest.raises(DockerApiError) as caught:
            await docker.pull(PRIVATE)
    # The engine answers 500 "no basic auth credentials": not a missing image, and (as the
    # engine cannot tell it from a registry fault) transient.
    assert not isinstance(caught.value, ImageNotFound)
    assert caught.value.status == 500
    assert "no basic auth credentials" in caught.value.message


async def test_private_pull_with_a_wrong_password_keeps_it_secret(
    tmp_path: Path, remove_local_image: RemoveImage
) -> None:
    config = {"auths": {PRIVATE_REGISTRY: {"username": USER, "password": "wrong-hunter2"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    auth = RegistryAuth.load(tmp_path / "config.json")
    with trio.fail_after(30):
        async with open_docker(auth=auth) as client:
            await remove_local_image(PRIVATE)
            with pytest.raises(DockerApiError) as caught:
                await client.pull(PRIVATE)
    assert not isinstance(caught.value, ImageNotFound)
    assert "unauthorized" in caught.value.message
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value)


async def test_private_pull_with_a_real_docker_login(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker: DockerClient,
    docker_cli: DockerCli,
    remove_local_image: RemoveImage,
) -> None:
    with trio.fail_after(60):
        await docker_cli(
            "login",
            "--username",
            USER,
            "--password-stdin",
            PRIVATE_REGISTRY,
            stdin=PASSWORD.encode(),
            env={"DOCKER_CONFIG": str(tmp_path)},
        )
        written = json.loads((tmp_path / "config.json").read_text())
        assert "auth" in written["auths"][PRIVATE_REGISTRY]  # what `docker login` really writes
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
        async with open_docker(auth=RegistryAuth.load(None)) as client:
            await remove_local_image(PRIVATE)
            await client.pull(PRIVATE)
        assert await docker.image_present(PRIVATE)


async def test_private_pull_with_a_credential_helper(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker: DockerClient,
    remove_local_image: RemoveImage,
) -> None:
    asked = tmp_path / "asked"
    helper = tmp_path / "bin" / "docker-credential-condo-test"
    helper.parent.mkdir()
    answer = json.dumps({"ServerURL": PRIVATE_REGISTRY, "Username": USER, "Secret": PASSWORD})
    helper.write_text(f"#!/bin/sh\ncat >'{asked}'\nprintf '%s' '{answer}'\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(
        json.dumps({"credHelpers": {PRIVATE_REGISTRY: "condo-test"}})
    )
    with trio.fail_after(60):
        async with open_docker(auth=RegistryAuth.load(tmp_path / "config.json")) as client:
            await remove_local_image(PRIVATE)
            await client.pull(PRIVATE)
        assert await docker.image_present(PRIVATE)
    assert asked.read_text() == PRIVATE_REGISTRY


# --- what the real engine will not do on demand: a scripted engine on a unix socket ----------


class ScriptedEngine:
    """Answers each request path with a canned (status, headers, body); records what it got.

    For the few answers the real engine gives only in rare conditions (an error in the middle of
    a pull, an unreadable body) and for API versions other than this engine's.
    """

    def __init__(self, path: Path, api_version: str) -> None:
        self.path = path
        self.api_version = api_version
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = await unix_listener(self.path, backlog=8)
        await trio.serve_listeners(self._answer, [listener], task_status=task_status)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = await read_head(stream)
            if head is None:
                return
            request_line, *header_lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
            target = request_line.split(" ")[1]
            headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
            self.requests.append((target, headers))
            path = target.split("?")[0]
            status, body = self.answers.get(path, (404, b'{"message":"not scripted"}'))
            await stream.send_all(
                f"HTTP/1.1 {status} X\r\nApi-Version: {self.api_version}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )


@asynccontextmanager
async def scripted_engine(tmp_path: Path, api_version: str) -> AsyncIterator[ScriptedEngine]:
    engine = ScriptedEngine(tmp_path / "scripted.sock", api_version)
    engine.answers["/_ping"] = (200, b"OK")
    engine.answers["/version"] = (200, b'{"Version": "scripted", "MinAPIVersion": "1.24"}')
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        yield engine
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("announced", "spoken"),
    [("1.53", "1.51"), ("1.51", "1.51"), ("1.45", "1.45"), ("1.41", "1.41"), ("1.38", "1.38")],
)
async def test_api_version_is_the_engines_capped_at_ours(
    tmp_path: Path, announced: str, spoken: str
) -> None:
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, announced) as engine,
            open_docker(f"unix://{engine.path}") as client,
        ):
            assert not await client.image_present("x:1")  # negotiates first, lazily
            assert client.api_version == spoken
            assert await client.ping() == announced
    assert [target for target, _ in engine.requests] == [
        "/_ping",
        "/version",  # the floor, asked once per negotiation
        f"/v{spoken}/images/x:1/json",
        "/_ping",
    ]


def pull_stream(*lines: Mapping[str, Any]) -> tuple[int, bytes]:
    return 200, b"".join(json.dumps(line).encode() + b"\r\n" for line in lines)


async def test_an_engine_that_raises_its_floor_under_us_is_renegotiated(tmp_path: Path) -> None:
    too_old = (
        b'{"message": "client version 1.45 is too old. Minimum supported API version is 1.52"}'
    )
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, "1.45") as engine,
            open_docker(f"unix://{engine.path}") as client,
        ):
            engine.answers["/v1.45/containers/json"] = (200, b"[]")
            assert await client.list_containers(labels={}) == []
            # Restarted as a newer engine with a floor above what condo speaks.
            engine.api_version = "1.53"
            engine.answers["/v1.45/containers/json"] = (400, too_old)
            engine.answers["/version"] = (200, b'{"Version": "30.0", "MinAPIVersion": "1.52"}')
            with pytest.raises(EngineUnsupported, match=r"1\.52"):
                await client.list_containers(labels={})


SCRIPTED_CONTAINER = {
    "Id": "abc",
    "Name": "/web_1",
    "Created": "2024-01-01T00:00:00.000000000Z",
    "Config": {"Image": "condo-test/busybox:1"},
    "State": {"Status": "running", "Running": True},
}


@pytest.mark.parametrize("exists", [True, False])
async def test_a_rename_404_is_container_not_found_only_when_it_is_gone(
    tmp_path: Path, exists: bool
) -> None:
    """Docker 26+ answers 404 to a rename of a container on no default bridge: it exists."""
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, "1.45") as engine,
            open_docker(f"unix://{engine.path}") as client,
        ):
            engine.answers["/v1.45/containers/abc/rename"] = (
                404,
                b'{"message": "network not found"}',
            )
            if exists:
                engine.answers["/v1.45/containers/abc/json"] = (
                    200,
                    json.dumps(SCRIPTED_CONTAINER).encode(),
                )
                with pytest.raises(DockerApiError) as raised:
                    await client.rename(ContainerId("abc"), "web")
                assert not isinstance(raised.value, ContainerNotFound)
                assert raised.value.status == 404
            else:
                with pytest.raises(ContainerNotFound):
                    await client.rename(ContainerId("abc"), "web")


async def test_pull_error_inside_a_200_stream(tmp_path: Path) -> None:
    progress = {"status": "Pulling from condo-test/busybox", "id": "1"}
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, "1.41") as engine,
            open_docker(f"unix://{engine.path}") as client,
        ):
            engine.answers["/v1.41/images/create"] = pull_stream(
                progress, {"errorDetail": {"message": "unknown blob"}, "error": "unknown blob"}
            )
            with pytest.raises(DockerApiError) as lost_blob:
                await client.pull("localhost:5000/condo-test/busybox:1")
            engine.answers["/v1.41/images/create"] = pull_stream(
                progress, {"error": "manifest for x:1 not found: manifest unknown"}
            )
            with pytest.raises(ImageNotFound) as missing:
                await client.pull("localhost:5000/condo-test/busybox:1")
            engine.answers["/v1.41/images/create"] = pull_stream(
                progress, {"status": "Status: Downloaded newer image"}
            )
            await client.pull("localhost:5000/condo-test/busybox:1")  # no error line: success
    assert not isinstance(lost_blob.value, ImageNotFound)
    assert lost_blob.value.transient
    assert lost_blob.value.message == "unknown blob"
    assert not missing.value.transient


async def test_pull_sends_urlsafe_credentials(tmp_path: Path) -> None:
    password = "??~~:with-colon"  # standard base64 of this JSON would need "+" or "/"
    config = {"auths": {"localhost:5001": {"username": USER, "password": password}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    auth = RegistryAuth.load(tmp_path / "config.json")
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, "1.41") as engine,
            open_docker(f"unix://{engine.path}", auth=auth) as client,
        ):
            engine.answers["/v1.41/images/create"] = pull_stream({"status": "done"})
            await client.pull(PRIVATE)
            await client.pull("localhost:5000/condo-test/busybox")  # another registry: anonymous
    (first, first_headers), (second, second_headers) = engine.requests[2:]  # after ping, version
    assert first == "/v1.41/images/create?fromImage=localhost%3A5001%2Fcondo-test%2Fprivate&tag=1"
    assert second.endswith("fromImage=localhost%3A5000%2Fcondo-test%2Fbusybox&tag=latest")
    header = first_headers["x-registry-auth"]
    assert "+" not in header and "/" not in header and len(header) % 4 == 0
    assert json.loads(base64.urlsafe_b64decode(header)) == {
        "username": USER,
        "password": password,
        "serveraddress": PRIVATE_REGISTRY,
    }
    assert "x-registry-auth" not in second_headers


async def test_unreadable_answer_is_an_api_error(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            scripted_engine(tmp_path, "1.41") as engine,
            open_docker(f"unix://{engine.path}") as client,
        ):
            engine.answers["/v1.41/containers/c1/json"] = (200, b"<html>not json</html>")
            engine.answers["/v1.41/containers/c2/json"] = (200, b'{"Id": "c2"}')
            with pytest.raises(DockerApiError) as not_json:
                await client.inspect("c1")
            with pytest.raises(DockerApiError) as no_created:
                await client.inspect("c2")
    assert not_json.value.status == no_created.value.status == 502
    assert not_json.value.transient
    assert "timestamp" in no_created.value.message

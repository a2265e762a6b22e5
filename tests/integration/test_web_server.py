"""The HTTP API of a real `condo run` (in process) on the real engine, over real sockets.

/v1/state after a deploy, /healthz, /metrics (services and Docker calls), the websocket feed via
trio-websocket, the token, hypercorn's limits (431/413), and shutdown: 100 open long-polls and
a websocket are answered (503 / close 1001) and the process part is gone within 1 s; a feed
client that stopped reading is cut by the kernel (TCP_USER_TIMEOUT) instead of holding shutdown;
foreign Host and Origin are refused; under a low open-files limit (a `condo run` process), the
long-polls beyond the cap get 503 at once and a deploy still goes through.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from condo.config import DEFAULT_MAX_FEEDS, DEFAULT_MAX_WAITS, Bind
from condo.docker import DockerClient
from condo.errors import ConfigError
from condo.fds import web_caps
from condo.fsm import Failure, ServiceState
from condo.run import Running, run_condo
from condo.web import ApiServer, serve_web
from condo.web.serve import STALL_LIMIT
from tests.integration.harness import CondoUnderTest, condo_files, free_port

pytestmark = pytest.mark.docker

TOKEN = "integration-token"
CAP = 60
ROUTES = ("/v1/state", "/v1/global_state", "/v1/wait_for?name=a&image=b", "/metrics", "/healthz")


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


@attrs.frozen
class Served:
    running: Running
    url: str


async def serve(
    nursery: trio.Nursery,
    condo: CondoUnderTest,
    *,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> Served:
    """condo run with its web server on a free port of 127.0.0.1."""
    config = attrs.evolve(
        condo.config(),
        server=Bind(host="127.0.0.1", port=0),
        api_token=token,
        allowed_hosts=allowed_hosts,
    )
    web = await ApiServer.listen(Bind(host="127.0.0.1", port=0))
    assert web.port > 0
    running: Running = await nursery.start(functools.partial(run_condo, config, web=web))
    condo.running = running
    return Served(running=running, url=web.url)


def http(url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, **kwargs)


def handshake(path: str, host: str = "127.0.0.1", origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    origin_line = "" if origin is None else f"Origin: {origin}\r\n"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n{origin_line}"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def websocket_handshake(
    port: int, path: str, host: str = "127.0.0.1", origin: str | None = None
) -> bytes:
    """The server's first answer to a websocket upgrade of `path` (status line and more)."""
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(handshake(path, host, origin))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = await sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        with trio.move_on_after(0.2):  # the body of a refusal, if any
            answer += await sock.recv(4096)
        return answer


async def test_state_health_and_metrics_over_http(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CAP):
        served = await serve(nursery, condo)
        condo.write("web", '{:spec {:Image "condo-test/healthy:1"}}')
        stable = await condo.wait_state("web", "Stable", image="condo-test/healthy:1")
        async with http(served.url) as client:
            state = await client.get("/v1/state")
            health = await client.get("/healthz")
            metrics = await client.get("/metrics")
            page = await client.get("/")
    assert state.status_code == 200
    data = state.json()
    assert data["host"] == condo.host
    assert data["services"]["web"]["state"] == "Stable"
    assert data["services"]["web"]["current"]["id"] == stable["current"]["id"]
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["engine"]["ok"] is True
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("condo_service_state", service="web", state="Stable") == 1
    transition = {"service": "web", "from": "Wait", "to": "Stable"}
    assert value("condo_service_transitions_total", **transition) == 1
    assert value("condo_deploy_duration_seconds_count", service="web") == 1
    # The engine calls of the deploy, by endpoint template (no ids in label values).
    create = {"method": "POST", "endpoint": "/containers/create", "outcome": "201"}
    assert value("condo_docker_call_duration_seconds_bucket", le="+Inf", **create) == 1
    endpoints = {dict(labels).get("endpoint") for _, labels in samples}
    assert "/containers/{id}/start" in endpoints
    assert stable["current"]["id"] not in text
    assert page.status_code == 200
    assert "condo dashboard" in page.text


async def test_the_feed_over_a_real_websocket(condo: CondoUnderTest, nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        served = await serve(nursery, condo)
        ws_url = served.url.replace("http://", "ws://") + "/v1/feed"
        async with open_websocket_url(ws_url) as ws:
            first = json.loads(await ws.get_message())
            assert first["type"] == "snapshot"
            assert first["state"] == {"host": condo.host, "services": {}}
            condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
            states: list[str] = []
            while not states or states[-1] != "Stable":
                message = json.loads(await ws.get_message())
                if message["type"] != "snapshot":
                    continue  # the deploy history's messages come beside the snapshots
                assert message["version"] > first["version"]
                service = message["state"]["services"].get("web")
                if service is not None:
                    states.append(service["state"])
    assert states[-1] == "Stable"


async def test_the_token_over_http_and_websocket(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CAP):
        served = await serve(nursery, condo, token=TOKEN)
        async with http(served.url) as client:
            refused = await client.get("/v1/state")
            allowed = await client.get("/v1/state", headers={"Authorization": f"Bearer {TOKEN}"})
            health = await client.get("/healthz")
        ws_url = served.url.replace("http://", "ws://") + "/v1/feed"
        async with open_websocket_url(f"{ws_url}?token={TOKEN}") as ws:
            first = json.loads(await ws.get_message())
        port = int(served.url.rsplit(":", 1)[1])
        without = await websocket_handshake(port, "/v1/feed")
        wrong = await websocket_handshake(port, "/v1/feed?token=nope")
        right = await websocket_handshake(port, f"/v1/feed?token={TOKEN}")
    assert refused.status_code == 401
    assert refused.json() == {
        "error": "a valid API token is required (Authorization: Bearer TOKEN)"
    }
    assert allowed.status_code == 200
    assert health.status_code == 200
    assert first["type"] == "snapshot"
    assert without.startswith(b"HTTP/1.1 401")
    assert wrong.startswith(b"HTTP/1.1 401")
    assert b"a valid API token is required" in without
    assert right.startswith(b"HTTP/1.1 101")


async def test_foreign_hosts_and_origins_are_refused(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    # DNS rebinding: a page on rebound.example, whose name now resolves to 127.0.0.1, asks condo.
    with trio.fail_after(CAP):
        served = await serve(nursery, condo, allowed_hosts=("condo.example",))
        port = int(served.url.rsplit(":", 1)[1])
        rebound = {"Host": f"rebound.example:{port}"}
        async with http(served.url) as client:
            refused = [await client.get(path, headers=rebound) for path in ROUTES]
            answered = [
                await client.get("/v1/state", headers={"Host": host})
                for host in (f"localhost:{port}", f"127.0.0.1:{port}", "condo.example:8443")
            ]
        own = f"http://127.0.0.1:{port}"
        evil_origin = await websocket_handshake(port, "/v1/feed", origin="http://evil.example")
        evil_host = await websocket_handshake(port, "/v1/feed", host=f"rebound.example:{port}")
        same = await websocket_handshake(port, "/v1/feed", host=f"127.0.0.1:{port}", origin=own)
        no_origin = await websocket_handshake(port, "/v1/feed")
    for response in refused:
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/json"
        assert "--allowed-host" in response.json()["error"]
    assert [response.status_code for response in answered] == [200, 200, 200]
    assert evil_origin.startswith(b"HTTP/1.1 403")
    assert b"is not this API's own" in evil_origin
    assert evil_host.startswith(b"HTTP/1.1 403")
    assert same.startswith(b"HTTP/1.1 101")
    assert no_origin.startswith(b"HTTP/1.1 101")


async def test_limits_answer_without_html(condo: CondoUnderTest, nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        served = await serve(nursery, condo)
        async with http(served.url) as client:
            # Beyond one read (64 KiB) of an incomplete request: h11's limit applies.
            huge_header = await client.get("/v1/state", headers={"X-Big": "x" * 100_000})
        async with http(served.url) as client:
            huge_body = await client.request("GET", "/v1/state", content=b"x" * 200_000)
            missing = await client.get("/nope")
            wrong = await client.delete("/v1/state")
    assert huge_header.status_code == 431
    assert "html" not in huge_header.text.lower()
    assert huge_body.status_code == 413
    assert huge_body.json()["error"].startswith("request bodies are limited")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such route: /nope"}
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == "application/json"


async def test_shutdown_answers_100_long_polls_and_exits_within_a_second(
    condo: CondoUnderTest,
) -> None:
    statuses: list[int] = []
    close_codes: list[int] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    long = httpx.Timeout(10.0, read=120.0)

    async def long_poll(client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/wait_for", params={"name": "ghost", "image": "x:1"})
        statuses.append(response.status_code)

    async def feed(url: str, ready: trio.Event) -> None:
        # trio-websocket's client does not close its TCP stream after a close the server
        # started (it waits for the server's EOF, then drops the stream): own the stream here.
        port = int(url.rsplit(":", 1)[1])
        async with (
            await trio.open_tcp_stream("127.0.0.1", port) as stream,
            trio.open_nursery() as nursery,
        ):
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/v1/feed")
            await ws.get_message()
            ready.set()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            reason = closed.value.reason
            assert reason is not None
            close_codes.append(reason.code)

    with trio.fail_after(CAP):
        # The clients outlive the server: they must read the answers shutdown gives them.
        async with (
            http("http://unused", limits=limits, timeout=long) as client,
            trio.open_nursery() as clients,
        ):
            async with trio.open_nursery() as server:
                served = await serve(server, condo)
                client.base_url = httpx.URL(served.url)
                for _ in range(100):
                    clients.start_soon(long_poll, client)
                ready = trio.Event()
                clients.start_soon(feed, served.url, ready)
                await ready.wait()
                async with http(served.url) as probe:
                    while "condo_web_open_waits 100" not in (await probe.get("/metrics")).text:
                        await trio.sleep(0.05)
                started = time.monotonic()
                served.running.shutdown()
                # run_condo (and with it the web task) returns: the server nursery ends.
            stopped = time.monotonic() - started
    assert stopped < 1.0, f"condo took {stopped:.2f} s to stop"
    assert statuses == [503] * 100
    assert close_codes == [1001]


async def test_a_feed_client_that_stopped_reading_cannot_hold_shutdown(
    condo: CondoUnderTest,
) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as server:
            served = await serve(server, condo)
            port = int(served.url.rsplit(":", 1)[1])
            stalled = trio.socket.socket()
            await stalled.connect(("127.0.0.1", port))
            await stalled.send(handshake("/v1/feed"))
            assert (await stalled.recv(12)).startswith(b"HTTP/1.1 101")
            # Never read again; make the state big and changing, so the server's writes to this
            # client fill every buffer between them and block (in a write hypercorn shields).
            store = served.running.store
            big = "x" * 60_000
            for n in range(300):
                store.set_state("zz-filler", ServiceState(error=Failure(message=f"{n}{big}", at=0)))
                await trio.sleep(0.005)
            started = time.monotonic()
            served.running.shutdown()
        stopped = time.monotonic() - started
        stalled.close()
    # Without TCP_USER_TIMEOUT this never ends; with it, within STALL_LIMIT (+ the drain).
    assert stopped < STALL_LIMIT + 1.5, f"took {stopped:.2f} s"


async def test_serve_web_binds_the_configured_server(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = attrs.evolve(condo.config(), server=Bind(host="127.0.0.1", port=port))
    with trio.fail_after(CAP):
        running: Running = await nursery.start(functools.partial(run_condo, config, web=serve_web))
        async with http(f"http://127.0.0.1:{port}") as client:
            health: httpx.Response | None = None
            while health is None:
                try:
                    health = await client.get("/healthz")
                except httpx.ConnectError:  # serve_web binds once it starts: retry briefly
                    await trio.sleep(0.05)
    assert health.status_code == 200
    assert health.json()["host"] == running.config.host


async def test_a_taken_port_is_a_config_error() -> None:
    with trio.fail_after(CAP):
        first = await ApiServer.listen(Bind(host="127.0.0.1", port=0))
        try:
            with pytest.raises(ConfigError, match="cannot listen"):
                await ApiServer.listen(Bind(host="127.0.0.1", port=first.port))
        finally:
            first.close()
        with pytest.raises(ConfigError):
            await ApiServer.listen(Bind(host="no-such-host.invalid", port=0))


FD_LIMIT = 320  # condo's whole RLIMIT_NOFILE in the next test
CLIENTS = 400  # more long-polls than the whole limit


async def test_hundreds_of_long_polls_under_a_low_fd_limit_leave_condo_working(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    # A real `condo run` whose open-files limit is 320, soft and hard: without caps, 400 held
    # long-polls plus condo's own descriptors exceed it, and then the state file cannot be
    # written and the engine cannot be called (EMFILE). With them, the waits beyond the cap are
    # refused at once, and a deploy still goes through and answers the held ones.
    caps = web_caps(FD_LIMIT, DEFAULT_MAX_WAITS, DEFAULT_MAX_FEEDS)
    assert 0 < caps.waits < CLIENTS
    port = free_port()
    image = "condo-test/busybox:1"
    path = f"/v1/wait_for?name=web&image={image}&timeout=120"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    answers: list[tuple[int, bytes, float]] = []  # status, body, seconds from send to answer
    refused = trio.Semaphore(0)

    async def long_poll(connecting: trio.Semaphore) -> None:
        async with connecting:  # a few connects at a time: the listen backlog is 128
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(request)
        sent_at = trio.current_time()
        async with stream:  # closed once the answer is in, as HTTP clients do
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            assert length is not None
            while len(body) < int(length[1]):
                body += await stream.receive_some(65536)
        status = int(head.split()[1])
        answers.append((status, body, trio.current_time() - sent_at))
        if status == 503:
            refused.release()

    with trio.fail_after(CAP):
        await condo.spawn(nursery, server=f"127.0.0.1:{port}", fd_limit=FD_LIMIT)
        async with http(f"http://127.0.0.1:{port}") as probe:
            while True:
                try:
                    if (await probe.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:  # not listening yet
                    pass
                await trio.sleep(0.1)
            async with trio.open_nursery() as clients:
                connecting = trio.Semaphore(32)
                for _ in range(CLIENTS):
                    clients.start_soon(long_poll, connecting)
                for _ in range(CLIENTS - caps.waits):
                    await refused.acquire()
                open_waits = f"condo_web_open_waits {caps.waits}"
                while open_waits not in (await probe.get("/metrics")).text:
                    await trio.sleep(0.05)
                assert len(answers) == CLIENTS - caps.waits  # the held ones are still held
                condo.write("web", f'{{:spec {{:Image "{image}"}}}}')
                # The held long-polls are answered once `web` is Stable: the clients end.
            health = (await probe.get("/healthz")).json()
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * caps.waits + [503] * (CLIENTS - caps.waits)
    for status, body, seconds in answers:
        if status == 503:
            assert json.loads(body) == {
                "error": f"too many open waits (at most {caps.waits}; see --max-waits)",
                "status": "unavailable",
            }
            assert seconds < 5.0  # at once, not after a wait
    # The deploy went through: the engine was called, the state file written, nothing failed.
    assert health["status"] == "ok", health
    record = condo.state_file()["services"]["web"]
    assert record["phase"] == "Stable"
    assert await condo.running_ids("web") == {record["current"]["id"]}

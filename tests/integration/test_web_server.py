"""The HTTP API of a real `condo run` (in process) on the real engine, over real sockets.

/v1/state after a deploy, /healthz, /metrics (services and Docker calls), the websocket feed via
trio-websocket, the token, hypercorn's limits (431/413), and shutdown: 100 open long-polls and
a websocket are answered (503 / close 1001) and the process part is gone within 1 s; a feed
client that stopped reading is cut by the kernel (TCP_USER_TIMEOUT) instead of holding shutdown.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from condo.config import Bind
from condo.docker import DockerClient
from condo.errors import ConfigError
from condo.fsm import Failure, ServiceState
from condo.supervisor import Running, run_condo
from condo.web import WebServer, serve_web
from condo.web.serve import STALL_LIMIT
from tests.integration.harness import CondoUnderTest, condo_files

pytestmark = pytest.mark.docker

TOKEN = "integration-token"
CAP = 60


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


@attrs.frozen
class Served:
    running: Running
    url: str


async def serve(
    nursery: trio.Nursery, condo: CondoUnderTest, *, token: str | None = None
) -> Served:
    """condo run with its web server on a free port of 127.0.0.1."""
    config = attrs.evolve(condo.config(), server=Bind(host="127.0.0.1", port=0), api_token=token)
    web = await WebServer.listen(Bind(host="127.0.0.1", port=0))
    assert web.port > 0
    running: Running = await nursery.start(functools.partial(run_condo, config, web=web))
    condo.running = running
    return Served(running=running, url=web.url)


def http(url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, **kwargs)


def handshake(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: condo\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def websocket_handshake(port: int, path: str) -> bytes:
    """The server's first answer to a websocket upgrade of `path` (status line and more)."""
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(handshake(path))
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
    assert 'condo_service_state{service="web",state="Stable"} 1' in text
    assert 'condo_service_transitions_total{service="web",from="Wait",to="Stable"} 1' in text
    assert 'condo_deploy_duration_seconds_count{service="web"} 1' in text
    # The engine calls of the deploy, by endpoint template (no ids in label values).
    assert '{method="POST",endpoint="/containers/create",outcome="201",le="+Inf"} 1' in text
    assert 'endpoint="/containers/{id}/start"' in text
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
        first = await WebServer.listen(Bind(host="127.0.0.1", port=0))
        try:
            with pytest.raises(ConfigError, match="cannot listen"):
                await WebServer.listen(Bind(host="127.0.0.1", port=first.port))
        finally:
            first.close()
        with pytest.raises(ConfigError):
            await WebServer.listen(Bind(host="no-such-host.invalid", port=0))

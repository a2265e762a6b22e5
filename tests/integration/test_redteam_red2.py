"""Red team (red2): attacks on the HTTP API's Host/Origin checks, caps and start-up bind.

Each test states the promise it attacks (README "HTTP API", "Self-deploy") and fails when the
promise breaks. They are kept whether they pass or fail: the lead decides what to fix.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo.config import Bind
from condo.docker import DockerClient
from condo.errors import ConfigError
from condo.web import ApiServer
from condo.web.hosts import AllowedHosts
from tests.integration.harness import CondoUnderTest, condo_files, free_port

CAP = 60


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def _healthy(port: int) -> None:
    async with httpx.AsyncClient(trust_env=False) as probe:
        while True:
            try:
                if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:  # not listening yet
                pass
            await trio.sleep(0.1)


async def _answer_then_eof(port: int, request: bytes, *, wait: float) -> tuple[bytes, bool]:
    """Send `request`, read the whole answer (by Content-Length); then whether the server
    closes the connection within `wait` seconds (True) or keeps it open (False)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        assert length is not None, head
        while len(body) < int(length[1]):
            body += await stream.receive_some(65536)
        closed = False
        with trio.move_on_after(wait):
            closed = await stream.receive_some(65536) == b""
        return head, closed


# --- start-up: a taken port ------------------------------------------------------------------


async def test_a_taken_port_fails_start_up_even_when_the_name_has_a_second_free_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Promise (README "Self-deploy", zero gap): "--server-reuse-port (SO_REUSEPORT) is opt-in;
    # without it a second condo on a taken port must fail at start-up."
    # Attack: `--server localhost:PORT` where `localhost` has two addresses (stock Debian/Ubuntu
    # /etc/hosts: `::1 localhost ip6-localhost`; getaddrinfo gives ::1 and 127.0.0.1). The first
    # condo binds one; ApiServer.listen of the second condo treats EADDRINUSE on that one like
    # "no such address", tries the next, and starts on it: two condos on one port, supervising
    # the same specs, each answering half the clients. Simulated by resolving the name to
    # (127.0.0.1, ::1) with the first server on 127.0.0.1.
    with trio.fail_after(CAP):
        first = await ApiServer.listen(Bind(host="127.0.0.1", port=0))
        port = first.port
        real_getaddrinfo = trio.socket.getaddrinfo

        async def two_addresses(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host != "dual-stack-localhost":
                return await real_getaddrinfo(host, *args, **kwargs)
            stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
            return [
                (socket.AF_INET, *stream, ("127.0.0.1", port)),
                (socket.AF_INET6, *stream, ("::1", port, 0, 0)),
            ]

        monkeypatch.setattr(trio.socket, "getaddrinfo", two_addresses)
        second: ApiServer | None = None
        try:
            with pytest.raises(ConfigError, match="cannot listen"):
                second = await ApiServer.listen(Bind(host="dual-stack-localhost", port=port))
        finally:
            first.close()
            if second is not None:
                second.close()


# --- connections the server should close ----------------------------------------------------


@pytest.mark.docker
async def test_the_server_closes_connections_it_answered_with_connection_close(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    # Promise (README "Limits"): beyond the caps "the answer is 503 ... at once, with
    # Retry-After: 1 and Connection: close" (app.py: "so that the refused connection does not
    # linger either"). HTTP/1.1 (RFC 9112 9.6): a server that sends `Connection: close` closes
    # the connection after the response; so does one answering a request that says so, or an
    # HTTP/1.0 request without keep-alive.
    # Attack: ask, read the answer, do not hang up. hypercorn under quart-trio never closes
    # (the close runs in quart-trio's cancelled connection scope and is lost), so every refused
    # client keeps its descriptor until it hangs up by itself; a client that reads to EOF
    # (nc, HTTP/1.0 scripts) waits forever.
    port = free_port()
    refused = b"GET /v1/wait_for?name=a&image=b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    asked = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    old = b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    with trio.fail_after(CAP):
        await condo.spawn(nursery, "--max-waits", "0", server=f"127.0.0.1:{port}")
        await _healthy(port)
        results = {}
        for name, request in (("503 refusal", refused), ("close", asked), ("HTTP/1.0", old)):
            head, closed = await _answer_then_eof(port, request, wait=3.0)
            results[name] = (head.split(b"\r\n")[0].decode(), closed)
        assert condo.process is not None
        condo.process.terminate()
    assert results == {
        "503 refusal": ("HTTP/1.1 503 ", True),
        "close": ("HTTP/1.1 200 ", True),
        "HTTP/1.0": ("HTTP/1.1 200 ", True),
    }


FD_LIMIT = 320
REFUSED = 310  # nearly the whole limit: refused clients that do not hang up


@pytest.mark.docker
async def test_refused_waits_that_keep_their_connection_cannot_starve_the_state_file(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    # Promise (README "Limits"): waits and feeds are capped "within the fd budget minus a
    # reserve, so the state file and the engine stay reachable"; beyond the cap the answer is
    # 503 "at once ... with Connection: close".
    # Attack: under a 320-descriptor limit, 310 clients ask for a wait that is refused (here
    # --max-waits 0, so nothing is even held) and keep their connection, as a client reading to
    # EOF does. The server never closes them (previous test), so the refusals alone take the
    # reserve: then a deploy cannot write the state file or call the engine.
    port = free_port()
    request = b"GET /v1/wait_for?name=a&image=b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    streams: list[trio.SocketStream] = []
    image = "condo-test/busybox:1"
    try:
        with trio.fail_after(CAP):
            await condo.spawn(
                nursery, "--max-waits", "0", server=f"127.0.0.1:{port}", fd_limit=FD_LIMIT
            )
            await _healthy(port)
            for _ in range(REFUSED):
                with trio.move_on_after(2) as connecting:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                if connecting.cancelled_caught:
                    break  # condo stopped accepting: its descriptors are gone
                streams.append(stream)
                await stream.send_all(request)
                answer = b""
                with trio.move_on_after(2):
                    while b"unavailable" not in answer:
                        answer += await stream.receive_some(65536)
            condo.write("web", f'{{:spec {{:Image "{image}"}} :stop-timeout 1}}')
            stable = False
            with trio.move_on_after(20):
                while not stable:
                    await trio.sleep(0.2)
                    try:
                        record = condo.state_file()["services"].get("web", {})
                    except (OSError, ValueError):
                        continue
                    stable = record.get("phase") == "Stable"
    finally:
        for stream in streams:
            await stream.aclose()
        if condo.process is not None:
            condo.process.terminate()
    assert stable, "the deploy did not reach the state file while refused clients held fds"


# --- caps: exact, immediate, released -------------------------------------------------------


def _upgrade(port: int, path: str = "/v1/feed") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _status(stream: trio.SocketStream) -> tuple[int, float]:
    started = trio.current_time()
    answer = b""
    while b"\r\n" not in answer:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server hung up without an answer"
        answer += chunk
    return int(answer.split()[1]), trio.current_time() - started


@pytest.mark.docker
async def test_caps_are_exact_immediate_and_never_leak_over_many_cycles(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    # Promise (README "Limits"): at most --max-waits long-polls and --max-feeds websockets;
    # beyond them 503 at once; a slot comes back when its client leaves (disconnect or RST).
    # Attack: fill both caps, check cap+1 is refused at once, then 300 connect/hang-up cycles
    # (half reset) of each kind, then fill the caps exactly again.
    port = free_port()
    waits, feeds = 5, 3
    wait = b"GET /v1/wait_for?name=a&image=b&timeout=3600 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def hold(kind: str) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(wait if kind == "wait" else _upgrade(port))
        return stream

    with trio.fail_after(CAP):
        await condo.spawn(
            nursery,
            "--max-waits",
            str(waits),
            "--max-feeds",
            str(feeds),
            server=f"127.0.0.1:{port}",
        )
        await _healthy(port)
        for round_ in range(2):
            held = [await hold("wait") for _ in range(waits)]
            held += [await hold("feed") for _ in range(feeds)]
            for stream in held[waits:]:
                assert (await _status(stream))[0] == 101
            await trio.sleep(0.3)  # the waits are inside their handler
            for kind in ("wait", "feed"):
                extra = await hold(kind)
                status, seconds = await _status(extra)
                assert (status, round_) == (503, round_)
                assert seconds < 1.0
                await extra.aclose()
            for stream in held:
                await stream.aclose()
            if round_ == 0:
                for cycle in range(300):
                    for kind in ("wait", "feed"):
                        stream = await hold(kind)
                        if cycle % 2:
                            stream.socket.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                            )
                        await stream.aclose()
                await trio.sleep(0.5)
        async with httpx.AsyncClient(trust_env=False) as probe:
            await trio.sleep(0.5)
            text = (await probe.get(f"http://127.0.0.1:{port}/metrics")).text
        assert condo.process is not None
        condo.process.terminate()
    assert "condo_web_open_waits 0" in text
    assert "condo_web_open_feeds 0" in text


# --- Host: clients in other containers ---------------------------------------------------------


def test_an_ip_literal_host_is_no_rebinding_and_is_answered() -> None:
    # Promise (brief, README "Host and Origin"): `condo wait` and `condo state` keep working in
    # a container; the Host check is there against DNS rebinding ("a DNS name rebound to
    # 127.0.0.1 gets nothing").
    # Attack: condo:dev bound to 0.0.0.0:80 (the image's default); a CI job in another
    # container runs `condo wait --url http://172.17.0.2:80` (condo's container address). Seen
    # on the real image: 403 "Host '172.17.0.2' is not allowed". An IP literal cannot be
    # rebound (rebinding needs a DNS name the attacker controls), and a container address
    # changes on every restart, so `--allowed-host` is no practical answer.
    allowed = AllowedHosts.of(("0.0.0.0",))
    assert allowed.allows("172.17.0.2:80")
    assert allowed.allows("[fd00::2]:80")
    assert not allowed.allows("evil.example:80")  # names stay refused

"""`:proxy` on the real engine with a real HAProxy and with the kernel's NAT (condo's nftables
table): the switch only on Stable, the drain, the hold across a `[:Before]` gap, listener
removal, a bad `:proxy` changing nothing, and a `kill -9` of condo and its restart refusing and
cutting nothing (issue 14). The tests of those behaviours run on both data planes (`plane`);
the tests of HAProxy's own ways (its reload, its restart, its bind error) on HAProxy, forced by
`--proxy-plane haproxy`.

Each backend is busybox httpd (condo-test/http) that serves its own `MARK` at `/` and, at
`/cgi-bin/slow`, the same after SLOW seconds: a connection that is open across a switch. Listen
ports are picked free at test time, on 127.0.0.1 only. Every test stops the HAProxy its condo
started (its pid file beside the state file).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from condo.docker import DockerClient
from condo.proxy.haproxy import HAProxy
from condo.proxy.nat import table_name
from condo.proxy.reconcile import proxy_directory
from tests.integration.harness import CondoUnderTest, condo_files, free_port, running_condo

pytestmark = pytest.mark.docker

SLOW = 3
# The CGI script answers MARK after SLOW seconds; httpd itself ignores SIGTERM (it is pid 1).
SERVE = (
    "mkdir -p /www/cgi-bin; "
    "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nsleep {slow}\\necho %s\\n'"
    " $MARK > /www/cgi-bin/slow; chmod +x /www/cgi-bin/slow; "
    "echo $MARK > /www/index.html; exec httpd -f -p 80 -h /www"
)
SPEC = """{{:spec {{:Image "condo-test/http:1"
         :Env ["MARK={mark}"]
         :Cmd ["sh" "-c" "{serve}"]
         {health}}}
  :deploy {deploy}
  :health-timeout {health_timeout}
  :stop-timeout 1
  :proxy [{{:listen "127.0.0.1:{port}" :port 80}}]}}"""
UNHEALTHY = ':Healthcheck {:Test ["CMD" "false"] :Interval 300000000 :Retries 1}'


def spec(
    mark: str,
    port: int,
    *,
    deploy: str = "[:After 5]",
    health: str = "",
    health_timeout: float = 10,
) -> str:
    return SPEC.format(
        serve=SERVE.format(slow=SLOW),
        mark=mark,
        port=port,
        health=health,
        deploy=deploy,
        health_timeout=health_timeout,
    )


PLANES = pytest.mark.parametrize("plane", ["nat", "haproxy"])


def plane_option(plane: str) -> str:
    """`--proxy-plane` for a test's plane: "auto" is the NAT on these machines (root, nft)."""
    return "auto" if plane == "nat" else "haproxy"


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        try:
            yield under_test
        finally:
            stop_haproxy(under_test)
            await delete_nat_table(under_test.host)


async def delete_nat_table(host: str) -> None:
    """condo never deletes its table: the test does (absent on HAProxy's plane)."""
    with trio.move_on_after(10, shield=True):
        await trio.run_process(
            ["nft", "delete", "table", "ip", table_name(host)],
            check=False,
            capture_stderr=True,
        )


async def nat_table(host: str) -> str:
    done = await trio.run_process(
        ["nft", "list", "table", "ip", table_name(host)],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    return done.stdout.decode()


async def wait_plane(condo: CondoUnderTest, plane: str) -> None:
    """The test's listener is carried by `plane` (so a NAT test cannot pass on HAProxy)."""
    await condo.wait(lambda v: v["services"]["web"]["proxy"][0]["plane"] == plane)


def stop_haproxy(condo: CondoUnderTest) -> None:
    pid = HAProxy(proxy_directory(condo.state_path)).master_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(pid, signal.SIGKILL)
    # The workers follow their master (they watch its pipe); their own pids are not ours.


async def get(port: int, path: str = "/", wait: float = 10) -> str:
    """One GET on a fresh connection, bounded by `wait`; its body stripped (raises on any
    failure)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=wait, limits=limits, trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{port}{path}")
    response.raise_for_status()
    return response.text.strip()


async def wait_answer(port: int, mark: str, limit: float = 20) -> None:
    with trio.fail_after(limit):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if await get(port, wait=2) == mark:
                    return
            await trio.sleep(0.05)


@attrs.define
class Poller:
    """A GET every 50 ms, each on a new connection: every answer and every failure, in order."""

    port: int
    answers: list[str] = attrs.Factory(list)
    failures: list[str] = attrs.Factory(list)

    async def run(self) -> None:
        while True:
            try:
                self.answers.append(await get(self.port))
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            await trio.sleep(0.05)


def collapse(answers: list[str]) -> list[str]:
    """["a", "a", "b", "b"] → ["a", "b"]: the order in which backends answered."""
    return [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]


@PLANES
async def test_switch_only_on_stable_drain_bad_spec_and_removal(
    condo: CondoUnderTest, plane: str
) -> None:
    port = free_port()
    with trio.fail_after(90):
        condo.write("web", spec("one", port))
        async with running_condo(condo, proxy_plane=plane_option(plane)):
            await condo.wait_state("web", "Stable")
            await wait_plane(condo, plane)
            await wait_answer(port, "one")
            poller = Poller(port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run)

                # A candidate that never turns healthy gets no connection.
                condo.write("web", spec("bad", port, health=UNHEALTHY, health_timeout=2))
                await condo.wait_state("web", "TryAgainNext")

                # A bad :proxy is an error at its line and changes nothing.
                bad = spec("worse", port).replace(f'"127.0.0.1:{port}"', '"localhost:80"')
                condo.write("web", bad)
                view = await condo.wait(lambda v: v["services"]["web"]["spec_error"] is not None)
                error = view["services"]["web"]["spec_error"]
                assert error["line"] == 8, error
                assert ":listen must be" in error["message"]

                # A connection opened before the switch is answered by the old container.
                async with trio.open_nursery() as slow:
                    slow_answer: list[str] = []

                    async def slow_get() -> None:
                        slow_answer.append(await get(port, "/cgi-bin/slow"))

                    slow.start_soon(slow_get)
                    await trio.sleep(0.3)  # the request is in: the old container serves it
                    condo.write("web", spec("two", port))
                    view = await condo.wait(lambda v: v["services"]["web"]["draining"])
                    routed = view["services"]["web"]["proxy"]
                    new = view["services"]["web"]["next"]
                    assert routed[0]["to"]["id"] == new["id"]
                    assert (
                        routed[0]["draining"][0]["id"] == view["services"]["web"]["current"]["id"]
                    )
                assert slow_answer == ["one"]
                await wait_answer(port, "two")
                await condo.wait_state("web", "Stable")
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
            assert poller.failures == []
            assert collapse(poller.answers) == ["one", "two"]

            # /metrics counts the connections per service and listener (HAProxy's count, or
            # the NAT rule's counter), at least those of the poller's last pass.
            assert condo.running is not None and condo.running.proxy is not None
            reconciler = condo.running.proxy
            with trio.fail_after(15):
                while reconciler.connections()["web", f"127.0.0.1:{port}"][1] < 2:
                    await trio.sleep(0.2)
            opened, _ = reconciler.connections()["web", f"127.0.0.1:{port}"]
            assert opened >= 0

            if plane == "haproxy":
                # The old container's server is gone once it stopped.
                proxy = HAProxy(proxy_directory(condo.state_path))
                with trio.fail_after(15):
                    while True:
                        servers = (await proxy.servers()).get(f"l_127_0_0_1_{port}", {})
                        if len(servers) == 2:  # `hold` and the Stable container
                            break
                        await trio.sleep(0.2)
            else:
                assert "dnat to 127.0.0.1:" in await nat_table(condo.host)
                assert HAProxy(proxy_directory(condo.state_path)).master_pid() is None

            # Removing the spec closes the listener.
            condo.remove("web")
            await condo.wait(lambda v: "web" not in v["services"])
            with trio.fail_after(10):
                while True:
                    try:
                        await get(port, wait=1)
                    except httpx.ConnectError:
                        break
                    await trio.sleep(0.1)


@PLANES
async def test_before_gap_holds_connections(condo: CondoUnderTest, plane: str) -> None:
    port = free_port()
    with trio.fail_after(60):
        condo.write("web", spec("one", port, deploy="[:Before]"))
        async with running_condo(condo, proxy_plane=plane_option(plane)):
            await condo.wait_state("web", "Stable")
            await wait_plane(condo, plane)
            await wait_answer(port, "one")
            poller = Poller(port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run)
                condo.write("web", spec("two", port, deploy="[:Before]"))
                await wait_answer(port, "two")
                # The poller's GET held across the gap is answered at its next retry (they
                # are a second apart), not at once: cancelled before, it would be lost.
                while poller.answers[-1:] != ["two"]:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert poller.failures == []
            assert collapse(poller.answers) == ["one", "two"]


@PLANES
async def test_kill9_and_restart_of_condo_refuses_and_cuts_nothing(
    condo: CondoUnderTest, plane: str
) -> None:
    port = free_port()
    option = ("--proxy-plane", plane_option(plane))
    with trio.fail_after(90):
        condo.write("web", spec("one", port))
        async with trio.open_nursery() as nursery:
            await condo.spawn(nursery, *option)
            await wait_answer(port, "one", limit=40)
            # The plane that carries the listener: condo's table, or none of it.
            assert ("dnat to 127.0.0.1:" in await nat_table(condo.host)) == (plane == "nat")
            poller = Poller(port)
            nursery.start_soon(poller.run)
            slow_answer: list[str] = []

            async def slow_get() -> None:
                slow_answer.append(await get(port, "/cgi-bin/slow"))

            nursery.start_soon(slow_get)
            await trio.sleep(0.3)
            condo.kill9()
            assert condo.process is not None
            await condo.process.wait()
            await trio.sleep(0.5)
            await condo.spawn(nursery, *option)
            # The restarted condo adopts the data plane and still routes: a deploy switches.
            condo.write("web", spec("two", port))
            await wait_answer(port, "two", limit=40)
            await trio.sleep(0.3)
            assert condo.process is not None
            condo.process.terminate()
            await condo.process.wait()
            # SIGTERM of condo: the data plane keeps serving.
            await wait_answer(port, "two", limit=2)
            nursery.cancel_scope.cancel()
        assert slow_answer == ["one"]
        assert poller.failures == []
        assert collapse(poller.answers) == ["one", "two"]


async def test_a_listener_on_every_interface_goes_through_the_nat(condo: CondoUnderTest) -> None:
    port = free_port()
    with trio.fail_after(60):
        condo.write("web", spec("one", port).replace(f'"127.0.0.1:{port}"', f'"{port}"'))
        async with running_condo(condo):
            view = await condo.wait_state("web", "Stable")
            await condo.wait(lambda v: v["services"]["web"]["proxy"][0]["plane"] == "nat")
            await wait_answer(port, "one")  # a local client, to any local address
            # Other hosts' connections go to the container's own address and port (these
            # machines allow loopback traffic only: the rule is checked, not used).
            address = (await condo.docker.inspect(view["current"]["id"])).ip_address
            table = await nat_table(condo.host)
            assert f"fib daddr type local tcp dport {port}" in table
            assert f"dnat to {address}:80" in table, table


async def test_a_listener_changes_planes_across_a_restart_without_refusing(
    condo: CondoUnderTest,
) -> None:
    port = free_port()
    with trio.fail_after(90):
        condo.write("web", spec("one", port))
        async with running_condo(condo):
            await condo.wait_state("web", "Stable")
            await wait_plane(condo, "nat")
            await wait_answer(port, "one")
        poller = Poller(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            # NAT → HAProxy: the rule stays until HAProxy listens, then goes.
            async with running_condo(condo, proxy_plane="haproxy"):
                await wait_plane(condo, "haproxy")
                assert "dnat" not in await nat_table(condo.host)
                await trio.sleep(0.5)
                # HAProxy → NAT: the rule is in before HAProxy lets the listener go.
            async with running_condo(condo):
                await wait_plane(condo, "nat")
                assert "dnat to 127.0.0.1:" in await nat_table(condo.host)
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert poller.failures == []
        assert set(poller.answers) == {"one"} and len(poller.answers) >= 10


async def test_a_new_listener_reloads_without_refusing_or_cutting(condo: CondoUnderTest) -> None:
    port, other_port = free_port(), free_port()
    with trio.fail_after(60):
        condo.write("web", spec("one", port))
        async with running_condo(condo, proxy_plane="haproxy"):
            await condo.wait_state("web", "Stable")
            await wait_answer(port, "one")
            poller = Poller(port)
            slow_answer: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run)

                async def slow_get() -> None:
                    slow_answer.append(await get(port, "/cgi-bin/slow"))

                nursery.start_soon(slow_get)
                await trio.sleep(0.3)
                # Another service's listener: HAProxy reloads with both.
                accepted = len(poller.answers) + 2  # wait_answer's GET, the slow one
                condo.write("api", spec("api", other_port))
                await wait_answer(other_port, "api")
                while not slow_answer:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert slow_answer == ["one"]
            assert poller.failures == []
            assert set(poller.answers) == {"one"}

            # The counter did not go back to the new worker's count: the old worker's
            # connections are still in it (a Prometheus counter never decreases).
            assert condo.running is not None and condo.running.proxy is not None
            reconciler = condo.running.proxy
            reported = reconciler.connections()["web", f"127.0.0.1:{port}"][1]
            new_worker = reconciler.stats[f"l_127_0_0_1_{port}"].total  # read with `reported`
            assert reported - new_worker >= accepted, (reported, new_worker, accepted)


async def test_a_dead_haproxy_is_started_again(condo: CondoUnderTest) -> None:
    port = free_port()
    with trio.fail_after(60):
        condo.write("web", spec("one", port))
        async with running_condo(condo, proxy_plane="haproxy"):
            await condo.wait_state("web", "Stable")
            await wait_answer(port, "one")
            proxy = HAProxy(proxy_directory(condo.state_path))
            first = proxy.master_pid()
            stop_haproxy(condo)
            await wait_answer(port, "one", limit=15)
            assert proxy.master_pid() not in (None, first)


@PLANES
async def test_a_listener_haproxy_cannot_bind_is_an_error_in_the_state(
    condo: CondoUnderTest, plane: str
) -> None:
    with socket.socket() as taken, trio.fail_after(60):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        condo.write("web", spec("one", port))
        async with running_condo(condo, proxy_plane=plane_option(plane)):
            await condo.wait_state("web", "Stable")
            view = await condo.wait(lambda v: "proxy" in v)
            assert "cannot bind socket" in view["proxy"]["error"], view["proxy"]
            assert f"127.0.0.1:{port}" in view["proxy"]["error"]
            # The NAT takes no address another process holds: it is HAProxy's, left out.
            assert view["services"]["web"]["proxy"][0]["plane"] == "haproxy"
            taken.close()  # the port is free: the next pass routes it, the error goes
            await condo.wait(lambda v: "proxy" not in v)
            await wait_plane(condo, plane)
            await wait_answer(port, "one")

"""The proxy task against a real HAProxy in odd states (issue 14's red team): condo killed
between writing a config and the reload, a reload that does not take, a HAProxy stopped with
SIGSTOP. The engine is a stand-in (each "container" is a TCP server on 127.0.0.1 that answers
its id and closes), so these take seconds; HAProxy is the real one of scripts/test-env.

Every test stops the HAProxy it started (its master; the workers follow it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from condo.docker.models import Container
from condo.errors import ProxyError
from condo.fsm import Box, Phase, ServiceState
from condo.proxy import haproxy, reconcile
from condo.proxy.reconcile import ProxyReconciler, run_proxy
from condo.routes import Route, desired_routes
from condo.spec import ServiceSpec, parse_spec
from condo.store import Store
from tests.integration.harness import free_port
from tests.proxy_support import inspected, published_on_loopback

pytestmark = pytest.mark.docker  # the provisioned test environment: its haproxy


class Backends:
    """The engine's inspect answer: container id → its port 80 published on 127.0.0.1."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}

    async def inspect(self, cid_or_name: str) -> Container:
        return inspected(cid_or_name, published_on_loopback(self.ports[cid_or_name]))

    async def serve(self, nursery: trio.Nursery, cid: str) -> None:
        """A container `cid`: answers its id on every connection."""

        async def answer(stream: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(cid.encode())
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.ports[cid] = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, answer, listeners)


def route_spec(*ports: int) -> ServiceSpec:
    listeners = " ".join(f'{{:listen "127.0.0.1:{p}" :port 80}}' for p in ports)
    return parse_spec(f'{{:spec {{:Image "web:1"}} :proxy [{listeners}]}}'.encode(), "web.edn")


def stable(container: str, ports: Sequence[int]) -> ServiceState:
    """A Stable service whose `:proxy` listens on `ports`, its container `container`."""
    spec = route_spec(*ports)
    box = Box(id=container, name=f"web_{container}", spec=spec, created_at=1.0, healthcheck=False)
    return ServiceState(phase=Phase.Stable, desired=spec, current=box)


def routes(container: str, ports: Sequence[int]) -> tuple[Route, ...]:
    """The routes of that service, `web`."""
    found, _ = desired_routes({"web": stable(container, ports)})
    return found


async def fetch(port: int) -> str:
    """What answers a new connection to `port` (raises when nothing does in 3 s)."""
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            chunks = []
            while chunk := await stream.receive_some(1024):
                chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_processes(proxy: haproxy.HAProxy) -> list[int]:
    """The live (not zombie) processes running `proxy`'s config: its master and workers."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            if os.fsencode(proxy.config) in argv and state != "Z":
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def a_proxy() -> Iterator[haproxy.HAProxy]:
    """A HAProxy of its own directory, stopped at the end (continued first, if stopped)."""
    # A short directory: HAProxy's socket paths are limited to 97 bytes.
    with tempfile.TemporaryDirectory(prefix="condo-red-") as directory:
        under_test = haproxy.HAProxy(Path(directory) / "s.proxy")
        try:
            yield under_test
        finally:
            for pid in haproxy_processes(under_test):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            if (master := under_test.master_pid()) is not None:
                os.kill(master, signal.SIGKILL)


@pytest.fixture
def proxy() -> Iterator[haproxy.HAProxy]:
    with a_proxy() as under_test:
        yield under_test


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    """Containers "a" and "b", serving before the test picks its free ports (their ports are
    ephemeral too: a listen port picked first could be given to one of them)."""
    async with trio.open_nursery() as nursery:
        engine = Backends()
        await engine.serve(nursery, "a")
        await engine.serve(nursery, "b")
        yield engine
        nursery.cancel_scope.cancel()


async def test_a_config_written_but_never_reloaded_is_reloaded_by_the_next_condo(
    proxy: haproxy.HAProxy, backends: Backends
) -> None:
    engine = backends
    one, two = free_port(), free_port()
    with trio.fail_after(30):
        await ProxyReconciler(proxy, engine).reconcile(routes("a", [one]))
        assert await fetch(one) == "a"
        # condo killed -9 after writing the config of a second listener, before the reload.
        wanted = routes("a", [one, two])
        frontends = [
            haproxy.Frontend(
                haproxy.frontend_name("127.0.0.1", r.listener.port),
                haproxy.bind_address("127.0.0.1", r.listener.port),
                "tcp",
                r.hold_timeout,
            )
            for r in wanted
        ]
        proxy.config.write_text(haproxy.render_config(proxy.directory, frontends))
        # The next condo adopts that HAProxy: its worker never read the file, so it reloads.
        await ProxyReconciler(proxy, engine).reconcile(wanted)
        assert await fetch(two) == "a"
        assert await fetch(one) == "a"


async def test_a_listener_on_a_port_held_elsewhere_never_stops_the_others(
    proxy: haproxy.HAProxy,
    backends: Backends,
) -> None:
    engine = backends
    one, three = free_port(), free_port()
    refused: list[str] = []

    async def poll() -> None:  # the listener HAProxy has: never refused meanwhile
        while True:
            try:
                await fetch(one)
            except OSError as exc:
                refused.append(repr(exc))
            await trio.sleep(0.02)

    with trio.fail_after(40):
        reconciler = ProxyReconciler(proxy, engine)
        await reconciler.reconcile(routes("a", [one]))
        assert await fetch(one) == "a"
        async with trio.open_nursery() as polling:
            polling.start_soon(poll)
            with trio.socket.socket() as taken:
                await taken.bind(("127.0.0.1", 0))
                taken.listen()
                two = taken.getsockname()[1]
                # Two new listeners, one on a port another process holds; a deploy (b).
                wanted = routes("b", [one, two, three])
                for _ in range(2):  # condo's next pass does not take the config file's word
                    with pytest.raises(
                        ProxyError, match=f"cannot bind socket \\[127.0.0.1:{two}\\]"
                    ):
                        await reconciler.reconcile(wanted)
                    reconciler.forget()  # as run_proxy does after an error
                    # The listener it has switched anyway, the other new one is open.
                    assert await fetch(one) == "b"
                    assert await fetch(three) == "b"
            await reconciler.reconcile(wanted)  # the port is free: the reload takes
            assert await fetch(two) == "b"
            assert await fetch(one) == "b"
            polling.cancel_scope.cancel()
        assert refused == []


async def test_a_listener_on_a_port_held_elsewhere_does_not_keep_haproxy_from_starting(
    proxy: haproxy.HAProxy, backends: Backends
) -> None:
    engine = backends
    one = free_port()
    with trio.fail_after(30), trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        two = taken.getsockname()[1]
        reconciler = ProxyReconciler(proxy, engine)
        with pytest.raises(ProxyError, match=f"cannot bind socket \\[127.0.0.1:{two}\\]"):
            await reconciler.reconcile(routes("a", [one, two]))
        assert await fetch(one) == "a"  # the other listener runs meanwhile
        taken.close()
        reconciler.forget()
        await reconciler.reconcile(routes("a", [one, two]))
        assert await fetch(two) == "a"


async def test_a_stopped_haproxy_is_waited_for_never_doubled(
    proxy: haproxy.HAProxy,
    backends: Backends,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(haproxy, "COMMAND_LIMIT", 0.5)
    engine = backends
    port = free_port()
    with trio.fail_after(30):
        reconciler = ProxyReconciler(proxy, engine)
        await reconciler.reconcile(routes("a", [port]))
        master, processes = proxy.master_pid(), haproxy_processes(proxy)
        assert master is not None and len(processes) == 2
        workers = [pid for pid in processes if pid != master]
        os.kill(workers[0], signal.SIGSTOP)
        try:
            with pytest.raises(ProxyError, match="admin socket"):
                await reconciler.reconcile(routes("b", [port]))
            reconciler.forget()
            with pytest.raises(ProxyError, match=f"haproxy \\(pid {master}\\) runs but does not"):
                await reconciler.reconcile(routes("b", [port]))
            reconciler.forget()
            assert haproxy_processes(proxy) == processes  # no second HAProxy on that port
        finally:
            os.kill(workers[0], signal.SIGCONT)
        await reconciler.reconcile(routes("b", [port]))  # adopted again, routes followed
        assert await fetch(port) == "b"
        assert proxy.master_pid() == master
        assert haproxy_processes(proxy) == processes


async def test_a_killed_haproxy_is_started_again_within_a_second(
    proxy: haproxy.HAProxy, backends: Backends
) -> None:
    engine = backends
    port = free_port()
    store = Store("h")
    store.set_state("web", stable("a", [port]))
    store.mark_settled()
    with trio.fail_after(30):
        async with trio.open_nursery() as task:
            await task.start(run_proxy, store, engine, ProxyReconciler(proxy, engine))
            while True:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    if await fetch(port) == "a":
                        break
                await trio.sleep(0.05)
            master = proxy.master_pid()
            assert master is not None, (proxy.pidfile.read_text(), proxy.log_tail())
            os.kill(master, signal.SIGKILL)  # the pass just ended: the next is 5 s away
            with contextlib.suppress(
                OSError, trio.BrokenResourceError
            ):  # until its workers are gone with it
                while await fetch(port) == "a":
                    await trio.sleep(0.01)
            killed = trio.current_time()
            while True:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    if await fetch(port) == "a":
                        break
                await trio.sleep(0.05)
            assert trio.current_time() - killed < 2.0
            assert proxy.master_pid() not in (None, master)
            task.cancel_scope.cancel()


async def test_a_port_another_condos_haproxy_listens_on_is_refused_not_shared(
    proxy: haproxy.HAProxy, backends: Backends
) -> None:
    port = free_port()
    with trio.fail_after(30), a_proxy() as other:
        await ProxyReconciler(proxy, backends).reconcile(routes("a", [port]))
        # Another condo (another state file) wants the same listen address for its service.
        with pytest.raises(ProxyError, match=f"cannot bind socket \\[127.0.0.1:{port}\\]"):
            await ProxyReconciler(other, backends).reconcile(routes("b", [port]))
        assert haproxy_processes(other) == []
        # Even a HAProxy started by other means: it cannot share the port (noreuseport).
        frontend = haproxy.Frontend(
            haproxy.frontend_name("127.0.0.1", port), f"127.0.0.1:{port}", "tcp", 1.0
        )
        with pytest.raises(ProxyError, match="cannot bind socket"):
            await other.start([frontend])
        assert [await fetch(port) for _ in range(20)] == ["a"] * 20


class Contained(haproxy.HostProcess):
    """A host process whose binds condo does not try first, as for HAProxy in a container
    (a network namespace other than condo's)."""

    kind = "container"


async def test_a_reload_that_did_not_take_is_not_tried_again_at_once(
    proxy: haproxy.HAProxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(haproxy, "START_LIMIT", 2.0)
    monkeypatch.setattr(reconcile, "RELOAD_BACKOFF", 3.0)
    proxy.launcher = Contained()
    one = free_port()
    refused: list[str] = []

    async def poll() -> None:
        while True:
            try:
                await fetch(one)
            except (OSError, trio.BrokenResourceError) as exc:
                refused.append(repr(exc))
            await trio.sleep(0.02)

    with trio.fail_after(40), trio.socket.socket() as taken:
        reconciler = ProxyReconciler(proxy, backends)
        await reconciler.reconcile(routes("a", [one]))
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        two = taken.getsockname()[1]
        wanted = routes("b", [one, two])
        # HAProxy's reload finds the port held (refusing on `one` for a while on its way).
        with pytest.raises(ProxyError, match="reload did not take"):
            await reconciler.reconcile(wanted)
        reconciler.forget()
        # The old worker listens again (0.5 s was too short on a busy machine): from then on,
        # no second try may refuse a connection.
        while True:
            try:
                await fetch(one)
                break
            except (OSError, trio.BrokenResourceError):
                await trio.sleep(0.1)
        async with trio.open_nursery() as polling:
            polling.start_soon(poll)
            with pytest.raises(ProxyError, match="reload did not take"):
                await reconciler.reconcile(wanted)  # the same error, no second try yet
            reconciler.forget()
            assert await fetch(one) == "b"
            polling.cancel_scope.cancel()
        assert refused == []
        taken.close()
        await trio.sleep(3.0)
        await reconciler.reconcile(wanted)  # tried again after the backoff: it takes
        assert await fetch(two) == "b"

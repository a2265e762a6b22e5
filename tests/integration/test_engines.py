"""The engine matrix: condo on Docker 20.10 (the main engine), 26.1, 28.5 with Docker 29's API
floor (1.44) and Podman 4.3, side by side (scripts/engines starts the side engines).

Each core scenario runs on every engine at once and asserts the same state trace (the sequence
of phases each service went through) on each. Also here: the API version condo speaks on each
engine, and an engine condo cannot speak to (a proxy in front of the 1.44-floor engine that
raises its floor above condo's newest version), which must be a clear error everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo.docker import (
    MAX_API_VERSION,
    ContainerEvent,
    DockerClient,
    EventsResumed,
    open_docker,
    run_events,
)
from condo.errors import EngineUnsupported, NameConflict
from tests.integration.harness import (
    ENGINES,
    CondoUnderTest,
    condo_files,
    free_port,
    remove_host_containers,
    start_condo,
)
from tests.integration.sockets import read_head, unix_listener
from tests.integration.test_docker_events import is_event, proxy_to_engine, receive_until

pytestmark = pytest.mark.docker

LIMIT = 90  # seconds for a whole scenario on all four engines at once


def key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# --- API versions ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine_url", ENGINES.values(), ids=ENGINES.keys())
async def test_speaks_the_engines_own_version_within_its_floor(
    engine_url: str, docker: DockerClient
) -> None:
    transport = httpx.AsyncHTTPTransport(uds=engine_url.removeprefix("unix://"))
    with trio.fail_after(20):
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as raw:
            version = (await raw.get("/version")).json()
            ping = await raw.get("/_ping")
        await docker.ping()
        spoken = docker.api_version
        assert key(spoken) == min(key(version["ApiVersion"]), key(MAX_API_VERSION))
        assert key(spoken) >= key(version.get("MinAPIVersion", "1.12"))
        assert docker.is_podman == ("Libpod-Api-Version" in ping.headers)
        # Every versioned call is accepted (Docker 29's floor made them all 400 before).
        assert await docker.list_containers(labels={"condo-test.none": "x"}) == []


async def test_the_floor_engine_really_refuses_old_clients() -> None:
    """The 1.44 floor is real: what condo spoke before (1.41) is refused by that engine."""
    transport = httpx.AsyncHTTPTransport(uds=ENGINES["docker-28.5-floor-1.44"][len("unix://") :])
    with trio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as raw:
            refused = await raw.get("/v1.41/containers/json")
    assert refused.status_code == 400
    assert "too old" in refused.json()["message"]


# --- an engine condo cannot speak to ---------------------------------------------------------

FLOOR = "1.52"  # one above condo's newest: a future engine's floor


class RefusingEngine:
    """A TCP front for the 1.44-floor engine that announces API 1.53 with a floor of 1.52, and
    answers every versioned call below that floor as dockerd does (400 "too old")."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._answer, listeners)

    async def serve_unix(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The same answers on a unix socket at `path`."""
        listener = await unix_listener(path)
        task_status.started()
        await trio.serve_listeners(self._answer, [listener])

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = await read_head(stream)
            if head is None:
                return
            target = head.split(b" ", 2)[1].decode()
            status, headers, body = await self._respond(target)
            headers = {
                **headers,
                "Content-Length": str(len(body)),
                "Connection": "close",
            }
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            await stream.send_all(f"HTTP/1.1 {status} X\r\n{lines}\r\n".encode() + body)

    async def _respond(self, target: str) -> tuple[int, Mapping[str, str], bytes]:
        path = target.split("?")[0]
        transport = httpx.AsyncHTTPTransport(uds=self.backend.removeprefix("unix://"))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as engine:
            if path == "/_ping":
                await engine.get("/_ping")
                return 200, {"Api-Version": "1.53", "Content-Type": "text/plain"}, b"OK"
            if path == "/version":
                version = (await engine.get("/version")).json()
                version.update(ApiVersion="1.53", MinAPIVersion=FLOOR)
                return 200, {"Content-Type": "application/json"}, json.dumps(version).encode()
        spoken = path.split("/")[1].removeprefix("v")
        message = (
            f"client version {spoken} is too old. Minimum supported API version is {FLOOR}, "
            "please upgrade your client to a newer version"
        )
        return 400, {"Content-Type": "application/json"}, json.dumps({"message": message}).encode()


async def test_an_engine_condo_cannot_speak_to_is_one_clear_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    floor_engine = ENGINES["docker-28.5-floor-1.44"]
    refusing = RefusingEngine(floor_engine)
    await nursery.start(refusing.serve)
    async with (
        open_docker(floor_engine) as docker,
        condo_files(tmp_path, docker, floor_engine) as condo,
    ):
        with trio.fail_after(60):
            # "old" ran Stable on the engine before (its record says so); "new" never ran.
            condo.write("old", '{:spec {:Image "condo-test/busybox:1"}}')
            async with trio.open_nursery() as first:
                await start_condo(first, condo)
                await condo.wait_state("old", "Stable")
                assert condo.running is not None
                condo.running.shutdown()
            condo.write("new", '{:spec {:Image "condo-test/busybox:1"}}')

            condo.docker_url = f"http://127.0.0.1:{refusing.port}"
            port = free_port()
            await condo.spawn(nursery, server=f"127.0.0.1:{port}")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        services = (await api.get("/v1/state")).json()["services"]
                        errors = [(services.get(s) or {}).get("error") for s in ("old", "new")]
                        if all(errors):
                            break
                    await trio.sleep(0.2)
                for error in errors:
                    assert error is not None
                    assert FLOOR in error["message"]
                    assert MAX_API_VERSION in error["message"]
                health = await api.get("/healthz")
                assert health.status_code == 503
                assert FLOOR in health.json()["error"]
                await trio.sleep(3)  # a few retries later: still one line in the log
            log = (condo.state_path.parent / f"condo-{condo.host}.log").read_text().splitlines()
            events = [json.loads(line).get("event") for line in log if line.startswith("{")]
            assert events.count("docker.engine_unsupported") == 1
            assert "service.observe_failed" not in events


class HeaderlessEngine(RefusingEngine):
    """A TCP front for an engine that passes every GET through but drops the `Api-Version`
    header of its `/_ping` (as some proxies in front of a socket do)."""

    async def _respond(self, target: str) -> tuple[int, Mapping[str, str], bytes]:
        transport = httpx.AsyncHTTPTransport(uds=self.backend.removeprefix("unix://"))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as engine:
            answer = await engine.get(target)
        headers = {"Content-Type": answer.headers.get("Content-Type", "text/plain")}
        return answer.status_code, headers, answer.content


class LyingEngine(RefusingEngine):
    """A TCP front for the 1.44-floor engine whose /_ping and /version tell the truth about the
    engine behind (API 1.51, floor 1.44) while every versioned call is refused as "too old"."""

    async def _respond(self, target: str) -> tuple[int, Mapping[str, str], bytes]:
        path = target.split("?")[0]
        if path not in ("/_ping", "/version"):
            return await super()._respond(target)
        transport = httpx.AsyncHTTPTransport(uds=self.backend.removeprefix("unix://"))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as engine:
            answer = await engine.get(path)
        headers = {
            name: answer.headers[name]
            for name in ("Content-Type", "Api-Version")
            if name in answer.headers
        }
        return answer.status_code, headers, answer.content


async def test_an_engine_that_refuses_the_version_it_announces_is_one_clear_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Its /version promises what its calls refuse: after one renegotiation, the same permanent
    error as a floor above condo's newest (every service unobserved), not a BadRequest per call
    and a stale Stable."""
    floor_engine = ENGINES["docker-28.5-floor-1.44"]
    lying = LyingEngine(floor_engine)
    await nursery.start(lying.serve)
    async with (
        open_docker(floor_engine) as docker,
        condo_files(tmp_path, docker, f"http://127.0.0.1:{lying.port}") as condo,
    ):
        with trio.fail_after(20):
            async with open_docker(condo.docker_url) as client:
                calls: list[str] = []
                client.add_call_observer(lambda record: calls.append(record.endpoint))
                for _ in range(3):
                    with pytest.raises(EngineUnsupported, match="refuses the API version"):
                        await client.list_containers(labels={})
                # Negotiated, refused, negotiated again, refused: then the verdict is reused.
                assert calls.count("/containers/json") == 2
            condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
            async with trio.open_nursery() as inner:
                await start_condo(inner, condo)

                def unobserved(view: dict[str, Any]) -> bool:
                    error = (view["services"].get("web") or {}).get("error") or {}
                    return error.get("unobserved") is True

                view = await condo.wait(unobserved, limit=10)
                assert FLOOR in view["services"]["web"]["error"]["message"]
                assert view["services"]["web"]["state"] == "Init"
                assert condo.running is not None
                condo.running.shutdown()


async def test_an_engine_without_an_api_version_header_is_spoken_to_in_its_own(
    nursery: trio.Nursery,
) -> None:
    """No Api-Version in /_ping: /version's ApiVersion says it. The 20.10 engine (1.41) answers
    condo's newest (1.51) with 400 "too new"."""
    headerless = HeaderlessEngine(ENGINES["docker-20.10"])
    await nursery.start(headerless.serve)
    with trio.fail_after(20):
        async with open_docker(f"http://127.0.0.1:{headerless.port}") as client:
            assert await client.list_containers(labels={"condo-test.none": "x"}) == []
            assert client.api_version == "1.41"


async def test_a_client_on_a_refusing_engine_raises_at_once_and_rechecks_later(
    nursery: trio.Nursery,
) -> None:
    refusing = RefusingEngine(ENGINES["docker-28.5-floor-1.44"])
    await nursery.start(refusing.serve)
    with trio.fail_after(20):
        async with open_docker(f"http://127.0.0.1:{refusing.port}") as client:
            calls: list[str] = []
            client.add_call_observer(lambda record: calls.append(record.endpoint))
            for _ in range(3):
                with pytest.raises(EngineUnsupported, match=FLOOR):
                    await client.list_containers(labels={})
            # One negotiation, then the verdict is reused: the engine is not hammered.
            assert calls == ["/_ping", "/version"]
            with pytest.raises(EngineUnsupported):
                await client.ping()


# --- the matrix -------------------------------------------------------------------------------

Scenario = Callable[[CondoUnderTest, str], Awaitable[Any]]


def trace_of(condo: CondoUnderTest) -> dict[str, list[str]]:
    """Start recording every service's phases (consecutive repeats folded) from now on."""
    assert condo.running is not None
    store = condo.running.store
    traces: dict[str, list[str]] = {}

    def record() -> None:
        for name, entry in store.entries.items():
            trace = traces.setdefault(name, [])
            phase = entry.state.phase.value
            if not trace or trace[-1] != phase:
                trace.append(phase)

    record()
    store.subscribe(record)
    return traces


async def on_every_engine(tmp_path: Path, scenario: Scenario) -> dict[str, Any]:
    """Run `scenario` on every engine at once, each with its own condo; their results by
    engine. A failure names its engine."""
    results: dict[str, Any] = {}

    async def one(name: str, url: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        try:
            async with open_docker(url) as docker, condo_files(folder, docker, url) as condo:
                results[name] = await scenario(condo, url)
        except Exception as exc:
            raise AssertionError(f"on {name}: {exc!r}") from exc

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            for name, url in ENGINES.items():
                nursery.start_soon(one, name, url)
    return results


def assert_same(results: Mapping[str, Any], expected: Any) -> None:
    assert dict(results) == dict.fromkeys(ENGINES, expected)


@contextlib.asynccontextmanager
async def traced(condo: CondoUnderTest) -> AsyncIterator[dict[str, list[str]]]:
    async with trio.open_nursery() as nursery:
        await start_condo(nursery, condo)
        yield trace_of(condo)
        assert condo.running is not None
        condo.running.shutdown()


async def docker_cli(url: str, *args: str) -> None:
    await trio.run_process(["docker", "-H", url, *args], capture_stdout=True, capture_stderr=True)


async def test_plain_and_healthchecked_deploys(tmp_path: Path) -> None:
    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("plain", '{:spec {:Image "condo-test/busybox:1"}}')
            condo.write("checked", '{:spec {:Image "condo-test/healthy:1"}}')
            await condo.wait_state("plain", "Stable", image="condo-test/busybox:1")
            await condo.wait_state("checked", "Stable", image="condo-test/healthy:1")
            condo.write("checked", '{:spec {:Image "condo-test/healthy:2"}}')  # [:Before]
            await condo.wait_state("checked", "Stable", image="condo-test/healthy:2")
            rows = await condo.containers()
            running = sorted(r.labels["condo.service"] for r in rows if r.state == "running")
            return traces, running

    results = await on_every_engine(tmp_path, scenario)
    assert_same(
        results,
        (
            {
                "plain": ["Init", "Wait", "Stable"],
                "checked": ["Init", "Wait", "Stable", "Wait", "Stable"],
            },
            ["checked", "plain"],
        ),
    )


async def test_after_n_deploy(tmp_path: Path) -> None:
    spec = '{{:spec {{:Image "condo-test/healthy:{tag}"}} :deploy [:After 1]}}'

    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("web", spec.format(tag=1))
            first = await condo.wait_state("web", "Stable", image="condo-test/healthy:1")
            condo.write("web", spec.format(tag=2))
            await condo.wait_state("web", "WaitNext")
            # Both serve while the candidate waits: the old one is stopped only after.
            assert first["current"]["id"] in await condo.running_ids("web")
            second = await condo.wait_state("web", "Stable", image="condo-test/healthy:2")
            # The old one is retired after the drain: in the end only the new one is left.
            while [r.id for r in await condo.containers("web")] != [second["current"]["id"]]:
                await trio.sleep(0.1)
            return traces, second["current"]["id"] != first["current"]["id"]

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, ({"web": ["Init", "Wait", "Stable", "WaitNext", "Stable"]}, True))


@pytest.mark.parametrize(
    ("image", "by_hand"),
    [
        ("condo-test/healthy:1", ("kill",)),  # a healthchecked one, killed
        ("condo-test/busybox:1", ("rm", "-f")),  # a plain one, removed
    ],
    ids=["killed", "removed"],
)
async def test_a_container_killed_or_removed_by_hand_is_replaced(
    tmp_path: Path, image: str, by_hand: tuple[str, ...]
) -> None:
    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("web", f'{{:spec {{:Image "{image}"}}}}')
            first = await condo.wait_state("web", "Stable")
            await docker_cli(url, *by_hand, first["current"]["id"])

            def replaced(view: dict[str, Any]) -> bool:
                web: dict[str, Any] = view["services"]["web"]
                return bool(
                    web["state"] == "Stable" and web["current"]["id"] != first["current"]["id"]
                )

            await condo.wait(replaced, limit=30)
            return traces, len(await condo.running_ids("web"))

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, ({"web": ["Init", "Wait", "Stable", "Wait", "Stable"]}, 1))


@pytest.mark.parametrize("engine_url", ENGINES.values(), ids=ENGINES.keys())
async def test_a_gap_in_the_events_is_replayed_before_the_marker(
    tmp_path: Path,
    engine_url: str,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    container_name: Callable[[str], str],
) -> None:
    """What happened while the stream was cut comes back before EventsResumed (Podman replays
    nothing for an `until` already past, so it is asked with one still ahead)."""
    send, receive = trio.open_memory_channel[ContainerEvent | EventsResumed](100)
    body = {"Image": "condo-test/busybox:1", "Labels": dict(container_labels)}
    with trio.fail_after(30):
        async with (
            proxy_to_engine(tmp_path, engine_url.removeprefix("unix://")) as proxy,
            open_docker(f"unix://{proxy.path}") as via_proxy,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(
                functools.partial(run_events, via_proxy, send, labels=container_labels)
            )
            a = await docker.create(body, name=container_name("a"))
            await docker.start(a)
            await receive_until(receive, is_event("start", a))
            await trio.sleep(1.5)  # beyond the replay window: the gap's events are new
            proxy.cut()
            await docker.remove(a)
            b = await docker.create(body, name=container_name("b"))
            await docker.start(b)
            await trio.sleep(1.0)
            proxy.restore()
            replayed = await receive_until(receive, lambda m: isinstance(m, EventsResumed))
            nursery.cancel_scope.cancel()
    actions = [(m.action, m.container_id) for m in replayed if isinstance(m, ContainerEvent)]
    assert {("die", a), ("destroy", a), ("create", b), ("start", b)} <= set(actions)
    assert len(actions) == len(set(actions))  # nothing twice


@pytest.mark.parametrize("engine_url", ENGINES.values(), ids=ENGINES.keys())
async def test_a_name_clash_is_a_conflict(
    docker: DockerClient, container_labels: Mapping[str, str], container_name: Callable[[str], str]
) -> None:
    body = {"Image": "condo-test/busybox:1", "Labels": dict(container_labels)}
    with trio.fail_after(20):
        await docker.create(body, name=container_name("clash"))
        with pytest.raises(NameConflict) as raised:
            await docker.create(body, name=container_name("clash"))
    assert not raised.value.transient


async def test_a_never_healthy_image_fails_fast(tmp_path: Path) -> None:
    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("sick", '{:spec {:Image "condo-test/unhealthy:1"} :health-timeout 60}')
            started = trio.current_time()
            failed = await condo.wait_state("sick", "TryAgain", limit=20)
            took = trio.current_time() - started
            return traces, took < 15, "unhealthy" in failed["error"]["message"]

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, ({"sick": ["Init", "Wait", "TryAgain"]}, True, True))


async def test_kill_9_and_restart_adopts_the_container(tmp_path: Path) -> None:
    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        condo.write("web", '{:spec {:Image "condo-test/healthy:1"}}')
        async with trio.open_nursery() as nursery:
            await condo.spawn(nursery)
            first = await stable_on_disk(condo, "web")
            condo.kill9()
            assert condo.process is not None
            await condo.process.wait()
            await condo.spawn(nursery)
            await trio.sleep(2)  # a restarted condo has resynced by now
            second = await stable_on_disk(condo, "web")
            rows = await condo.containers("web")
            condo.process.terminate()
        return second["current"]["id"] == first["current"]["id"], [r.id for r in rows] == [
            first["current"]["id"]
        ]

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, (True, True))


async def stable_on_disk(condo: CondoUnderTest, service: str) -> dict[str, Any]:
    """Poll the state file (the only view of a separate process) until `service` is Stable."""
    while True:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            record: dict[str, Any] | None = condo.state_file()["services"].get(service)
            if record is not None and record["phase"] == "Stable":
                return record
        await trio.sleep(0.1)


# --- an engine swapped under a running condo ---------------------------------------------------


async def test_an_engine_downgraded_under_a_running_condo_is_renegotiated(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """condo speaks 1.51 to the 28.5 engine; that engine is replaced on the same socket by 26.1
    (API 1.45: a rollback of the package), which answers 1.51 with 400 "too new". condo must
    speak 1.45 from then on and redeploy what the new engine lacks, never keep the old Stable."""
    newer, older = ENGINES["docker-28.5-floor-1.44"], ENGINES["docker-26.1"]
    async with (
        proxy_to_engine(tmp_path, newer.removeprefix("unix://")) as proxy,
        open_docker(newer) as on_newer,
        open_docker(older) as on_older,
        condo_files(tmp_path, on_older, f"unix://{proxy.path}") as condo,
    ):
        try:
            with trio.fail_after(40):
                async with trio.open_nursery() as inner:
                    await start_condo(inner, condo)
                    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
                    first = await condo.wait_state("web", "Stable")
                    # The package is rolled back: the socket now leads to the older engine.
                    proxy.upstream = older.removeprefix("unix://")
                    proxy.cut()
                    proxy.restore()

                    def redeployed(view: dict[str, Any]) -> bool:
                        web: dict[str, Any] = view["services"]["web"]
                        current = web["current"] or {}
                        return bool(
                            web["state"] == "Stable" and current.get("id") != first["current"]["id"]
                        )

                    view = await condo.wait(redeployed, limit=20)
                    # The new container is on the older engine, where condo sees it run.
                    ids = await condo.running_ids("web")
                    assert ids == {view["services"]["web"]["current"]["id"]}
                    assert condo.running is not None
                    condo.running.shutdown()
        finally:
            await remove_host_containers(on_newer, condo.host)


async def test_an_engine_upgraded_to_one_that_refuses_condo_under_a_running_condo(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """condo runs a Stable service on the 28.5 engine; the engine behind the socket is replaced
    by one whose floor (1.52) is above condo's newest. The Stable it showed can no longer be
    confirmed: every service's error says so with "unobserved", /healthz answers 503, and
    `condo wait` is never done."""
    floor_engine = ENGINES["docker-28.5-floor-1.44"]
    refusing = RefusingEngine(floor_engine)
    await nursery.start(refusing.serve_unix, tmp_path / "refusing.sock")
    async with (
        proxy_to_engine(tmp_path, floor_engine.removeprefix("unix://")) as proxy,
        open_docker(floor_engine) as docker,
        condo_files(tmp_path, docker, f"unix://{proxy.path}") as condo,
    ):
        with trio.fail_after(40):
            async with trio.open_nursery() as inner:
                await start_condo(inner, condo)
                condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
                first = await condo.wait_state("web", "Stable")
                # The engine is upgraded to one that refuses condo's versions.
                proxy.upstream = str(tmp_path / "refusing.sock")
                proxy.cut()
                proxy.restore()

                def unobserved(view: dict[str, Any]) -> bool:
                    error = view["services"]["web"].get("error") or {}
                    return error.get("unobserved") is True

                view = await condo.wait(unobserved, limit=15)
                assert FLOOR in view["services"]["web"]["error"]["message"]
                # Back to an engine condo speaks to: the same container, confirmed again.
                proxy.upstream = floor_engine.removeprefix("unix://")
                proxy.cut()
                proxy.restore()

                def confirmed(view: dict[str, Any]) -> bool:
                    web: dict[str, Any] = view["services"]["web"]
                    return web["state"] == "Stable" and web.get("error") is None

                again = await condo.wait(confirmed, limit=15)
                assert again["services"]["web"]["current"]["id"] == first["current"]["id"]
                assert await condo.running_ids("web") == {first["current"]["id"]}
                assert condo.running is not None
                condo.running.shutdown()


WAITING = (
    '{:spec {:Image "condo-test/busybox:%s" :Healthcheck {:Test ["CMD-SHELL" "test -f /tmp/ok"]'
    " :Interval 300000000 :Retries 1000}} :deploy [:After 1] :health-timeout 60}"
)
"""A container that stays `starting` (until /tmp/ok appears) for a minute: a long Wait."""


async def test_a_candidate_killed_by_hand_while_it_waits(tmp_path: Path) -> None:
    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("web", '{:spec {:Image "condo-test/busybox:1"} :deploy [:After 1]}')
            first = await condo.wait_state("web", "Stable")
            condo.write("web", WAITING % 2)
            view = await condo.wait(
                lambda v: (
                    v["services"]["web"]["state"] == "WaitNext"
                    and v["services"]["web"]["next"] is not None
                )
            )
            await docker_cli(url, "kill", view["services"]["web"]["next"]["id"])
            failed = await condo.wait_state("web", "TryAgainNext", limit=20)
            # The old one serves on, and is still the current one.
            serving = await condo.running_ids("web")
            kept = failed["current"]["id"] == first["current"]["id"]
            return (
                traces,
                serving == {first["current"]["id"]},
                kept,
                "died" in failed["error"]["message"],
            )

    results = await on_every_engine(tmp_path, scenario)
    assert_same(
        results, ({"web": ["Init", "Wait", "Stable", "WaitNext", "TryAgainNext"]}, True, True, True)
    )


async def test_a_check_that_fails_before_it_passes_is_healthy(tmp_path: Path) -> None:
    """A first probe that fails (the application still starting) is no verdict while the
    check's Retries allow more: Podman's libpod healthcheck answers "unhealthy" for any failed
    probe, its container's health counts the retries as Docker does."""
    spec = (
        '{:spec {:Image "condo-test/busybox:1" :Healthcheck {:Test ["CMD-SHELL"'
        ' "test -f /tmp/ok || { >/tmp/ok; false; }"] :Interval 300000000 :Retries 3}}'
        " :health-timeout 20}"
    )

    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        async with traced(condo) as traces:
            condo.write("web", spec)
            await condo.wait(
                lambda v: (v["services"].get("web") or {}).get("state") in ("Stable", "TryAgain")
            )
            return traces

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, {"web": ["Init", "Wait", "Stable"]})


async def test_kill_9_while_a_candidate_waits_then_restart(tmp_path: Path) -> None:
    """condo is killed while its first container waits on its healthcheck; the restarted condo
    adopts that container (no duplicate) and sees it turn healthy (on Podman by running its
    check through libpod again)."""
    spec = (
        '{:spec {:Image "condo-test/busybox:1" :Healthcheck {:Test ["CMD-SHELL" "test -f /tmp/ok"]'
        " :Interval 300000000 :Retries 1000}} :health-timeout 60}"
    )

    async def scenario(condo: CondoUnderTest, url: str) -> Any:
        condo.write("web", spec)
        async with trio.open_nursery() as nursery:
            await condo.spawn(nursery)
            while not (rows := await condo.containers("web")) or rows[0].state != "running":
                await trio.sleep(0.1)
            await trio.sleep(0.5)  # a probe or two failed meanwhile
            condo.kill9()
            assert condo.process is not None
            await condo.process.wait()
            await docker_cli(url, "exec", rows[0].id, "sh", "-c", ">/tmp/ok")
            await condo.spawn(nursery)
            stable = await stable_on_disk(condo, "web")
            after = await condo.containers("web")
            condo.process.terminate()
        return stable["current"]["id"] == rows[0].id, [r.id for r in after] == [rows[0].id]

    results = await on_every_engine(tmp_path, scenario)
    assert_same(results, (True, True))

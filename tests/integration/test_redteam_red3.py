"""Red team 3: self-deploy in odd states, kill -9 churn beside a second host, Consul that goes away.

Each test attacks one promise of the README on the real engine (and, for Consul, on an agent of
its own, started on free ports and killed at the end). Failing tests here are findings: they say
which promise breaks and how.

- the engine away for a moment inside a stop-then-start hand-over (after the old condo stopped);
- the engine away for a moment right after a start-beside successor was started;
- SIGTERM to a real `condo run` while a start-beside successor is still starting;
- a start-beside successor that dies right after the old condo exited;
- kill -9 of a real `condo run` during spec churn, with a second condo (another --host) on the
  same engine and spec dir;
- Consul unreachable while a service is removed and another changes; a restarted (dev) agent.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from condo import labels, selfdeploy
from condo.config import Config
from condo.docker import ContainerId, DockerClient, open_docker
from condo.errors import ContainerNotFound
from condo.run import Running, run_condo
from condo.selfdeploy import SELF_HASH_LABEL, SELF_LABEL, HandOverPlan, run_hand_over
from condo.store import Store
from tests.consul_support import stable
from tests.integration.conftest import DockerCli
from tests.integration.harness import (
    CondoUnderTest,
    condo_files,
    free_port,
)
from tests.integration.test_consul_keys import CAP, HOST, publishing
from tests.integration.test_consul_session import Area, consul_area
from tests.integration.test_docker_events import proxy_to_engine
from tests.integration.test_faults import converged
from tests.integration.test_selfdeploy import Site, open_condo, start_first_condo

pytestmark = [pytest.mark.docker]

BUSYBOX = "condo-test/busybox:1"
WORKLOAD = '{:spec {:Image "condo-test/busybox:1"} :stop-timeout 1}\n'


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with open_condo(tmp_path, docker) as made:
        yield made


# --- 1. the engine away inside a stop-then-start hand-over ----------------------------------------


async def test_hand_over_brings_the_old_condo_back_after_the_engine_was_away(
    tmp_path: Path,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: "on any failure (..., the engine away) ... after stop-then-start the hand-over
    container starts the old condo again". The engine goes away for 3 s right after the old
    condo was stopped: starting the successor fails, and so does the first start of the old one.
    Once the engine is back the old condo must run again (else nothing supervises, for ever)."""
    monkeypatch.setattr(selfdeploy, "OLD_STOP_GRACE", 1.0)
    old = await docker.create(
        {"Image": BUSYBOX, "Cmd": ["sleep", "3600"], "Labels": dict(container_labels)},
        name=f"red3-old-{uuid.uuid4().hex[:8]}",
    )
    await docker.start(old)
    hash_ = uuid.uuid4().hex
    new = await docker.create(
        {
            "Image": BUSYBOX,
            "Cmd": ["sleep", "3600"],
            "Labels": {**container_labels, SELF_HASH_LABEL: hash_},
        },
        name=f"red3-new-{uuid.uuid4().hex[:8]}",
    )
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"services": {}}))
    with trio.fail_after(60):
        async with (
            proxy_to_engine(tmp_path) as proxy,
            open_docker(f"unix://{proxy.path}") as client,
        ):
            original_stop = client.stop

            async def stop_then_engine_away(cid: ContainerId, *, grace: float) -> None:
                await original_stop(cid, grace=grace)
                proxy.cut()  # the engine goes away just after the old condo stopped

            monkeypatch.setattr(client, "stop", stop_then_engine_away)
            plan = HandOverPlan(
                old=old, new=new, hash=hash_, state_path=state, docker_url=f"unix://{proxy.path}"
            )
            async with trio.open_nursery() as nursery:

                async def back_after_3s() -> None:
                    while proxy.accepting:
                        await trio.sleep(0.05)
                    await trio.sleep(3)
                    proxy.restore()

                nursery.start_soon(back_after_3s)
                with contextlib.suppress(Exception):
                    await run_hand_over(client, plan)
            # The engine is back: someone must supervise again, within a few seconds.
            with trio.move_on_after(10):
                while not (await docker.inspect(old)).running:
                    await trio.sleep(0.2)
            assert (await docker.inspect(old)).running, (
                "the old condo stays stopped and the successor never started: nothing supervises"
            )


# --- 2. the engine away right after a start-beside successor started ---------------------------


SLOW_HEALTHY_SUCCESSOR = (
    f'{{:Image "{BUSYBOX}" :Cmd ["sh" "-c" "sleep 4; touch /tmp/ok; sleep 3600"]'
    ' :Healthcheck {:Test ["CMD" "test" "-f" "/tmp/ok"] :Interval 300000000 :StartPeriod 0}}'
)


async def test_engine_away_after_a_successor_started_leaves_no_second_condo_running(
    tmp_path: Path,
    condo: CondoUnderTest,
    docker: DockerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: on failure (the engine away) condo "removes the new container and resumes". The
    engine goes away for 2 s right after the successor's start was answered: the deploy fails,
    and the remove of the successor fails too. Once the engine is back, a successor of this host
    must not be left running beside the resumed condo (two condos of one --host)."""
    successors: set[str] = set()
    original_create = DockerClient.create
    original_start = DockerClient.start
    proxies: list[Any] = []

    async def create(self: DockerClient, body: Mapping[str, Any], *, name: str) -> ContainerId:
        cid = await original_create(self, body, name=name)
        if SELF_LABEL in (body.get("Labels") or {}):
            successors.add(cid)
        return cid

    async def start(self: DockerClient, cid: ContainerId) -> None:
        await original_start(self, cid)
        if cid in successors and proxies and proxies[0].accepting:
            proxies[0].cut()

    monkeypatch.setattr(DockerClient, "create", create)
    monkeypatch.setattr(DockerClient, "start", start)
    with trio.fail_after(90):
        async with proxy_to_engine(tmp_path) as proxy, trio.open_nursery() as nursery:
            proxies.append(proxy)
            config = attrs.evolve(condo.config(), docker_url=f"unix://{proxy.path}")
            running: Running = await nursery.start(run_condo, config)
            condo.running = running
            condo.write("web", WORKLOAD)
            before = await condo.wait_state("web", "Stable")
            (condo.specs / "self.edn").write_text(SLOW_HEALTHY_SUCCESSOR)
            while proxy.accepting:
                await trio.sleep(0.05)
            await trio.sleep(2)
            proxy.restore()
            view = await condo.wait(lambda v: (v.get("self") or {}).get("state") == "failed")
            assert view["self"]["error"]
            await trio.sleep(6)  # the successor would be healthy by now
            rows = await docker.list_containers(labels={SELF_LABEL: condo.host})
            assert [r.id for r in rows if r.state == "running"] == [], (
                "a successor of this host runs beside the resumed condo"
            )
            assert await condo.running_ids("web") == {before["current"]["id"]}
            running.shutdown()


# --- 3. SIGTERM during a start-beside self-deploy --------------------------------------------


STARTING_SUCCESSOR = (
    f'{{:Image "{BUSYBOX}" :Cmd ["sleep" "3600"]'
    ' :Healthcheck {:Test ["CMD" "false"] :Interval 30000000000 :StartPeriod 60000000000}}'
)


async def start_a_successor(condo: CondoUnderTest, docker: DockerClient) -> set[str]:
    """Once `web` is Stable in the state file, write STARTING_SUCCESSOR as self.edn and wait
    until its successor container exists; the ids of `web`'s running containers before."""
    while not (condo.state_path.exists() and "web" in condo.state_file().get("services", {})):
        await trio.sleep(0.1)
    while condo.state_file()["services"]["web"]["phase"] != "Stable":
        await trio.sleep(0.1)
    web = await condo.running_ids("web")
    (condo.specs / "self.edn").write_text(STARTING_SUCCESSOR)
    while not await docker.list_containers(labels={SELF_LABEL: condo.host}):
        await trio.sleep(0.1)
    return web


async def test_sigterm_during_a_start_beside_deploy_leaves_no_successor_and_keeps_workloads(
    condo: CondoUnderTest, docker: DockerClient, nursery: trio.Nursery
) -> None:
    """SIGTERM while the successor is still `starting`: condo exits 0 (README: SIGTERM lets the
    call in flight finish, writes the state file, exits 0), the successor is removed (it never
    took over), the workload runs on, and a condo started again deploys it again and resumes."""
    condo.write("web", WORKLOAD)
    with trio.fail_after(90):
        process = await condo.spawn(nursery)
        web = await start_a_successor(condo, docker)
        await trio.sleep(1)
        process.send_signal(signal.SIGTERM)
        await process.wait()
        assert process.returncode == 0
        assert await docker.list_containers(labels={SELF_LABEL: condo.host}) == []
        assert await condo.running_ids("web") == web
        data = condo.state_file()
        assert data["services"]["web"]["phase"] == "Stable"
        assert (data.get("self") or {}).get("state") != "handed-over"


# --- 4. a start-beside successor that dies right after the old condo exited -------------------


HEALTHY_SUCCESSOR = (
    f'{{:Image "{BUSYBOX}" :Cmd ["sleep" "3600"]'
    ' :Healthcheck {:Test ["CMD" "true"] :Interval 200000000 :StartPeriod 0}}'
)


# (A successor that dies after the old condo exited is not restarted unless self.edn gives it a
# RestartPolicy: said so in README "Self-deploy"; no test pretends otherwise.)


# --- 5. kill -9 during churn, beside a second condo of another host ---------------------------


SEEDS = [int(s) for s in os.environ.get("RED3_SEEDS", "3").split(",")]


async def churn_with_kill9(
    rng: random.Random,
    condo: CondoUnderTest,
    nursery: trio.Nursery,
    expected: dict[str, str],
    *,
    pick: Callable[[random.Random], str],
    images: Sequence[str],
    deploys: Sequence[str],
    spec: Callable[[str, str, str], str],
) -> None:
    """Eight rounds of 1 to 3 random edits (a quarter of them removals of a service that has a
    file), a random pause, then kill -9 and a new `condo`. `expected` (service -> image) follows
    every edit. The draws from `rng` come in one fixed order, so a seed replays its run."""
    for _ in range(8):
        for _ in range(rng.randint(1, 3)):
            service = pick(rng)
            if rng.random() < 0.25 and (condo.specs / f"{service}.edn").exists():
                condo.remove(service)
                expected.pop(service, None)
            else:
                image = rng.choice(images)
                deploy = rng.choice(deploys)
                condo.write(service, spec(service, image, deploy))
                expected[service] = image
        await trio.sleep(rng.choice([rng.uniform(0.0, 0.3), rng.uniform(0.3, 1.5)]))
        condo.kill9()
        assert condo.process is not None
        await condo.process.wait()
        await condo.spawn(nursery)


@pytest.mark.parametrize("seed", SEEDS)
async def test_kill9_churn_beside_another_host_on_the_same_spec_dir(
    seed: int, tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    """Condo A is killed with SIGKILL at random moments during churn (images, strategies,
    removals, re-adds) of six services; condo B (another --host, same engine and spec dir) runs
    throughout. Both end with exactly the desired containers, no orphan, no duplicate."""
    rng = random.Random(seed)
    images = ["condo-test/busybox:1", "condo-test/busybox:2", "condo-test/healthy:1"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    async with condo_files(a_dir, docker) as a, condo_files(b_dir, docker) as b:
        b.specs = a.specs  # one spec dir, two hosts, two state files
        expected: dict[str, str] = {}
        await a.spawn(nursery)
        await b.spawn(nursery)
        try:
            await churn_with_kill9(
                rng,
                a,
                nursery,
                expected,
                pick=lambda r: f"svc{r.randint(0, 5)}",
                images=images,
                deploys=["[:Before]", "[:After 0]", "[:After 1]"],
                spec=lambda _, image, deploy: (
                    f'{{:spec {{:Image "{image}"}} :deploy {deploy} :stop-timeout 1}}'
                ),
            )
            await converged(a, expected, limit=120)
            await converged(b, expected, limit=60)
        finally:
            for under_test in (a, b):
                if under_test.process is not None and under_test.process.returncode is None:
                    under_test.process.kill()


@pytest.mark.parametrize("seed", SEEDS)
async def test_kill9_churn_with_fixed_names(
    seed: int, condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    """Fixed `:Name`s with [:After n] (a rename on every deploy), removals and re-adds, with
    kill -9 at random moments: exactly one container per service, under its fixed name."""
    rng = random.Random(seed * 11)
    images = ["condo-test/busybox:1", "condo-test/busybox:2"]
    expected: dict[str, str] = {}
    names = {f"svc{n}": f"red3-{condo.host}-svc{n}" for n in range(4)}
    await condo.spawn(nursery)
    await churn_with_kill9(
        rng,
        condo,
        nursery,
        expected,
        pick=lambda r: r.choice(sorted(names)),
        images=images,
        deploys=["[:After 0]", "[:After 1]", "[:Before]"],
        spec=lambda service, image, deploy: (
            f'{{:spec {{:Image "{image}" :Name "{names[service]}"}}'
            f" :deploy {deploy} :stop-timeout 1}}"
        ),
    )
    await converged(condo, expected, limit=120)
    for row in await condo.containers():
        service = row.labels["condo.service"]
        info = await condo.docker.inspect(row.id)
        assert info.name.lstrip("/") == names[service], (service, info.name)


# --- 6. Consul that goes away and comes back ----------------------------------------------


@attrs.define
class TcpProxy:
    """127.0.0.1:<port> → the agent; `cut()` drops every connection and refuses new ones."""

    target: int
    port: int = 0
    accepting: bool = True
    _open: set[trio.CancelScope] = attrs.Factory(set)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def cut(self) -> None:
        self.accepting = False
        for scope in self._open:
            scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.accepting:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            with trio.CancelScope() as scope:
                self._open.add(scope)
                try:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, scope)
                        nursery.start_soon(self._pump, upstream, client, scope)
                finally:
                    self._open.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                await sink.send_all(chunk)
        both.cancel()


def spawn_agent(argv: list[str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log, stderr=log)


@contextlib.asynccontextmanager
async def own_consul_agent(
    tmp_path: Path,
) -> AsyncIterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A dev agent of this test's own on free ports; (http port, [its process]) — the list lets a
    test restart it. Killed at the end."""
    http, dns, server, serf_lan, serf_wan, grpc = (free_port() for _ in range(6))
    argv = [
        "consul", "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
        "-http-port", str(http), "-dns-port", str(dns), "-server-port", str(server),
        "-serf-lan-port", str(serf_lan), "-serf-wan-port", str(serf_wan),
        "-grpc-port", str(grpc),
    ]  # fmt: skip
    log = (tmp_path / "consul.log").open("ab")
    processes: list[subprocess.Popen[bytes]] = []

    async def start() -> None:
        processes.append(await trio.to_thread.run_sync(spawn_agent, argv, log))
        with trio.fail_after(30):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    async with httpx.AsyncClient(timeout=1.0) as c:
                        r = await c.get(f"http://127.0.0.1:{http}/v1/status/leader")
                        if r.status_code == 200 and r.json():
                            return
                await trio.sleep(0.2)

    await start()
    try:
        yield http, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()


async def kv(port: int, prefix: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=2.0) as c:
        r = await c.get(f"http://127.0.0.1:{port}/v1/kv/{prefix}/", params={"recurse": "true"})
    if r.status_code == 404:
        return {}
    return {e["Key"]: json.loads(base64.b64decode(e["Value"])) for e in r.json()}


async def until_kv(port: int, prefix: str, predicate: Any, limit: float) -> dict[str, Any]:
    with trio.move_on_after(limit):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                keys = await kv(port, prefix)
                if predicate(keys):
                    return keys
            await trio.sleep(0.2)
    return await kv(port, prefix)


def exposing(condo: CondoUnderTest, port: int, prefix: str) -> Config:
    """`condo`'s configuration, publishing under `prefix` to the agent on `port`."""
    return attrs.evolve(
        condo.config(),
        expose="consul",
        consul_endpoint=f"http://127.0.0.1:{port}",
        consul_prefix=prefix,
    )


async def start_web_and_db(inner: trio.Nursery, condo: CondoUnderTest, config: Config) -> Running:
    """Run condo on `config` in `inner` until its `web` and `db` are both Stable."""
    running: Running = await inner.start(run_condo, config)
    condo.running = running
    condo.write("web", WORKLOAD)
    condo.write("db", WORKLOAD)
    await condo.wait_state("web", "Stable")
    await condo.wait_state("db", "Stable")
    return running


# A connection cut mid-request leaves httpx's body iterator unfinished (as in test_consul_keys).
@pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream.__aiter__'")
@pytest.mark.parametrize("outage", [2.0, 25.0])
async def test_consul_unreachable_while_a_service_is_removed_then_its_key_goes(
    outage: float, tmp_path: Path, condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    """Consul unreachable (2 s: the session and keys stay; 25 s: the agent expires the session)
    while `db` is removed and `web` changes. README: condo "catches up within about 2 s of
    Consul's return" and "a service's key is deleted when it goes"."""
    prefix = f"red3-{uuid.uuid4().hex[:8]}"
    async with own_consul_agent(tmp_path) as (http_port, _):
        proxy = TcpProxy(target=http_port)
        await nursery.start(proxy.serve)
        config = exposing(condo, proxy.port, prefix)
        db, web = f"{prefix}/db/{condo.host}", f"{prefix}/web/{condo.host}"
        with trio.fail_after(90):
            async with trio.open_nursery() as inner:
                running = await start_web_and_db(inner, condo, config)
                keys = await until_kv(http_port, prefix, lambda k: {db, web} <= set(k), 10)
                assert {db, web} <= set(keys)
                proxy.cut()
                condo.remove("db")
                condo.write("web", WORKLOAD.replace("condo-test/busybox:1", "condo-test/busybox:2"))
                await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
                await condo.wait(lambda v: "db" not in v["services"])
                await trio.sleep(outage)  # 25 s: past 2 x TTL, the agent drops the session
                proxy.accepting = True
                keys = await until_kv(
                    http_port,
                    prefix,
                    lambda k: (
                        db not in k
                        and (k.get(web) or {}).get("state", {}).get("current", {}).get("image")
                        == "condo-test/busybox:2"
                    ),
                    5,
                )
                assert db not in keys, "the removed service's key outlived Consul's return"
                assert keys[web]["state"]["current"]["image"] == "condo-test/busybox:2"
                running.shutdown()


async def test_a_restarted_consul_agent_gets_every_key_back(
    tmp_path: Path, condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    """A dev agent restarted on the same port has lost every session and key. README: keys are
    "republished in full ... whenever the session had to be recreated", within about 2 s of
    Consul's return (here: allowed 15 s)."""
    prefix = f"red3-{uuid.uuid4().hex[:8]}"
    async with own_consul_agent(tmp_path) as (http_port, processes):
        config = exposing(condo, http_port, prefix)
        db, web = f"{prefix}/db/{condo.host}", f"{prefix}/web/{condo.host}"
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                running = await start_web_and_db(inner, condo, config)
                await until_kv(http_port, prefix, lambda k: {db, web} <= set(k), 10)
                processes[-1].kill()
                processes[-1].wait()
                condo.remove("db")  # gone while the agent is down
                await condo.wait(lambda v: "db" not in v["services"])
                argv = [str(a) for a in processes[-1].args]  # type: ignore[union-attr]
                log = (tmp_path / "consul.log").open("ab")
                processes.append(await trio.to_thread.run_sync(spawn_agent, argv, log))
                log.close()
                keys = await until_kv(http_port, prefix, lambda k: web in k and db not in k, 15)
                assert web in keys, "the key was not republished after the agent came back"
                assert db not in keys
                running.shutdown()


@pytest.mark.consul
async def test_keys_stay_published_across_a_start_beside_hand_over(tmp_path: Path) -> None:
    """A start-beside self-deploy is the one moment two condos of one --host publish at once:
    the successor's publisher starts (and takes over: it destroys the older session of its
    host), then the old condo exits cleanly (destroying its session). The README: a clean
    shutdown "destroys the session at once", so its keys go, and `wait_for` stops counting the
    host. Throughout and after the hand-over, the host's key must be there: it is one host."""

    async def publish_until(
        area: Area, store: Store, stop: trio.Event, *, task_status: trio.TaskStatus[None]
    ) -> None:
        async with publishing(area, store):
            task_status.started()
            await stop.wait()

    async with consul_area() as area, trio.open_nursery() as nursery:
        key = f"{area.prefix}/web/{HOST}"
        old_store, new_store = Store(HOST), Store(HOST)
        old_store.set_state("web", stable("condo-test/busybox:1"))
        new_store.set_state("web", stable("condo-test/busybox:1"))
        old_exits, successor_exits = trio.Event(), trio.Event()
        missing = 0
        with trio.fail_after(CAP):
            await nursery.start(publish_until, area, old_store, old_exits)
            await area.until_keys(lambda k: key in k)
            # The successor starts beside it and turns healthy within a second.
            await nursery.start(publish_until, area, new_store, successor_exits)
            await trio.sleep(1)
            old_exits.set()  # the old condo exits cleanly: its session is destroyed
            deadline = trio.current_time() + 5
            while trio.current_time() < deadline:
                if key not in await area.keys():
                    missing += 1
                await trio.sleep(0.05)
            successor_exits.set()
        assert missing == 0, (
            f"the host's key was missing for ~{missing * 0.05:.1f} s after the old condo "
            "exited: wait_for stops counting this host during a self-deploy"
        )


# --- 7. a self.edn whose successor looks at another state file or another spec dir ------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["another state path", "another spec dir"])
async def test_a_successor_with_other_paths_never_touches_the_workloads(
    variant: str,
    tmp_path: Path,
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    container_labels: Mapping[str, str],
) -> None:
    """README: the successor "adopts every workload from the shared state file and labels,
    without restarting any". A self.edn with a mistake in it (an empty folder mounted where the
    specs were, or another CONDO_STATE) still makes a healthy successor: the old condo hands
    over and exits. Are the workloads still running afterwards?"""
    specs, other = tmp_path / "specs", tmp_path / "other"
    specs.mkdir()
    other.mkdir()
    host = f"test-{uuid.uuid4().hex[:10]}"
    site = Site(specs, host)
    mounted = other if variant == "another spec dir" else specs
    extra_env = (
        ' "CONDO_STATE=/var/lib/condo/elsewhere.json"' if variant == "another state path" else ""
    )
    try:
        first = await start_first_condo(docker_cli, condo_image, site, container_labels)
        (specs / "web.edn").write_text(WORKLOAD)
        before = await site.wait_stable("web")
        (specs / "self.edn").write_text(
            f'{{:Image "{condo_image}" :Env ["CONDO_SERVER=off"{extra_env}]\n'
            f' :HostConfig {{:Binds ["/var/run/docker.sock:/var/run/docker.sock"\n'
            f'                       "{mounted}:/var/lib/condo"]}}}}\n'
        )
        # Either the successor takes over (the old condo exits), or condo refuses the self.edn
        # (it binds other paths than its own) and says so under "self".
        refused = False
        status: dict[str, Any] = {}
        with trio.fail_after(90):
            while (await docker.inspect(first)).running and not refused:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    status = json.loads((specs / "state.json").read_text()).get("self") or {}
                    refused = status.get("state") == "failed"
                await trio.sleep(0.3)
        if variant == "another spec dir":
            assert refused, "a self.edn that binds another spec directory was deployed"
            assert "does not bind what this condo reads" in status["error"]
        await trio.sleep(5)  # the successor's first reconciliation
        rows = await docker.list_containers(labels=labels.owned_by(host, "web"))
        assert [r.id for r in rows if r.state == "running"] == [before["current"]["id"]], (
            f"{variant}: the successor retired the workload the old condo ran"
        )
    finally:
        with trio.move_on_after(60, shield=True):
            # Every condo first (the hand-started one too), so that none re-creates a workload
            # between the removals.
            for row in await docker.list_containers(labels={SELF_LABEL: host}):
                with contextlib.suppress(ContainerNotFound):
                    await docker.remove(row.id)
            for row in await docker.list_containers(labels=dict(container_labels)):
                with contextlib.suppress(ContainerNotFound):
                    await docker.remove(row.id)
            for row in await docker.list_containers(labels=labels.owned_by(host)):
                with contextlib.suppress(ContainerNotFound):
                    await docker.remove(row.id)


# --- 8. self.edn changed while a start-beside self-deploy is under way ----------------------


async def test_self_edn_changed_during_a_deploy_ends_with_only_the_newest_successor(
    condo: CondoUnderTest,
    docker: DockerClient,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """self.edn A (a successor that never turns healthy) is being deployed when self.edn B (a
    healthy one) replaces it. A fails (its health limit, shortened here to 4 s), and B is then
    deployed: condo hands over to B, and exactly one successor runs, B's, with the workload
    untouched."""
    monkeypatch.setattr(selfdeploy, "SELF_HEALTH_TIMEOUT", 4.0)
    condo.write("web", WORKLOAD)
    with trio.fail_after(60):
        done = trio.Event()

        async def run() -> None:
            await run_condo(condo.config())
            done.set()

        nursery.start_soon(run)
        web = await start_a_successor(condo, docker)
        (condo.specs / "self.edn").write_text(HEALTHY_SUCCESSOR)
        await done.wait()
        rows = await docker.list_containers(labels={SELF_LABEL: condo.host})
        running = [r for r in rows if r.state == "running"]
        assert len(running) == 1, rows
        assert (await docker.inspect(running[0].id)).health == "healthy"  # B, not A
        assert await condo.running_ids("web") == web

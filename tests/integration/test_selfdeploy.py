"""Self-deploy, end to end: condo in its image, on the host engine, replacing itself via self.edn.

The first condo container is started by hand (as an operator would); writing `self.edn` makes it
start its successor, which adopts the workloads. Every condo container carries the test's labels
(or `condo.self=<unique host>` for the ones condo starts) and is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from condo import labels, persist
from condo.config import Config
from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from condo.run import Running, run_condo
from condo.selfdeploy import HAND_OVER_LABEL, SELF_LABEL
from condo.specdir import SpecScanner
from condo.store import Store
from condo.supervisor import Supervisor
from tests.integration.conftest import DockerCli
from tests.integration.harness import (
    CondoUnderTest,
    condo_files,
    remove_host_containers,
    start_condo,
)
from tests.integration.test_docker_events import proxy_to_engine

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WORKLOAD = '{:spec {:Image "condo-test/busybox:1"}}\n'


class Site:
    """A spec directory mounted into condo containers, and their common host name."""

    def __init__(self, specs: Path, host: str) -> None:
        self.specs = specs
        self.host = host

    def state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.specs / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    async def wait_stable(self, service: str, limit: float = 60) -> dict[str, Any]:
        with trio.fail_after(limit):
            while True:
                record = ((self.state() or {}).get("services") or {}).get(service)
                if record is not None and record["phase"] == "Stable":
                    return record  # type: ignore[no-any-return]
                await trio.sleep(0.2)

    def self_spec(self, image: str, *extra: str) -> str:
        return (
            f'{{:Image "{image}" :Env ["CONDO_SERVER=off"] {" ".join(extra)}\n'
            f' :HostConfig {{:Binds ["/var/run/docker.sock:/var/run/docker.sock"\n'
            f'                       "{self.specs}:/var/lib/condo"]}}}}\n'
        )


async def remove_successors(docker: DockerClient, host: str) -> None:
    """Remove the condo containers started for `host` by a self-deploy (and its hand-over)."""
    with trio.move_on_after(30, shield=True):
        for selector in ({SELF_LABEL: host}, {HAND_OVER_LABEL: host}):
            for row in await docker.list_containers(labels=selector):
                with contextlib.suppress(ContainerNotFound):  # AutoRemove may beat us
                    await docker.remove(row.id)


@contextlib.asynccontextmanager
async def open_site(tmp_path: Path, docker: DockerClient) -> AsyncIterator[Site]:
    """A fresh Site; at the end every container of its host is removed."""
    specs = tmp_path / "specs"
    specs.mkdir()
    host = f"test-{uuid.uuid4().hex[:10]}"
    try:
        yield Site(specs, host)
    finally:
        # condo containers first, so that none replaces a workload during the cleanup
        await remove_successors(docker, host)
        with trio.move_on_after(60, shield=True):
            await remove_host_containers(docker, host)


@contextlib.asynccontextmanager
async def open_condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    """condo_files, and at the end the successors its self-deploys started."""
    async with condo_files(tmp_path, docker) as under_test:
        try:
            yield under_test
        finally:
            await remove_successors(docker, under_test.host)


@pytest.fixture
async def site(tmp_path: Path, docker: DockerClient) -> AsyncIterator[Site]:
    async with open_site(tmp_path, docker) as made:
        yield made


async def start_first_condo(
    docker_cli: DockerCli,
    image: str,
    site: Site,
    container_labels: Mapping[str, str],
    *run_args: str,
) -> ContainerId:
    """condo's first container, started by hand (`docker run`, more `run_args` if given)."""
    label_args = [a for k, v in container_labels.items() for a in ("--label", f"{k}={v}")]
    out = await docker_cli(
        "run", "-d", *label_args, *run_args,
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{site.specs}:/var/lib/condo",
        "-e", f"CONDO_HOST={site.host}", "-e", "CONDO_SERVER=off",
        image,
    )  # fmt: skip
    return ContainerId(out.strip())


async def test_self_deploy_hands_over_without_touching_workloads(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    site: Site,
    container_labels: Mapping[str, str],
) -> None:
    second_tag = f"{condo_image}-next"
    await docker_cli("tag", condo_image, second_tag)
    try:
        first = await start_first_condo(docker_cli, condo_image, site, container_labels)
        (site.specs / "web.edn").write_text(WORKLOAD)
        before = await site.wait_stable("web")

        (site.specs / "self.edn").write_text(site.self_spec(second_tag))
        with trio.fail_after(90):
            while (info := await docker.inspect(first)).running:
                await trio.sleep(0.3)
            exit_code = info.exit_code
        assert exit_code == 0
        successors = await docker.list_containers(labels={SELF_LABEL: site.host})
        assert len(successors) == 1
        successor = await docker.inspect(successors[0].id)
        assert successor.running
        assert successor.image == second_tag
        assert successor.labels["condo.self-hash"]

        # The workload kept running throughout, and the new condo adopted it.
        rows = await docker.list_containers(labels=labels.owned_by(site.host, "web"))
        assert [r.id for r in rows] == [before["current"]["id"]]
        (site.specs / "more.edn").write_text(WORKLOAD)  # the successor supervises
        await site.wait_stable("more")
        after = await site.wait_stable("web")
        assert after["current"]["id"] == before["current"]["id"]
    finally:
        await docker_cli("rmi", "--no-prune", second_tag)


async def test_a_broken_successor_is_removed_and_the_old_condo_resumes(
    condo_image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    site: Site,
    container_labels: Mapping[str, str],
) -> None:
    first = await start_first_condo(docker_cli, condo_image, site, container_labels)
    (site.specs / "web.edn").write_text(WORKLOAD)
    before = await site.wait_stable("web")
    # This successor exits at once (its PREFIX does not exist): it never becomes healthy.
    (site.specs / "self.edn").write_text(
        site.self_spec(condo_image, ':Cmd ["run" "/does-not-exist"]')
    )
    with trio.fail_after(60):
        while not (await docker.list_containers(labels={SELF_LABEL: site.host})):
            await trio.sleep(0.2)
        while await docker.list_containers(labels={SELF_LABEL: site.host}):
            await trio.sleep(0.3)  # removed again
    assert (await docker.inspect(first)).running
    (site.specs / "more.edn").write_text(WORKLOAD)  # resumed: it deploys new specs
    await site.wait_stable("more")
    rows = await docker.list_containers(labels=labels.owned_by(site.host, "web"))
    assert [r.id for r in rows] == [before["current"]["id"]]


# --- in-process: every failure of a self-deploy resumes supervision (issue item 6) ----------------
#
# condo runs in the test process (not in a container: no own container, so no port of its own can
# clash), on the real engine. Its successors are busybox containers labelled condo.self=<host>,
# removed by the teardown of condo_files (remove_host_containers) and by `open_condo`.

BUSYBOX = "condo-test/busybox:1"


async def failed_self(condo: CondoUnderTest, limit: float = 30) -> dict[str, Any]:
    """Wait until /v1/state says the self-deploy failed; its "self" field."""
    view = await condo.wait(lambda v: (v.get("self") or {}).get("state") == "failed", limit=limit)
    status: dict[str, Any] = view["self"]
    return status


async def still_supervises(condo: CondoUnderTest) -> None:
    """Resumed: a new spec is deployed, and the services nursery is open again."""
    condo.write("more", WORKLOAD)
    await condo.wait_state("more", "Stable", limit=30)


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with open_condo(tmp_path, docker) as made:
        yield made


@pytest.mark.parametrize(
    "case", ["pull fails", "name clash", "port clash at start", "exits at once"]
)
async def test_a_failed_self_deploy_resumes_supervision_and_says_why(
    case: str,
    condo: CondoUnderTest,
    docker: DockerClient,
    docker_cli: DockerCli,
    container_labels: Mapping[str, str],
    container_name: Callable[[str], str],
    nursery: trio.Nursery,
) -> None:
    holder = socket.socket()
    try:
        if case == "pull fails":
            body = '{:Image "localhost:5000/condo-test/no-such-image:1"}'
            expected = "no-such-image"
        elif case == "name clash":
            taken = container_name("taken")
            label_args = [a for k, v in container_labels.items() for a in ("--label", f"{k}={v}")]
            await docker_cli("create", "--name", taken, *label_args, BUSYBOX)
            body = f'{{:Image "{BUSYBOX}" :Name "{taken}"}}'
            expected = taken
        elif case == "port clash at start":
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            body = (
                f'{{:Image "{BUSYBOX}" :ExposedPorts {{"80/tcp" {{}}}}'
                f' :HostConfig {{:PortBindings {{"80/tcp" [{{:HostIp "127.0.0.1"'
                f' :HostPort "{port}"}}]}}}}}}'
            )
            expected = str(port)
        else:
            body = f'{{:Image "{BUSYBOX}" :Cmd ["true"]}}'
            expected = "exit"
        with trio.fail_after(60):
            await start_condo(nursery, condo)
            condo.write("web", WORKLOAD)
            before = await condo.wait_state("web", "Stable")
            (condo.specs / "self.edn").write_text(body)
            status = await failed_self(condo)
            assert expected in status["error"], status
            await still_supervises(condo)
            # No successor is left behind, and the workload was never touched.
            assert await docker.list_containers(labels={SELF_LABEL: condo.host}) == []
            assert await condo.running_ids("web") == {before["current"]["id"]}
            # The failure is in the state file too (remembered across a restart).
            assert condo.state_file()["self"]["state"] == "failed"
    finally:
        holder.close()


HEALTHY_SUCCESSOR = (
    f'{{:Image "{BUSYBOX}" :Cmd ["sleep" "3600"]'
    ' :Healthcheck {:Test ["CMD" "true"] :Interval 200000000 :StartPeriod 0}}'
)


async def hand_over_in_process(
    condo: CondoUnderTest, docker: DockerClient, config: Config, nursery: trio.Nursery
) -> dict[str, Any]:
    """Run condo until it hands over to a (busybox) successor; once the successor exists it
    owns the state file, so the test writes there what a successor would. The state file after
    the old condo exited."""
    done = trio.Event()

    async def run() -> None:
        await run_condo(config)
        done.set()

    nursery.start_soon(run)
    while not await docker.list_containers(labels={SELF_LABEL: condo.host}):
        await trio.sleep(0.05)
    condo.state_path.write_text(json.dumps({"written by": "the successor"}))
    await done.wait()
    [successor] = await docker.list_containers(labels={SELF_LABEL: condo.host})
    assert (await docker.inspect(successor.id)).running
    return condo.state_file()


async def test_nothing_is_written_after_the_hand_over(
    condo: CondoUnderTest, docker: DockerClient, nursery: trio.Nursery
) -> None:
    (condo.specs / "self.edn").write_text(HEALTHY_SUCCESSOR)
    with trio.fail_after(60):
        state = await hand_over_in_process(condo, docker, condo.config(), nursery)
    assert state == {"written by": "the successor"}


async def test_engine_away_when_self_edn_is_first_seen(
    tmp_path: Path, condo: CondoUnderTest, docker: DockerClient, nursery: trio.Nursery
) -> None:
    """condo starts with self.edn in place and no engine (connection refused): it keeps running
    and says so; once the engine answers it deploys the successor and hands over."""
    socket_path = tmp_path / "engine.sock"
    config = attrs.evolve(condo.config(), docker_url=f"unix://{socket_path}")
    (condo.specs / "self.edn").write_text(HEALTHY_SUCCESSOR)
    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            running: Running = await inner.start(run_condo, config)
            condo.running = running
            view = await condo.wait(lambda v: (v.get("self") or {}).get("state") == "waiting")
            assert view["self"]["error"]
            running.shutdown()
        async with proxy_to_engine(tmp_path):
            state = await hand_over_in_process(condo, docker, config, nursery)
    assert state == {"written by": "the successor"}


async def test_a_snapshot_between_resume_and_respawn_is_kept(
    condo: CondoUnderTest, docker: DockerClient
) -> None:
    """The services nursery reopens after resume(); a snapshot in between is replayed, not an
    AssertionError."""
    config = condo.config()
    store = Store(config.host)
    writer = persist.StateWriter(config.state_path, dict)
    supervisor = Supervisor(config, docker, store, writer, {})
    condo.write("web", WORKLOAD)
    snapshot = SpecScanner([condo.specs]).scan()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run_services)
            await supervisor.suspend()
            supervisor.resume()
            supervisor.on_snapshot(snapshot)  # before run_services has reopened its nursery
            while "web" not in store.entries or store.entries["web"].state.phase.value != "Stable":
                await store.wait_changed(store.version)
            nursery.cancel_scope.cancel()


# --- the README's self-deploy example, run as written (issue item 7) -----------------------------
#
# This test owns /srv/condo, the container name `condo` and port 4280 on 127.0.0.1, as the README
# does; it runs the README's own `sh` blocks with bash, substituting nothing. Cleanup: the
# containers of host `$(hostname)` (the README's CONDO_HOST) and its condo containers, the spec
# folder, and the condo:1.1 tag.

README = Path(__file__).resolve().parents[2] / "README.md"
API = "http://127.0.0.1:4280"


def readme_block(containing: str) -> str:
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    # The first: the zero-gap example further down contains the same words.
    return next(b for b in blocks if containing in b)


async def bash(script: str) -> None:
    result = await trio.run_process(
        ["bash", "-euo", "pipefail", "-c", script], cwd=README.parent,
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]


async def readme_cleanup(docker: DockerClient, host: str) -> None:
    with trio.move_on_after(60, shield=True):
        for selector in ({SELF_LABEL: host}, {HAND_OVER_LABEL: host}):
            for row in await docker.list_containers(labels=selector):
                with contextlib.suppress(ContainerNotFound):
                    await docker.remove(row.id)
        with contextlib.suppress(ContainerNotFound):
            await docker.remove(ContainerId("condo"))
        await remove_host_containers(docker, host)
        await trio.run_process(["rm", "-rf", "/srv/condo"])
        await trio.run_process(["docker", "rmi", "--no-prune", "condo:1.1"], check=False,
                               capture_stdout=True, capture_stderr=True)  # fmt: skip


class Probe:
    """GET /healthz on the README's port every 50 ms; the longest time it did not answer."""

    def __init__(self) -> None:
        self.longest_gap = 0.0

    async def run(self) -> None:
        down_since: float | None = None
        async with httpx.AsyncClient(timeout=0.5) as client:
            while True:
                try:
                    ok = (await client.get(f"{API}/healthz")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                now = trio.current_time()
                if not ok and down_since is None:
                    down_since = now
                elif ok and down_since is not None:
                    self.longest_gap = max(self.longest_gap, now - down_since)
                    down_since = None
                await trio.sleep(0.05)


async def api_state() -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            answer: dict[str, Any] = (await client.get(f"{API}/v1/state")).json()
            return answer
    except (httpx.HTTPError, ValueError):
        return None


async def test_the_readme_self_deploy_example_works_as_written(
    docker: DockerClient, nursery: trio.Nursery
) -> None:
    host = socket.gethostname()  # the README's CONDO_HOST=$(hostname)
    await readme_cleanup(docker, host)
    try:
        with trio.fail_after(240):
            await bash(readme_block("docker run -d --name condo"))
            while ((await api_state()) or {}).get("services", {}).get("web", {}).get(
                "state"
            ) != "Stable":
                await trio.sleep(0.3)
            web = (await api_state() or {})["services"]["web"]["current"]["id"]
            first = await docker.inspect("condo")

            probe = Probe()
            nursery.start_soon(probe.run)
            await bash(readme_block("self.edn"))
            # Stop-then-start: the hand-started condo is removed, its successor serves the port.
            while True:
                rows = await docker.list_containers(labels={SELF_LABEL: host})
                try:
                    await docker.inspect(first.id)
                    gone = False
                except ContainerNotFound:  # removed by the hand-over container: done
                    gone = True
                if gone and rows and (await docker.inspect(rows[0].id)).health == "healthy":
                    break
                await trio.sleep(0.3)
            state = await api_state()
            assert state is not None and state["services"]["web"]["current"]["id"] == web
            assert 0 < probe.longest_gap < 5, probe.longest_gap  # README: about 1 s
            successor = rows[0].id

            # A successor that fails: the hand-over brings the running condo back on the port,
            # and it says why; the workload is untouched.
            broken = (Path("/srv/condo/self.edn").read_text()).replace(
                '{:Image "condo:1.1"', '{:Image "condo:1.1" :Cmd ["run" "/does-not-exist"]'
            )
            Path("/srv/condo/self.edn").write_text(broken)
            while ((await api_state()) or {}).get("self", {}).get("state") != "failed":
                await trio.sleep(0.3)
            assert [r.id for r in await docker.list_containers(labels={SELF_LABEL: host})] == [
                successor
            ]
            state = await api_state()
            assert state is not None and state["services"]["web"]["current"]["id"] == web
            assert "exit" in state["self"]["error"]
    finally:
        await readme_cleanup(docker, host)

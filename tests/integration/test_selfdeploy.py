"""Self-deploy, end to end: condo in its image, on the host engine, replacing itself via self.edn.

The first condo container is started by hand (as an operator would); writing `self.edn` makes it
start its successor, which adopts the workloads. Every condo container carries the test's labels
(or `condo.self=<unique host>` for the ones condo starts) and is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from condo import labels, persist
from condo.config import Config
from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from condo.selfdeploy import SELF_LABEL
from condo.specdir import SpecScanner
from condo.store import Store
from condo.supervisor import Running, Supervisor, run_condo
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


@pytest.fixture
async def site(tmp_path: Path, docker: DockerClient) -> AsyncIterator[Site]:
    specs = tmp_path / "specs"
    specs.mkdir()
    host = f"test-{uuid.uuid4().hex[:10]}"
    yield Site(specs, host)
    with trio.move_on_after(60, shield=True):
        # condo containers first, so that none replaces a workload during the cleanup
        for row in await docker.list_containers(labels={SELF_LABEL: host}):
            with contextlib.suppress(ContainerNotFound):  # AutoRemove may beat us
                await docker.remove(row.id)
        await remove_host_containers(docker, host)


async def start_first_condo(
    docker_cli: DockerCli, image: str, site: Site, container_labels: Mapping[str, str]
) -> ContainerId:
    label_args = [a for k, v in container_labels.items() for a in ("--label", f"{k}={v}")]
    out = await docker_cli(
        "run", "-d", *label_args,
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
# removed by the `site`-like teardown of condo_files (remove_host_containers) and below.

BUSYBOX = "condo-test/busybox:1"


async def remove_successors(docker: DockerClient, host: str) -> None:
    with trio.move_on_after(30, shield=True):
        for row in await docker.list_containers(labels={SELF_LABEL: host}):
            with contextlib.suppress(ContainerNotFound):  # AutoRemove may beat us
                await docker.remove(row.id)


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
    async with condo_files(tmp_path, docker) as under_test:
        try:
            yield under_test
        finally:
            await remove_successors(docker, under_test.host)


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

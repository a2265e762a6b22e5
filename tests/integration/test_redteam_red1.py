"""Red team (red1): attacks on the promises of recovery and ownership, on the real engine.

Each test states the promise it attacks (README section) and fails when the promise breaks. They
are kept whether they pass or fail: the lead decides what to fix.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from condo import labels, selfdeploy
from condo.docker import DockerClient
from condo.errors import ContainerNotFound
from condo.run import run_condo
from tests.integration.harness import (
    CondoUnderTest,
    condo_files,
    free_port,
    remove_host_containers,
    running_condo,
)

pytestmark = pytest.mark.docker

SLEEPER = """{{:spec {{:Image "condo-test/busybox:{tag}"}} :deploy {deploy} :stop-timeout 1}}"""
# A candidate whose healthcheck stays "starting" for a long while, then fails.
SLOW_CANDIDATE = (
    '{:spec {:Image "condo-test/busybox:2" :Healthcheck {:Test ["CMD" "false"]'
    " :Interval 30000000000 :Retries 1}} :deploy [:After 0] :health-timeout 60 :stop-timeout 1}"
)


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def still_running(docker: DockerClient, cid: str) -> bool:
    try:
        return (await docker.inspect(cid)).running
    except ContainerNotFound:
        return False


# --- 1. A PREFIX missing at start-up ---------------------------------------------------------


async def test_a_prefix_missing_at_startup_keeps_its_services(
    condo: CondoUnderTest, docker: DockerClient
) -> None:
    """README, Differences #15: "a missing or unreadable PREFIX keeps its services instead of
    stopping them". Attack: the PREFIX is missing (an unmounted volume) when condo *starts*,
    with a state file that records the service and its container running."""
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
        cid = first["current"]["id"]
        condo.specs.rename(condo.specs.with_name("specs.unmounted"))
        async with running_condo(condo):
            await trio.sleep(3)  # time for a wrong retirement to show
            assert await still_running(docker, cid), (
                "condo started with its PREFIX missing stopped the service's container"
            )


# --- 2. A lost record during WaitNext --------------------------------------------------------


async def test_a_lost_record_in_waitnext_keeps_serving_until_the_candidate_is_ready(
    condo: CondoUnderTest, docker: DockerClient
) -> None:
    """README, Persistence: without records "a running container of the service is adopted as
    it is ... never removed before its successor is ready". Attack: condo goes down during an
    [:After 0] deploy (old container serving, candidate still starting) and the state file is
    lost; both containers run when condo comes back."""
    condo.write("web", SLEEPER.format(tag=1, deploy="[:After 0]"))
    with trio.fail_after(90):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
            condo.write("web", SLOW_CANDIDATE)
            await condo.wait(lambda view: view["services"]["web"]["next"] is not None)
        old = first["current"]["id"]
        condo.state_path.unlink()
        async with running_condo(condo):
            # The candidate's healthcheck is not due for 30 s: it is not ready.
            await trio.sleep(3)
            view = condo.service("web")
            assert view is not None
            assert await still_running(docker, old), (
                f"the serving container was removed while its successor was not ready "
                f"(service now {view['state']})"
            )


# (Two condos sharing one --host were shown to retire each other's services: not supported, and
# said so in README "Persistence and recovery"; no test pretends otherwise.)


@pytest.mark.parametrize("owner", ["another-host", "unlabelled"])
async def test_a_record_naming_a_container_of_someone_else_never_touches_it(
    condo: CondoUnderTest,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    owner: str,
) -> None:
    """README: condo "checks the labels on the engine before each such call, whatever its
    records say". Attack: a state file of this very host whose record's current container is
    another host's (or an unlabelled) container, and a spec change that retires it."""
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    extra = (
        labels.for_container(f"{condo.host}-other", "web", "x") if owner == "another-host" else {}
    )
    victim = await docker.create(
        {"Image": "condo-test/busybox:1", "Labels": {**container_labels, **extra}},
        name=f"{condo.host}-victim",
    )
    await docker.start(victim)
    try:
        with trio.fail_after(60):
            async with running_condo(condo):
                await condo.wait_state("web", "Stable")
            data = condo.state_file()
            data["services"]["web"]["current"]["id"] = victim
            data["services"]["web"]["current"]["name"] = f"{condo.host}-victim"
            condo.state_path.write_text(json.dumps(data))
            condo.write("web", SLEEPER.format(tag=2, deploy="[:Before]"))
            async with running_condo(condo):
                await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
                await trio.sleep(1)
        assert await still_running(docker, victim), "condo stopped a container it does not own"
    finally:
        with trio.move_on_after(30, shield=True):
            await remove_host_containers(docker, f"{condo.host}-other")


# --- 5. State files with numbers JSON allows but condo cannot use ------------------------------


def _set(path: tuple[str, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data["services"]["web"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set(("attempt",), math.inf), id="attempt-Infinity"),
        pytest.param(_set(("deadline_at",), math.nan), id="deadline-NaN"),
        pytest.param(_set(("deadline_at",), math.inf), id="deadline-Infinity"),
        pytest.param(_set(("current", "created_at"), math.nan), id="created_at-NaN"),
        pytest.param(_set(("error",), {"message": "x", "at": math.inf}), id="error_at-Infinity"),
    ],
)
async def test_a_state_file_with_non_finite_numbers_never_crashes_condo(
    condo: CondoUnderTest, docker: DockerClient, edit: Callable[[dict[str, Any]], None]
) -> None:
    """README, Persistence: a corrupt state file is moved aside, a record condo cannot read is
    dropped, and the engine's labels rebuild the picture. Attack: Python's json reads NaN and
    Infinity (the state file is valid JSON for it), and condo writes with allow_nan=False."""
    condo.write("web", SLEEPER.format(tag=1, deploy="[:Before]"))
    with trio.fail_after(60):
        async with running_condo(condo):
            first = await condo.wait_state("web", "Stable")
        data = condo.state_file()
        edit(data)
        condo.state_path.write_text(json.dumps(data))  # allow_nan: NaN / Infinity literals
        async with running_condo(condo):
            await condo.wait_state("web", "Stable")
            condo.write("web", SLEEPER.format(tag=2, deploy="[:Before]"))
            await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
            await condo.running.writer.flush() if condo.running else None
    assert not await condo.running_ids("web") & {first["current"]["id"]}
    json.loads(condo.state_path.read_text())  # a readable file was written at shutdown


# --- 6. An unlabelled container holding the fixed :Name -------------------------------------


@pytest.mark.parametrize("strategy", ["[:Before]", "[:After 0]"])
async def test_an_unlabelled_container_holding_the_fixed_name_is_never_touched(
    condo: CondoUnderTest,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    strategy: str,
) -> None:
    """README: a fixed :Name clash is an error of its service alone, and condo never touches a
    container without its own host label. Attack: an unlabelled container holds the :Name
    (and, for [:After], the `-next` name too)."""
    fixed = f"{condo.host}-fixed"
    squatters = []
    for name in (fixed, f"{fixed}-next"):
        cid = await docker.create(
            {"Image": "condo-test/busybox:1", "Labels": dict(container_labels)}, name=name
        )
        await docker.start(cid)
        squatters.append(cid)
    condo.write(
        "web",
        f'{{:spec {{:Image "condo-test/busybox:1" :Name "{fixed}"}} :deploy {strategy}'
        " :stop-timeout 1}",
    )
    with trio.fail_after(60):
        async with running_condo(condo):
            view = await condo.wait_state("web", "TryAgain")
            await trio.sleep(1)
    assert "409" in view["error"]["message"] or "onflict" in view["error"]["message"]
    for cid in squatters:
        assert await still_running(docker, cid), "condo stopped an unlabelled container"
    assert not await condo.containers("web")


# --- 7. A hand-over container that dies before it stops this condo ---------------------------


async def test_a_hand_over_container_that_dies_early_leaves_condo_supervising(
    condo: CondoUnderTest,
    docker: DockerClient,
    container_labels: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, Self-deploy: "every failure resumes". Attack: the stop-then-start hand-over
    container starts but dies before stopping this condo (here: it cannot reach the engine,
    because this condo's container has no socket bind; an OOM kill or an operator's `docker rm`
    end the same way). Does this condo resume, or exit with every service suspended and a
    created, never started successor left behind?"""
    port = free_port()
    # This condo's "own container": the condo image (so the hand-over command exists), with
    # the port that self.edn publishes too.
    own = await docker.create(
        {
            "Image": "condo:dev",
            "Entrypoint": ["sleep", "300"],
            "Labels": dict(container_labels),
            "ExposedPorts": {"80/tcp": {}},
            "HostConfig": {
                "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
            },
        },
        name=f"{condo.host}-own",
    )
    await docker.start(own)
    own_info = await docker.inspect(own)

    async def fake_own_container(_docker: DockerClient) -> Any:
        return own_info

    monkeypatch.setattr(selfdeploy, "find_own_container", fake_own_container)
    monkeypatch.setattr(selfdeploy, "HAND_OVER_STOP_LIMIT", 5.0)
    run_label = "".join(f' "{k}" "{v}"' for k, v in container_labels.items())
    condo.write("work", SLEEPER.format(tag=1, deploy="[:Before]"))
    binding = f'{{"80/tcp" [{{:HostIp "127.0.0.1" :HostPort "{port}"}}]}}'
    (condo.specs / "self.edn").write_text(
        f'{{:Image "condo-test/busybox:1" :Labels {{{run_label}}}'
        f" :HostConfig {{:PortBindings {binding}}}}}"
    )
    exited = trio.Event()
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    try:
                        await run_condo(condo.config(), task_status=task_status_for(condo))
                    finally:
                        exited.set()

                def task_status_for(under_test: CondoUnderTest) -> Any:
                    class Started:
                        def started(self, running: Any = None) -> None:
                            under_test.running = running

                    return Started()

                nursery.start_soon(run)
                with trio.move_on_after(15):
                    await exited.wait()
                still_up = not exited.is_set()
                if condo.running is not None:
                    condo.running.shutdown()
        successors = await docker.list_containers(labels={selfdeploy.SELF_LABEL: condo.host})
        assert still_up, (
            "condo exited after its hand-over container died: every service stayed suspended "
            f"and the successor was left as {[(s.name, s.state) for s in successors]}"
        )
        assert not successors, f"a successor was left behind: {successors}"
    finally:
        with trio.move_on_after(30, shield=True):
            for label in (selfdeploy.SELF_LABEL, selfdeploy.HAND_OVER_LABEL):
                for row in await docker.list_containers(labels={label: condo.host}):
                    with contextlib.suppress(ContainerNotFound):
                        await docker.remove(row.id)

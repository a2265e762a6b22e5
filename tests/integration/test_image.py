"""The condo container image: built offline by scripts/build-image, run against the host engine.

The module builds the image once, under a tag of its own (`condo:test-<random>`, removed at the
end with `--no-prune`, so the layer cache stays for the next build), reusing the cached base. The
first build on a new machine also makes the base with debootstrap (about a minute).

Every container a test starts carries `condo-test=1` and the test's own label; condo's workloads
carry `condo.host=<a unique host>` (set through `CONDO_HOST`, which also proves that the image
reads its options from the environment). Teardown removes the condo container first, so it cannot
replace a workload while the workloads are being removed.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import condo
from condo import labels
from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from tests.integration.conftest import RUN_LABEL, DockerCli
from tests.integration.harness import remove_host_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BUILD_LIMIT = 900  # seconds; a warm build takes a few, a cold base about a minute
MAX_IMAGE_MB = 200  # measured 167 MB: the bookworm base ~124 MB, condo's venv ~38, HAProxy ~5
SPEC = '{:spec {:Image "condo-test/busybox:1" :Labels {"condo-test" "1"}}}\n'


@pytest.fixture
def image(condo_image: str) -> str:
    return condo_image


def docker_labels(container_labels: Mapping[str, str]) -> list[str]:
    return [arg for key, value in container_labels.items() for arg in ("--label", f"{key}={value}")]


def inspect_image(tag: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, text=True, check=True
    ).stdout
    found: list[dict[str, Any]] = json.loads(out)
    return found[0]


async def test_the_image_is_small_and_says_its_version(
    image: str, docker_cli: DockerCli, container_labels: Mapping[str, str]
) -> None:
    with trio.fail_after(60):
        version = await docker_cli("run", "--rm", *docker_labels(container_labels), image,
                                   "--version")  # fmt: skip
        assert version.strip() == condo.__version__

        meta = inspect_image(image)
        config = meta["Config"]
        assert meta["Size"] < MAX_IMAGE_MB * 1_000_000, f"{meta['Size'] / 1e6:.0f} MB"
        assert config["Labels"]["org.opencontainers.image.version"] == condo.__version__
        assert config["Entrypoint"] == ["condo"]
        assert config["Cmd"] == ["run", "/var/lib/condo"]
        assert "CONDO_STATE=/var/lib/condo/state.json" in config["Env"]
        assert "CONDO_SERVER=0.0.0.0:80" in config["Env"]
        assert list(config["Volumes"]) == ["/var/lib/condo"]
        assert config["Healthcheck"]["Test"][:2] == ["CMD", "python3"]

        # What the image holds: the PLY tables written at build time, and nothing of the build.
        facts = await docker_cli(
            "run", "--rm", *docker_labels(container_labels), "--entrypoint", "python3", image, "-c",
            "import edn_format, glob, json, os, pathlib;"
            "tables = pathlib.Path(edn_format.__file__).parent / 'parsetab.py';"
            "print(json.dumps({'tables': tables.is_file(), 'wheels': os.path.exists('/wheels'),"
            " 'pip': glob.glob('/opt/condo/bin/pip*') + glob.glob('/root/.cache/pip')}))",
        )  # fmt: skip
        assert json.loads(facts) == {"tables": True, "wheels": False, "pip": []}


async def test_the_environment_overrides_the_images_defaults(
    image: str, container_labels: Mapping[str, str]
) -> None:
    # An address condo cannot parse, given only through the environment: if CONDO_SERVER did not
    # beat the image's own default, condo would start instead of refusing it.
    with trio.fail_after(60):
        result = await trio.run_process(
            ["docker", "run", "--rm", *docker_labels(container_labels),
             "-e", "CONDO_SERVER=no-such-address", image],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr.decode()
    assert "--server 'no-such-address'" in result.stderr.decode()


@attrs.define
class CondoContainer:
    """condo running in the image, its spec directory mounted at /var/lib/condo."""

    specs: Path
    host: str
    id: ContainerId | None = None

    def state_file(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.specs / "state.json").read_text())
        except FileNotFoundError:
            return None
        return data


@pytest.fixture
async def condo_container(
    tmp_path: Path, docker: DockerClient, container_labels: Mapping[str, str]
) -> AsyncIterator[CondoContainer]:
    specs = tmp_path / "specs"
    specs.mkdir()
    under_test = CondoContainer(specs=specs, host=f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield under_test
    finally:
        # Shielded with a deadline: teardown must finish even if the test was cancelled. condo
        # goes first, or it would replace the workloads as they are removed.
        with trio.move_on_after(60, shield=True):
            for row in await docker.list_containers(
                labels={RUN_LABEL: container_labels[RUN_LABEL]}
            ):
                # ContainerNotFound: the test removed it itself in the meantime.
                with contextlib.suppress(ContainerNotFound):
                    await docker.remove(row.id)
            await remove_host_containers(docker, under_test.host)


async def test_condo_in_the_image_brings_a_spec_to_stable(
    image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    container_labels: Mapping[str, str],
    condo_container: CondoContainer,
) -> None:
    under_test = condo_container
    with trio.fail_after(90):
        started = await docker_cli(
            "run", "-d", *docker_labels(container_labels),
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", f"{under_test.specs}:/var/lib/condo",
            "-e", f"CONDO_HOST={under_test.host}", "-e", "CONDO_SERVER=off",
            image,
        )  # fmt: skip
        under_test.id = ContainerId(started.strip())
        # Written after condo started: the watcher inside the container sees the new file.
        (under_test.specs / "web.edn").write_text(SPEC)

        while True:
            state = under_test.state_file()
            record = (state or {}).get("services", {}).get("web")
            rows = await docker.list_containers(labels=labels.owned_by(under_test.host, "web"))
            if record is not None and record["phase"] == "Stable" and rows:
                break
            condo_now = await docker.inspect(under_test.id)
            assert condo_now.running, await docker.logs_tail(under_test.id, 30)
            await trio.sleep(0.2)

        assert state is not None and state["host"] == under_test.host  # CONDO_HOST reached condo
        [row] = rows
        assert row.state == "running"
        assert row.id == record["current"]["id"]
        assert row.image == "condo-test/busybox:1"
        assert row.labels["condo-test"] == "1"  # the spec's own labels are kept

        # condo is PID 1 in its container: `docker stop` (SIGTERM) ends it with 0, and the
        # workload keeps running.
        await docker_cli("stop", "-t", "20", under_test.id)
        stopped = await docker.inspect(under_test.id)
        assert (stopped.running, stopped.exit_code) == (False, 0)
        assert (await docker.inspect(row.id)).running


# The stub answers GET /healthz with 200 on PORT (python's http.server over a folder that holds
# a file named healthz), standing in for condo's API so that the probe itself is what is tested.
STUB = "mkdir -p /srv && echo ok >/srv/healthz && exec python3 -m http.server -d /srv {port}"


@pytest.mark.parametrize(
    ("server_env", "stub_port", "health"),
    [
        (None, 80, "healthy"),  # the image's default, CONDO_SERVER=0.0.0.0:80
        ("8080", 8080, "healthy"),  # a bare PORT is 127.0.0.1:PORT, as in `condo run`
        ("127.0.0.1:8081", 8081, "healthy"),
        ("0.0.0.0:80", None, "unhealthy"),  # nothing answers
        ("off", None, "healthy"),  # no API: nothing to probe
    ],
)
async def test_the_healthcheck_probes_the_address_condo_serves_on(
    image: str,
    docker: DockerClient,
    docker_cli: DockerCli,
    container_labels: Mapping[str, str],
    server_env: str | None,
    stub_port: int | None,
    health: str,
) -> None:
    env = ["-e", f"CONDO_SERVER={server_env}"] if server_env is not None else []
    command = STUB.format(port=stub_port) if stub_port is not None else "exec sleep 60"
    with trio.fail_after(30):
        started = await docker_cli(
            "run", "-d", *docker_labels(container_labels), *env,
            # The image's own probe command, on a faster schedule.
            "--health-interval", "1s", "--health-retries", "2", "--health-start-period", "1ms",
            "--entrypoint", "sh", image, "-c", command,
        )  # fmt: skip
        cid = ContainerId(started.strip())
        while (container := await docker.inspect(cid)).health in (None, "starting"):
            assert container.running, await docker.logs_tail(cid, 30)
            await trio.sleep(0.2)
        assert container.health == health

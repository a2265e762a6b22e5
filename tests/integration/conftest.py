"""Shared fixtures for integration tests against the real parts that scripts/test-env starts.

A missing part fails a test, never skips it. Several test sessions may share one engine at the
same time, so nothing here touches what it did not make: every container a test creates carries
`container_labels` (`condo-test=1` plus a label unique to the test) and is removed at teardown by
that unique label, even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import pytest
import trio

import condo
from condo.docker import DockerClient, open_docker
from condo.errors import ContainerNotFound
from tests.integration.harness import MAIN_ENGINE

REPO = Path(__file__).resolve().parents[2]
TEST_LABEL = "condo-test"
RUN_LABEL = "condo-test.run"


@pytest.fixture
def engine_url() -> str:
    """The engine under test: the main one, unless a test parametrizes `engine_url` (with
    harness.ENGINES, the side engines scripts/engines starts)."""
    return MAIN_ENGINE


@pytest.fixture
async def docker(engine_url: str) -> AsyncIterator[DockerClient]:
    """A DockerClient on the real engine under test (`engine_url`)."""
    async with open_docker(engine_url) as client:
        yield client


@pytest.fixture
async def container_labels(docker: DockerClient) -> AsyncIterator[Mapping[str, str]]:
    """Labels to put on every container the test creates; those containers are removed after."""
    labels = {TEST_LABEL: "1", RUN_LABEL: uuid.uuid4().hex[:12]}
    yield labels
    # Shielded with a deadline: teardown must run to completion even if the test was cancelled.
    with trio.move_on_after(30, shield=True) as scope:
        for container in await docker.list_containers(labels={RUN_LABEL: labels[RUN_LABEL]}):
            # ContainerNotFound: the test removed it itself in the meantime.
            with contextlib.suppress(ContainerNotFound):
                await docker.remove(container.id)
    assert not scope.cancelled_caught, "could not remove the test's containers in 30 s"


@pytest.fixture
def container_name(container_labels: Mapping[str, str]) -> Callable[[str], str]:
    """`container_name("web")` → a container name no other test (or session) uses."""
    return lambda stem: f"condo-test-{container_labels[RUN_LABEL]}-{stem}"


class DockerCli(Protocol):
    async def __call__(
        self, *args: str, stdin: bytes = b"", env: Mapping[str, str] | None = None
    ) -> str: ...


@pytest.fixture
def docker_cli(engine_url: str) -> DockerCli:
    """Run the real `docker` CLI (e.g. `login`, `rmi`) on the engine under test; returns stdout,
    fails the test on error."""

    async def run(*args: str, stdin: bytes = b"", env: Mapping[str, str] | None = None) -> str:
        result = await trio.run_process(
            ["docker", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "DOCKER_HOST": engine_url, **(env or {})},
        )
        assert result.returncode == 0, (
            f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}"
        )
        return result.stdout.decode()

    return run


@pytest.fixture
def remove_local_image(
    docker: DockerClient, docker_cli: DockerCli
) -> Callable[[str], Awaitable[None]]:
    """`await remove_local_image("localhost:5000/...")` untags a registry copy so a pull must
    fetch it. Only for localhost:500x/... references: condo-test/... images are shared."""

    async def remove(reference: str) -> None:
        assert reference.startswith(("localhost:5000/", "localhost:5001/")), reference
        if await docker.image_present(reference):
            # -f: untag even if a (stopped) container of another test was created from it.
            await docker_cli("rmi", "-f", reference)
        assert not await docker.image_present(reference)

    return remove


BUILD_LIMIT = 900  # seconds; a warm build takes a few, a cold base about a minute


@pytest.fixture(scope="session")
def condo_image() -> Iterator[str]:
    """A fresh build of the condo image from this tree (scripts/build-image), for this session.

    Tagged `condo:test-<random>` and removed at the end with `--no-prune`, so that the layers stay
    as the next build's cache.
    """
    tag = f"condo:test-{uuid.uuid4().hex[:10]}"
    built = subprocess.run(
        [str(REPO / "scripts" / "build-image"), tag],
        capture_output=True,
        text=True,
        timeout=BUILD_LIMIT,
        check=False,
    )
    assert built.returncode == 0, f"scripts/build-image failed:\n{built.stderr[-6000:]}"
    assert f"built {tag} (condo {condo.__version__})" in built.stderr.splitlines()[-1]
    yield tag
    subprocess.run(["docker", "rmi", "--no-prune", tag], capture_output=True, check=False)

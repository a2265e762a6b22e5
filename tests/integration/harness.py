"""A condo under test: a spec directory, a state file, a unique host name, on the real engine.

Every container condo makes here carries `condo.host=<unique host>`, so the fixture's teardown
removes exactly what this test made, whatever happened.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from condo import labels
from condo.config import Config
from condo.docker import ContainerSummary, DockerClient
from condo.errors import ContainerNotFound
from condo.run import Running, run_condo

WAIT_LIMIT = 60.0
REPO = Path(__file__).resolve().parents[2]

MAIN_ENGINE = "unix:///var/run/docker.sock"
ENGINES = {
    "docker-20.10": MAIN_ENGINE,
    "docker-26.1": "unix:///run/condo-engines/docker-trixie.sock",
    "docker-28.5-floor-1.44": "unix:///run/condo-engines/docker-sid.sock",
    "podman-4.3": "unix:///run/condo-engines/podman.sock",
}
"""Every engine the matrix runs on: the main one (scripts/test-env) and the side engines
(scripts/engines), by a name that says what each is."""


@attrs.define
class CondoUnderTest:
    """One condo's files and, while it runs, its handle."""

    specs: Path
    state_path: Path
    host: str
    docker: DockerClient
    docker_url: str = MAIN_ENGINE
    running: Running | None = None
    process: trio.Process | None = None

    def write(self, service: str, text: str, *, prefix: Path | None = None) -> Path:
        """Write a spec atomically (temp file + rename, as editors and config tools do)."""
        folder = prefix or self.specs
        path = folder / f"{service}.edn"
        temp = folder / f".{service}.edn.tmp"
        temp.write_text(text)
        temp.replace(path)
        return path

    def remove(self, service: str) -> None:
        (self.specs / f"{service}.edn").unlink()

    def config(self, *prefixes: Path) -> Config:
        return Config(
            prefixes=prefixes or (self.specs,),
            state_path=self.state_path,
            host=self.host,
            rescan_interval=0.5,
            docker_url=self.docker_url,
        )

    @property
    def store_view(self) -> dict[str, Any]:
        assert self.running is not None
        return self.running.store.view()

    def service(self, name: str) -> dict[str, Any] | None:
        services: dict[str, Any] = self.store_view["services"]
        return services.get(name)

    async def wait(
        self, predicate: Callable[[dict[str, Any]], bool], *, limit: float = WAIT_LIMIT
    ) -> dict[str, Any]:
        """Wait until the /v1/state view satisfies `predicate`; returns that view."""
        assert self.running is not None
        store = self.running.store
        with trio.fail_after(limit):
            while True:
                view = store.view()
                if predicate(view):
                    return view
                await store.wait_changed(store.version)

    async def wait_state(
        self, name: str, state: str, *, image: str | None = None, limit: float = WAIT_LIMIT
    ) -> dict[str, Any]:
        def ok(view: dict[str, Any]) -> bool:
            svc = view["services"].get(name)
            if svc is None or svc["state"] != state:
                return False
            return image is None or (svc["current"] or {}).get("image") == image

        view = await self.wait(ok, limit=limit)
        service: dict[str, Any] = view["services"][name]
        return service

    async def containers(self, service: str | None = None) -> list[ContainerSummary]:
        return await self.docker.list_containers(labels=labels.owned_by(self.host, service))

    async def running_ids(self, service: str) -> set[str]:
        return {c.id for c in await self.containers(service) if c.state == "running"}

    # --- condo as a real process (for kill -9 and signals) -----------------------------------

    async def spawn(
        self, nursery: trio.Nursery, *extra: str, server: str = "off", fd_limit: int | None = None
    ) -> trio.Process:
        """Run `condo run` as a child process (logs as JSON into the test's folder); `fd_limit`
        sets its RLIMIT_NOFILE, soft and hard (condo raises the soft one to the hard one)."""
        argv = [
            sys.executable, "-m", "condo", "run", str(self.specs),
            "--state", str(self.state_path), "--host", self.host, "--server", server,
            "--log-format", "json", "--docker", self.docker_url, *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        def limit_files() -> None:  # runs in the child, between fork and exec
            assert fd_limit is not None
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        options: dict[str, Any] = {} if fd_limit is None else {"preexec_fn": limit_files}

        # The child keeps its own copy of the log file's descriptor; ours closes at once.
        with (self.state_path.parent / f"condo-{self.host}.log").open("ab") as log:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    stdout=log,
                    stderr=log,
                    env=env,
                    check=False,
                    **options,
                )
            )
        self.process = process
        return process

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def state_file(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data


async def remove_host_containers(docker: DockerClient, host: str) -> None:
    for row in await docker.list_containers(labels=labels.owned_by(host)):
        # ContainerNotFound: condo (or the test) removed it meanwhile.
        with contextlib.suppress(ContainerNotFound):
            await docker.remove(row.id)


@contextlib.asynccontextmanager
async def condo_files(
    tmp_path: Path, docker: DockerClient, docker_url: str = MAIN_ENGINE
) -> AsyncIterator[CondoUnderTest]:
    """A condo's files on the engine at `docker_url` (`docker` is a client on that engine)."""
    specs = tmp_path / "specs"
    specs.mkdir()
    host = f"test-{uuid.uuid4().hex[:10]}"
    under_test = CondoUnderTest(
        specs=specs,
        state_path=tmp_path / "state.json",
        host=host,
        docker=docker,
        docker_url=docker_url,
    )
    try:
        yield under_test
    finally:
        with trio.move_on_after(60, shield=True):
            if under_test.process is not None and under_test.process.returncode is None:
                under_test.process.kill()
            await remove_host_containers(docker, host)


@contextlib.asynccontextmanager
async def running_condo(condo: CondoUnderTest, **config: Any) -> AsyncIterator[CondoUnderTest]:
    """condo in-process until the block ends (then shut down cleanly, state written)."""
    async with trio.open_nursery() as nursery:
        settings = attrs.evolve(condo.config(), **config)
        condo.running = await nursery.start(functools.partial(run_condo, settings))
        try:
            yield condo
        finally:
            condo.running.shutdown()


async def start_condo(
    nursery: trio.Nursery, under_test: CondoUnderTest, *prefixes: Path
) -> Running:
    running: Running = await nursery.start(
        functools.partial(run_condo, under_test.config(*prefixes))
    )
    under_test.running = running
    return running


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(port: int) -> str | None:
    """GET http://127.0.0.1:port/ → body, or None when nothing answers properly."""
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


async def published_port(container_id: str, engine_url: str = MAIN_ENGINE) -> int | None:
    """The 127.0.0.1 port published for the container's 80/tcp, from the engine itself."""
    transport = httpx.AsyncHTTPTransport(uds=engine_url.removeprefix("unix://"))
    async with httpx.AsyncClient(transport=transport, base_url="http://docker") as client:
        response = await client.get(f"/containers/{container_id}/json")
    if response.status_code != 200:
        return None
    ports = response.json()["NetworkSettings"]["Ports"] or {}
    bindings = ports.get("80/tcp") or []
    return int(bindings[0]["HostPort"]) if bindings else None

"""README, "Running with Podman": its `sh` block, run as written, serves a spec on Podman.

The block's two commands run verbatim (bash, nothing substituted): a Podman service on
/run/podman/podman.sock in the background, then `condo run /etc/condo` on that socket. This test
owns those two paths (nothing else on a test machine uses them: the side Podman of the engine
matrix is on /run/condo-engines/podman.sock) and removes them afterwards. Everything the block
leaves to the environment is made private, as a user's own configuration would be, so that the
machine's state, the side engines and other tests are not touched: Podman's storage, runroot and
temporary files under the test's folder (`CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`, with the
ulimits the README tells sandboxes to set), `localhost:5000` as a plain-HTTP registry
(`CONTAINERS_REGISTRIES_CONF`, as the README says), and condo's state file, API port and host name
(`CONDO_STATE`, `CONDO_SERVER`, `CONDO_HOST`). The spec's container has no network, so Podman's
shared network configuration is never used.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo import labels
from condo.docker import open_docker
from tests.integration.harness import free_port, remove_host_containers

pytestmark = pytest.mark.docker

README = Path(__file__).resolve().parents[2] / "README.md"
SOCKET = Path("/run/podman/podman.sock")
SPECS = Path("/etc/condo")
IMAGE = "localhost:5000/condo-test/busybox:1"


def podman_block() -> str:
    section = README.read_text().split("### Running with Podman\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None
    return block.group(1)


def private_podman(folder: Path) -> dict[str, str]:
    """Podman's configuration files, all of its state under `folder`: the environment."""
    for part in ("storage", "run", "tmp"):
        (folder / part).mkdir(parents=True)
    (folder / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        f'tmp_dir = "{folder / "tmp"}"\n'
    )
    (folder / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{folder / "storage"}"\n'
        f'runroot = "{folder / "run"}"\n'
    )
    (folder / "registries.conf").write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "localhost:5000"\n'
        "insecure = true\n"
    )
    return {
        "CONTAINERS_CONF": str(folder / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(folder / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(folder / "registries.conf"),
    }


async def web_state(port: int) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            view = (await client.get(f"http://127.0.0.1:{port}/v1/state")).json()
    except (httpx.HTTPError, ValueError):
        return None
    web: dict[str, Any] | None = view.get("services", {}).get("web")
    return web


async def stop_group(process: trio.Process) -> None:
    """SIGTERM to the block's process group (bash, Podman, condo); wait until all are gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    await process.wait()
    with trio.fail_after(30):
        while True:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            await trio.sleep(0.1)


def unmount_under(folder: Path) -> None:
    """Podman leaves its storage's overlay mount behind when its service ends."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{folder}/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


async def test_the_readme_podman_example_serves_a_spec(tmp_path: Path) -> None:
    assert not SOCKET.exists() and not SPECS.exists(), "another run owns the README's paths"
    created_run_dir = not SOCKET.parent.exists()
    port, host = free_port(), f"test-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        **private_podman(tmp_path / "podman"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the `condo` command
        "CONDO_STATE": str(tmp_path / "condo-state.json"),
        "CONDO_SERVER": f"127.0.0.1:{port}",
        "CONDO_HOST": host,
        "CONDO_LOG_FORMAT": "json",
    }
    SOCKET.parent.mkdir(parents=True, exist_ok=True)
    SPECS.mkdir()
    (SPECS / "web.edn").write_text(
        f'{{:spec {{:Image "{IMAGE}" :HostConfig {{:NetworkMode "none"}}}} :stop-timeout 1}}'
    )
    process: trio.Process | None = None
    try:
        with (tmp_path / "example.log").open("wb") as log:
            process = await trio.lowlevel.open_process(
                ["bash", "-euo", "pipefail", "-c", podman_block()],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group: the background Podman ends with it
            )
        with trio.fail_after(60):
            while (web := await web_state(port)) is None or web["state"] != "Stable":
                assert process.poll() is None, (tmp_path / "example.log").read_text()[-3000:]
                await trio.sleep(0.2)
        async with open_docker(f"unix://{SOCKET}") as podman:
            [row] = await podman.list_containers(labels=labels.owned_by(host, "web"))
            assert podman.is_podman  # known once it answered
            assert row.id == web["current"]["id"] and row.state == "running"
            assert web["current"]["image"] == IMAGE
            await remove_host_containers(podman, host)
    finally:
        with trio.move_on_after(60, shield=True):
            if process is not None:
                await stop_group(process)
            unmount_under(tmp_path / "podman")
            shutil.rmtree(SPECS, ignore_errors=True)
            SOCKET.unlink(missing_ok=True)
            if created_run_dir:
                with contextlib.suppress(OSError):
                    SOCKET.parent.rmdir()

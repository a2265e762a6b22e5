"""README, "Two commands": `scripts/run-example` runs condo on examples/, exactly as written.

It owns what the script owns: ports 4280 and 4288 (examples/site.edn's proxy), the host name
`condo-example`, `condo-state.json` in the repository (and the proxy's files beside it), and the
fixed container name `condo-example-named`. Cleanup removes them, whatever happened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo import labels
from condo.docker import ContainerId, DockerClient
from condo.errors import ContainerNotFound
from condo.proxy.haproxy import HAProxy
from condo.proxy.nat import table_name
from condo.proxy.reconcile import proxy_directory
from tests.integration.harness import remove_host_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HOST = "condo-example"
STATE = REPO / "condo-state.json"


async def cleanup(docker: DockerClient) -> None:
    with trio.move_on_after(60, shield=True):
        await remove_host_containers(docker, HOST)
        with contextlib.suppress(ContainerNotFound):
            await docker.remove(ContainerId("condo-example-named"))
        STATE.unlink(missing_ok=True)
        proxy = proxy_directory(STATE)
        pid = HAProxy(proxy).master_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(proxy, ignore_errors=True)
        # condo never deletes its NAT table (site.edn's :tcp listener is on it as root).
        await trio.run_process(
            ["nft", "delete", "table", "ip", table_name(HOST)], check=False, capture_stderr=True
        )


async def state() -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            answer: dict[str, Any] = (await client.get("http://127.0.0.1:4280/v1/state")).json()
            return answer
    except (httpx.HTTPError, ValueError):
        return None


async def test_run_example_runs_condo_on_the_examples(docker: DockerClient) -> None:
    await cleanup(docker)
    try:
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        ["scripts/run-example"],
                        cwd=REPO,
                        check=False,
                        capture_stdout=True,
                        capture_stderr=True,
                    )
                )
                wanted = {"named", "site", "web", "worker"}
                while True:
                    view = await state() or {}
                    services = view.get("services", {})
                    if set(services) == wanted and all(
                        s["state"] == "Stable" for s in services.values()
                    ):
                        break
                    await trio.sleep(0.3)
                rows = await docker.list_containers(labels=labels.owned_by(HOST))
                assert sorted(r.labels[labels.SERVICE] for r in rows) == sorted(wanted)
                # site.edn's fixed port answers through the proxy.
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
                            answer = await client.get("http://127.0.0.1:4288/")
                        if answer.text.strip() == "condo-test http":
                            break
                    await trio.sleep(0.2)
                # Ctrl-C stops condo and leaves the containers running (README).
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
        rows = await docker.list_containers(labels=labels.owned_by(HOST))
        assert len([r for r in rows if r.state == "running"]) == len(wanted)
    finally:
        await cleanup(docker)

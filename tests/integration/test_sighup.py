"""SIGHUP re-reads the registry credentials; a broken Docker config keeps the old ones (item 8).

A real `condo run` process, and an image of this test's own pushed to the htpasswd-protected
registry on 127.0.0.1:5001 (so that no other test's pulls or removals interfere), removed from the
engine before condo has to pull it.
"""

from __future__ import annotations

import base64
import json
import signal
import uuid
from pathlib import Path

import pytest
import trio

from condo.docker import DockerClient
from tests.integration.conftest import DockerCli
from tests.integration.harness import condo_files

pytestmark = pytest.mark.docker

REGISTRY = "localhost:5001"
USER, PASSWORD = "condo", "condo-test-secret"  # scripts/test-env's registry user


async def test_sighup_with_a_broken_docker_config_keeps_the_old_credentials(
    tmp_path: Path, docker: DockerClient, docker_cli: DockerCli, nursery: trio.Nursery
) -> None:
    image = f"{REGISTRY}/condo-test/sighup-{uuid.uuid4().hex[:10]}:1"
    login = tmp_path / "login"
    login.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (login / "config.json").write_text(json.dumps({"auths": {REGISTRY: {"auth": auth}}}))
    config = login / "config.json"
    with trio.fail_after(90):
        await docker_cli("tag", "condo-test/busybox:1", image)
        try:
            await docker_cli("push", "-q", image, env={"DOCKER_CONFIG": str(login)})
        finally:
            await docker_cli("rmi", "--no-prune", image)  # condo must pull it
        async with condo_files(tmp_path, docker) as condo:
            process = await condo.spawn(nursery, "--docker-config", str(config))
            log_path = condo.state_path.parent / f"condo-{condo.host}.log"
            try:
                # Signals are handled once condo runs (before that SIGHUP's default would kill).
                while "condo.started" not in log_path.read_text():
                    await trio.sleep(0.1)
                config.write_text('{"auths": {')  # half-written: not JSON
                process.send_signal(signal.SIGHUP)
                await trio.sleep(1.0)  # the reload is immediate; give a crash time to show
                assert process.returncode is None, "condo died on SIGHUP"
                condo.write("private", f'{{:spec {{:Image "{image}" :Cmd ["sleep" "3600"]}}}}')
                while True:
                    record = (
                        condo.state_file()["services"].get("private")
                        if (condo.state_path.exists())
                        else None
                    )
                    if record is not None and record["phase"] == "Stable":
                        break
                    assert process.returncode is None, "condo died"
                    await trio.sleep(0.2)
                log = log_path.read_text()
                assert "condo.auth_reload_failed" in log
                assert PASSWORD not in log and auth not in log
            finally:
                process.send_signal(signal.SIGTERM)
                await process.wait()
                await trio.run_process(["docker", "rmi", "-f", image], check=False,
                                       capture_stdout=True, capture_stderr=True)  # fmt: skip

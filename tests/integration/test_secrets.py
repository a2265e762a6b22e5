"""Secrets never leak: registry credentials, the Consul token and the API token appear in no log
line, API answer, feed message, Consul value or state file; a spec's Env values are never shown
by the API, the feed or Consul (they stay in the 0600 state file, which needs them to compare)."""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from condo.docker import DockerClient
from condo.history import history_path
from tests.integration.harness import condo_files, free_port

pytestmark = [pytest.mark.docker, pytest.mark.consul]

REGISTRY_PASSWORD = "condo-test-secret"
CONSUL_TOKEN = "consul-token-" + uuid.uuid4().hex
API_TOKEN = "api-token-" + uuid.uuid4().hex
ENV_SECRET = "env-secret-" + uuid.uuid4().hex
PRIVATE = "localhost:5001/condo-test/private:1"


async def test_no_secret_in_logs_api_feed_consul_or_state(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    await trio.run_process(["docker", "rmi", "-f", PRIVATE], capture_stdout=True, check=False)
    auth = base64.b64encode(f"condo:{REGISTRY_PASSWORD}".encode()).decode()
    config = tmp_path / "docker-config.json"
    config.write_text(json.dumps({"auths": {"localhost:5001": {"auth": auth}}}))
    prefix = f"condo-test/{uuid.uuid4().hex[:10]}"
    port = free_port()
    secrets = [REGISTRY_PASSWORD, auth, CONSUL_TOKEN, API_TOKEN]
    try:
        async with condo_files(tmp_path, docker) as condo:
            condo.write(
                "private",
                f'{{:spec {{:Image "{PRIVATE}" :Cmd ["sleep" "3600"] :Env ["KEY={ENV_SECRET}"]}}}}',
            )
            await condo.spawn(
                nursery,
                "--docker-config", str(config),
                "--expose", "consul", "--consul-prefix", prefix, "--consul-token", CONSUL_TOKEN,
                "--api-token", API_TOKEN,
                server=f"127.0.0.1:{port}",
            )  # fmt: skip
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5) as api:
                with trio.fail_after(60):
                    while True:
                        try:
                            state = (await api.get("/v1/state")).json()
                        except httpx.HTTPError:
                            state = {}
                        svc = (state.get("services") or {}).get("private") or {}
                        if svc.get("state") == "Stable":
                            break
                        await trio.sleep(0.2)
                answers = [
                    (await api.get(path)).text
                    for path in (
                        "/v1/state",
                        "/v1/global_state",
                        "/v1/history",
                        "/metrics",
                        "/healthz",
                    )
                ]
                bad_token = await api.get("/v1/state", headers={"Authorization": "Bearer nope"})
                answers.append(bad_token.text)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/v1/feed?token={API_TOKEN}") as ws:
                answers.append(str(await ws.get_message()))
            async with httpx.AsyncClient(timeout=5) as consul:
                kv = await consul.get(
                    f"http://127.0.0.1:8500/v1/kv/{prefix}", params={"recurse": 1}
                )
            values = [base64.b64decode(e["Value"]).decode() for e in kv.json() if e["Value"]]
            assert values, "nothing was published to Consul"
            condo.kill9()
            assert condo.process is not None
            await condo.process.wait()
            logs = "".join(p.read_text() for p in tmp_path.glob("condo-*.log"))
            state_file = condo.state_path.read_text()
            assert stat.S_IMODE(os.stat(condo.state_path).st_mode) == 0o600
            history_file = history_path(condo.state_path).read_text()
            assert stat.S_IMODE(os.stat(history_path(condo.state_path)).st_mode) == 0o600

        for secret in secrets:
            for where, text in [
                ("log", logs),
                ("state file", state_file),
                ("history file", history_file),
            ] + [(f"answer {n}", a) for n, a in enumerate(answers + values)]:
                assert secret not in text, f"a secret appears in the {where}"
        for n, text in enumerate([*answers, *values, history_file]):
            assert ENV_SECRET not in text, f"a spec's Env value appears in answer {n}"
        assert "private" in logs  # the log is really there and speaks of the service
    finally:
        with trio.move_on_after(10, shield=True):
            async with httpx.AsyncClient() as consul:
                await consul.delete(f"http://127.0.0.1:8500/v1/kv/{prefix}", params={"recurse": 1})

"""`condo plan`, the real command, against a real condo on the real engine: one of each kind of
change is printed as such, the exit codes are terraform's, and planning changes nothing (no
engine event for the host's label, no mutating Docker call in condo's /metrics). Applying the
same files then does what the plan said, after which the plan is empty."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from condo import labels
from condo.config import Bind
from condo.docker import DockerClient
from condo.run import run_condo
from condo.web import ApiServer
from tests.integration.harness import MAIN_ENGINE, CondoUnderTest, condo_files, free_port

CAP = 60
TOKEN = "plan-token"
SLEEPER = (
    '{{:spec {{:Image "{image}" :Cmd ["sleep" "3600"] :StopSignal "SIGKILL"{extra}}}{options}}}'
)


def sleeper(image: str = "condo-test/busybox:1", extra: str = "", options: str = "") -> str:
    return SLEEPER.format(image=image, extra=extra, options=options)


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def condo_cli(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "condo", *args], capture_stdout=True, capture_stderr=True,
        check=False, env={k: v for k, v in os.environ.items() if not k.startswith("CONDO_")},
    )  # fmt: skip
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def host_events(host: str, since: float, until: float) -> list[dict[str, Any]]:
    """Every engine event about a container of `host` between the two wall times."""
    transport = httpx.AsyncHTTPTransport(uds=MAIN_ENGINE.removeprefix("unix://"))
    async with httpx.AsyncClient(transport=transport, base_url="http://docker") as client:
        response = await client.get(
            "/events",
            params={
                "since": f"{since:.3f}",
                "until": f"{until:.3f}",
                "filters": json.dumps({"label": [f"{labels.HOST}={host}"]}),
            },
        )
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


async def mutating_calls(url: str) -> dict[tuple[str, str], float]:
    """condo's finished Docker calls that change something, by (method, endpoint)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, trust_env=False, headers=auth) as client:
        text = (await client.get("/metrics")).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "condo_docker_call_duration_seconds_count":
                continue
            if sample.labels["method"] in ("POST", "PUT", "DELETE"):
                key = (sample.labels["method"], sample.labels["endpoint"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


@pytest.mark.docker
async def test_plan_shows_each_kind_of_change_and_changes_nothing(
    condo: CondoUnderTest, nursery: trio.Nursery, tmp_path: Path
) -> None:
    for name in ("web", "api", "same", "old"):
        condo.write(name, sleeper())
    web = await ApiServer.listen(Bind(host="127.0.0.1", port=0))
    config = attrs.evolve(condo.config(), server=Bind(host="127.0.0.1", port=0), api_token=TOKEN)
    with trio.fail_after(CAP):
        condo.running = await nursery.start(functools.partial(run_condo, config, web=web))
        for name in ("web", "api", "same", "old"):
            await condo.wait_state(name, "Stable")
        api_before = await condo.running_ids("api")
        web_before = await condo.running_ids("web")

        planned = tmp_path / "planned"
        planned.mkdir()
        condo.write("same", sleeper(), prefix=planned)
        condo.write("web", sleeper("condo-test/busybox:2", ' :Env ["A=1"]'), prefix=planned)
        condo.write("api", sleeper(options=" :deploy [:After 1] :stop-timeout 3"), prefix=planned)
        condo.write("new", sleeper(), prefix=planned)
        condo.write(
            "bad", '{:spec {:Image "condo-test/busybox:1"}\n :deplyo [:Before]}', prefix=planned
        )
        (planned / "notes.edn~").write_text("an editor's backup: not a spec")

        plan = ("plan", str(planned), "--url", web.url, "--api-token", TOKEN)
        before = await mutating_calls(web.url)
        assert before[("POST", "/containers/{id}/start")] >= 4  # the counts are real
        since = time.time()
        code, out, err = await condo_cli(*plan)
        code_all, out_all, _ = await condo_cli(*plan, "--all")
        code_401, out_401, err_401 = await condo_cli("plan", str(planned), "--url", web.url)
        await trio.sleep(0.5)  # any event the plan caused has reached the engine's log
        until = time.time()
        assert await host_events(condo.host, since, until) == []
        assert await mutating_calls(web.url) == before
        # The same query does see this host's events (it is not blind): the deploys above.
        assert any(e["Action"] == "start" for e in await host_events(condo.host, 0, until))

        assert code == 1, err  # an invalid file: 1, even with changes
        lines = out.splitlines()
        assert lines[2].startswith(f"! bad: invalid: {planned / 'bad.edn'}:2: unknown key :deplyo")
        assert lines[1:2] + lines[3:] == [
            "= api: update in place: :deploy [:Before] → [:After 1]; :stop-timeout 10 → 3",
            "+ new: create (condo-test/busybox:1)",
            "- old: remove (condo-test/busybox:1)",
            "~ web: redeploy: :Env :Image; image condo-test/busybox:1 → condo-test/busybox:2",
            "Plan: 1 to create, 1 to redeploy, 1 to update in place, 1 to remove, 1 invalid,"
            " 1 unchanged.",
        ]
        assert condo.host in out.splitlines()[0]
        assert code_all == 1 and "  same: unchanged (condo-test/busybox:1)" in out_all
        assert (code_401, out_401) == (1, "") and "HTTP 401" in err_401

        # Without the invalid file: 2, changes. Applied by condo, they are what the plan said.
        (planned / "bad.edn").unlink()
        code, out, err = await condo_cli(*plan)
        assert code == 2, err
        for path in planned.glob("*.edn"):
            shutil.copy(path, condo.specs / path.name)
        condo.remove("old")
        await condo.wait_state("web", "Stable", image="condo-test/busybox:2")
        await condo.wait_state("new", "Stable")
        await condo.wait(lambda v: "old" not in v["services"])
        await condo.wait(lambda v: v["services"]["api"]["deploy"] == ["After", 1.0])
        assert await condo.running_ids("api") == api_before  # updated in place
        assert await condo.running_ids("web") != web_before  # redeployed
        code, out, err = await condo_cli(*plan)
        assert (code, out.splitlines()[1:]) == (0, ["Plan: 4 unchanged."]), err


async def test_errors_and_usage_errors_exit_1_never_2_which_means_changes(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(CAP):
        code, out, err = await condo_cli("plan", str(tmp_path), "--url", url)
        assert (code, out) == (1, "")
        assert "cannot reach condo" in err
        for usage in ([], [str(tmp_path), "--bogus"], [str(tmp_path), "--all=maybe"]):
            code, out, err = await condo_cli("plan", *usage)
            assert (code, out) == (1, ""), err
            assert "Error" in err

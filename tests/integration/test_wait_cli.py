"""`condo wait` and `condo state`, the real commands, against real `condo run` processes: three
hosts on one engine and one Consul agent, and one host without Consul."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from condo.docker import DockerClient
from tests.integration.harness import CondoUnderTest, free_port
from tests.integration.several import condos

pytestmark = [pytest.mark.docker, pytest.mark.consul]

# Healthy `delay` seconds after start, so that hosts turn Stable one after the other.
SPEC = """{{:spec {{:Image "{image}"
         :Cmd ["sh" "-c" "trap 'exit 0' TERM; sleep {delay}; echo ok > /ok; sleep 3600 & wait"]
         :Healthcheck {{:Test ["CMD-SHELL" "cat /ok"] :Interval 100000000 :Retries 1000}}}}
  :deploy [:After 0] :health-timeout 60}}"""


class Host:
    def __init__(self, files: CondoUnderTest) -> None:
        self.files = files
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(self.url + path)).json()

    async def until(self, predicate: Any, limit: float = 60) -> Any:
        with trio.fail_after(limit):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    body = await self.get("/v1/state")
                    if predicate(body):
                        return body
                await trio.sleep(0.1)


@contextlib.asynccontextmanager
async def hosts(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery, count: int, *extra: str
) -> AsyncIterator[list[Host]]:
    async with condos(tmp_path, docker, count) as every:
        made = []
        for files in every:
            host = Host(files)
            await files.spawn(nursery, *extra, server=f"127.0.0.1:{host.port}")
            made.append(host)
        for host in made:
            await host.until(lambda body: True)  # the API answers
        yield made


async def condo_cli(*args: str) -> tuple[int, str, str, float]:
    """Run the `condo` command; exit code, stdout, stderr, and the wall time it ended."""
    result = await trio.run_process(
        [sys.executable, "-m", "condo", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode(), time.time()


def stable_on(body: Any, image: str) -> bool:
    svc = body["services"].get("web") or {}
    return svc.get("state") == "Stable" and (svc.get("current") or {}).get("image") == image


async def test_condo_wait_returns_when_the_last_of_three_hosts_is_stable(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    prefix = f"condo-test/{uuid.uuid4().hex[:10]}"
    extra = ("--expose", "consul", "--consul-prefix", prefix)
    try:
        async with hosts(tmp_path, docker, nursery, 3, *extra) as three:
            for host in three:
                host.files.write("web", SPEC.format(image="condo-test/busybox:1", delay=0))
            for host in three:
                await host.until(lambda b: stable_on(b, "condo-test/busybox:1"))
            with trio.fail_after(15):
                while len((await three[0].get("/v1/global_state"))["hosts"]) < 3:
                    await trio.sleep(0.1)
            code, table, _, _ = await condo_cli("state", "--url", three[0].url)
            assert code == 0
            assert all(h.files.host in table for h in three)
            assert table.splitlines()[0].split()[:3] == ["SERVICE", "HOST", "STATE"]

            # The update reaches the hosts at different speeds; the last is Stable after ~4 s.
            for host, delay in zip(three, (0, 1, 4), strict=True):
                host.files.write("web", SPEC.format(image="condo-test/busybox:2", delay=delay))
            code, out, err, ended = await condo_cli(
                "wait", "--name", "web", "--image", "condo-test/busybox:2", "--timeout", "60",
                "--url", three[0].url,
            )  # fmt: skip
            assert code == 0, err
            assert "Stable on condo-test/busybox:2 on 3 host(s)" in out
            last = await three[2].get("/v1/state")
            assert stable_on(last, "condo-test/busybox:2")
            stable_at = last["services"]["web"]["current"]["stable_at"]
            lag = ended - stable_at
            print(f"condo wait ended {lag * 1000:.0f} ms after the last host turned Stable")
            # ~40-80 ms here: the wait_for answer plus the start-up and exit of the CLI process.
            assert 0 < lag < 1.0

            code, _, err, _ = await condo_cli(
                "wait", "--name", "web", "--image", "condo-test/busybox:9", "--timeout", "2",
                "--url", three[1].url,
            )  # fmt: skip
            assert code == 1
            assert "timed out" in err
            assert all(h.files.host in err for h in three)
    finally:
        with trio.move_on_after(10, shield=True):
            async with httpx.AsyncClient() as consul:
                await consul.delete(f"http://127.0.0.1:8500/v1/kv/{prefix}", params={"recurse": 1})


async def test_condo_wait_without_consul_and_its_errors(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    async with hosts(tmp_path, docker, nursery, 1) as (one,):
        one.files.write("web", SPEC.format(image="condo-test/busybox:1", delay=1))
        code, out, err, _ = await condo_cli(
            "wait", "--name", "web", "--image", "condo-test/busybox:1", "--timeout", "30",
            "--url", one.url,
        )  # fmt: skip
        assert code == 0, err
        assert one.files.host in out
        assert stable_on(await one.get("/v1/state"), "condo-test/busybox:1")
        code, _, err, _ = await condo_cli(
            "wait", "--name", "nope", "--image", "x:1", "--timeout", "1", "--url", one.url
        )
        assert code == 1
        assert "no host runs nope" in err
    code, _, err, _ = await condo_cli(
        "wait", "--name", "web", "--image", "x:1", "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 2
    assert "cannot reach condo" in err
    code, _, _, _ = await condo_cli("wait", "--image", "x:1")  # --name is required
    assert code == 2

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


async def test_condo_wait_never_counts_a_killed_host_as_done(
    tmp_path: Path, docker: DockerClient, nursery: trio.Nursery
) -> None:
    """The false success of a dead condo: h2 is killed (-9) while it runs busybox:1; h1 turns
    Stable on busybox:2. `condo wait` through h1 names h2 (its old image, then `unreachable`
    once Consul expired its session), never exit 0, until h2 comes back and deploys busybox:2;
    `condo forget` is refused while h2 is live, and once it is gone for good the wait counts h1
    alone."""
    prefix = f"condo-test/{uuid.uuid4().hex[:10]}"
    extra = ("--expose", "consul", "--consul-prefix", prefix)

    async def wait_for(image: str, url: str, seconds: str = "2") -> tuple[int, str, str]:
        code, out, err, _ = await condo_cli(
            "wait", "--name", "web", "--image", image, "--timeout", seconds, "--url", url
        )
        return code, out, err

    async def live(host: Host, name: str) -> bool:
        return bool((await host.get("/v1/global_state"))["hosts"].get(name, {}).get("live"))

    try:
        async with hosts(tmp_path, docker, nursery, 2, *extra) as (h1, h2):
            two = h2.files.host
            for host in (h1, h2):
                host.files.write("web", SPEC.format(image="condo-test/busybox:1", delay=0))
            code, _, err = await wait_for("condo-test/busybox:1", h1.url, seconds="60")
            assert code == 0, err
            h2.files.kill9()
            killed_at = time.time()
            for host in (h1, h2):
                host.files.write("web", SPEC.format(image="condo-test/busybox:2", delay=0))
            await h1.until(lambda b: stable_on(b, "condo-test/busybox:2"))
            code, _, err = await wait_for("condo-test/busybox:2", h1.url)
            assert code == 1 and two in err, err
            # Consul expires the dead condo's session (TTL 10 s: within ~20-30 s).
            with trio.fail_after(45):
                while await live(h1, two):
                    await trio.sleep(0.2)
            print(f"{two} unreachable {time.time() - killed_at:.1f} s after kill -9")
            code, _, err = await wait_for("condo-test/busybox:2", h1.url)
            assert code == 1 and f"{two}=unreachable since" in err, err
            code, table, _, _ = await condo_cli("hosts", "--url", h1.url)
            assert code == 0
            rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
            assert rows[h1.files.host][1] == "yes" and rows[two][1] == "no", table

            # h2 comes back (its spec was updated meanwhile): done on both.
            await h2.files.spawn(nursery, *extra, server=f"127.0.0.1:{h2.port}")
            code, out, err = await wait_for("condo-test/busybox:2", h1.url, seconds="60")
            assert code == 0, err
            assert "on 2 host(s)" in out
            code, _, err, _ = await condo_cli("forget", two, "--url", h1.url)
            assert code == 2 and "live" in err, err

            # Decommissioned: killed for good, then forgotten; the wait counts h1 alone.
            h2.files.kill9()
            with trio.fail_after(45):
                while await live(h1, two):
                    await trio.sleep(0.2)
            code, out, err, _ = await condo_cli("forget", two, "--url", h1.url)
            assert code == 0, err
            code, out, err = await wait_for("condo-test/busybox:2", h1.url)
            assert code == 0 and "on 1 host(s)" in out, err
    finally:
        with trio.move_on_after(10, shield=True):
            async with httpx.AsyncClient() as consul:
                await consul.delete(f"http://127.0.0.1:8500/v1/kv/{prefix}", params={"recurse": 1})

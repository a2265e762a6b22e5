"""condo run, in process, against the real engine: watching, deploys, health, cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from condo import labels
from condo.docker import DockerClient
from tests.integration.harness import (
    CondoUnderTest,
    condo_files,
    http_get,
    published_port,
    start_condo,
)

pytestmark = pytest.mark.docker

HTTP_SPEC = """{{:spec {{:Image "condo-test/http:{tag}"
         :Cmd ["sh" "-c" "echo {body} > /www/index.html; exec httpd -f -p 80 -h /www"]
         :HostConfig {{:PortBindings {{"80/tcp" [{{:HostIp "127.0.0.1" :HostPort ""}}]}}}}}}
  :deploy {deploy}}}"""


@pytest.fixture
async def condo(tmp_path: Path, docker: DockerClient) -> AsyncIterator[CondoUnderTest]:
    async with condo_files(tmp_path, docker) as under_test:
        yield under_test


async def test_add_change_remove(condo: CondoUnderTest, nursery: trio.Nursery) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/healthy:1"}}')
    first = await condo.wait_state("web", "Stable", image="condo-test/healthy:1")
    assert first["current"]["stable_at"] is not None
    rows = await condo.containers("web")
    assert [r.id for r in rows] == [first["current"]["id"]]
    assert rows[0].labels[labels.SERVICE] == "web"
    assert rows[0].labels[labels.HOST] == condo.host
    assert rows[0].name.startswith("web_")

    condo.write("web", '{:spec {:Image "condo-test/healthy:2"}}')  # [:Before] by default
    second = await condo.wait_state("web", "Stable", image="condo-test/healthy:2")
    assert second["current"]["id"] != first["current"]["id"]
    assert {r.id for r in await condo.containers("web")} == {second["current"]["id"]}

    condo.remove("web")
    await condo.wait(lambda view: "web" not in view["services"])
    assert await condo.containers("web") == []


async def test_changes_that_do_not_touch_the_container_do_not_redeploy(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/busybox:1" :Env ["A=1"]}}')
    before = await condo.wait_state("web", "Stable")
    condo.write(
        "web",
        ";; a comment, another order, other options\n"
        '{:stop-timeout 3 :deploy [:After 2]\n :spec {:Env ["A=1"] :Image "condo-test/busybox:1"}}',
    )
    await condo.wait(lambda v: v["services"]["web"]["deploy"] == ["After", 2.0])
    after = condo.service("web")
    assert after is not None
    assert after["current"]["id"] == before["current"]["id"]
    assert after["state"] == "Stable"


async def test_a_broken_edit_leaves_the_container_alone(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
    stable = await condo.wait_state("web", "Stable")
    condo.write("web", '{:spec {:Image "condo-test/busybox:2"}')  # unclosed: a half write
    broken = await condo.wait(lambda v: v["services"]["web"]["spec_error"] is not None)
    error = broken["services"]["web"]["spec_error"]
    assert error["file"].endswith("web.edn")
    assert error["line"] == 1
    assert broken["services"]["web"]["current"]["id"] == stable["current"]["id"]
    assert await condo.running_ids("web") == {stable["current"]["id"]}

    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')  # fixed, unchanged
    fixed = await condo.wait(lambda v: v["services"]["web"]["spec_error"] is None)
    assert fixed["services"]["web"]["current"]["id"] == stable["current"]["id"]


async def test_unhealthy_fails_fast_and_never_leaks(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    previous_failed: dict[str, Any] | None = None
    # A new spec retries at once: ten different failing specs make ten attempts.
    for attempt in range(10):
        condo.write(
            "bad",
            f'{{:spec {{:Image "condo-test/unhealthy:1" :Env ["TRY={attempt}"]}}'
            " :health-timeout 30}",
        )

        def failed_again(view: dict[str, Any], before: object = previous_failed) -> bool:
            svc = view["services"].get("bad") or {}
            failed = svc.get("failed")
            return svc.get("state") == "TryAgain" and failed is not None and failed != before

        with trio.fail_after(20):  # unhealthy after ~1 s, far before the 30 s health timeout
            view = await condo.wait(failed_again)
        svc = view["services"]["bad"]
        assert "unhealthy" in svc["error"]["message"]
        previous_failed = svc["failed"]
        # The previous failed candidate is removed right after the state changed.
        with trio.fail_after(10):
            while len(await condo.containers("bad")) > 1:
                await trio.sleep(0.1)
    assert previous_failed is not None
    with trio.fail_after(10):  # it is being stopped right after the state changed
        while (rows := await condo.containers("bad"))[0].state == "running":
            await trio.sleep(0.1)
    assert [r.id for r in rows] == [previous_failed["id"]]


async def test_after_deploy_has_zero_downtime(condo: CondoUnderTest, nursery: trio.Nursery) -> None:
    await start_condo(nursery, condo)
    condo.write("web", HTTP_SPEC.format(tag="1", body="one", deploy="[:After 1]"))
    first = await condo.wait_state("web", "Stable")
    port = await published_port(first["current"]["id"])
    assert port is not None
    assert (await http_get(port) or "").strip() == "one"

    failures: list[str] = []
    answers: set[str] = set()
    done = trio.Event()

    async def probe() -> None:
        # Every 20 ms, some running container of the service must answer.
        while not done.is_set():
            bodies = []
            for cid in await condo.running_ids("web"):
                p = await published_port(cid)
                body = None if p is None else await http_get(p)
                if body is not None:
                    bodies.append(body.strip())
            if not bodies:
                failures.append(f"nothing answered at {trio.current_time():.2f}")
            answers.update(bodies)
            await trio.sleep(0.02)

    nursery.start_soon(probe)
    condo.write("web", HTTP_SPEC.format(tag="2", body="two", deploy="[:After 1]"))
    second = await condo.wait_state("web", "Stable", image="condo-test/http:2")
    with trio.fail_after(20):
        while len(await condo.running_ids("web")) != 1:
            await trio.sleep(0.1)
    done.set()
    assert failures == []
    assert answers == {"one", "two"}
    assert await condo.running_ids("web") == {second["current"]["id"]}


async def test_fixed_name_with_after_keeps_the_running_container_until_replaced(
    condo: CondoUnderTest, nursery: trio.Nursery, docker: DockerClient
) -> None:
    await start_condo(nursery, condo)
    name = f"{condo.host}-fixed"
    spec = '{{:spec {{:Name "{name}" :Image "condo-test/healthy:{tag}"}} :deploy [:After 0]}}'
    condo.write("web", spec.format(name=name, tag=1))
    first = await condo.wait_state("web", "Stable")
    assert first["current"]["name"] == name
    condo.write("web", spec.format(name=name, tag=2))
    await condo.wait(lambda v: v["services"]["web"]["state"] == "WaitNext")
    # The stable one keeps its name and keeps running while the new one starts beside it.
    assert (await docker.inspect(name)).id == first["current"]["id"]
    second = await condo.wait_state("web", "Stable", image="condo-test/healthy:2")
    with trio.fail_after(20):
        while (await docker.inspect(second["current"]["id"])).name != name:
            await trio.sleep(0.1)
    assert condo.service("web")["current"]["name"] == name  # type: ignore[index]
    assert [r.id for r in await condo.containers("web")] == [second["current"]["id"]]


async def test_a_stable_container_removed_by_hand_is_redeployed(
    condo: CondoUnderTest, nursery: trio.Nursery, docker: DockerClient
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/busybox:1"}}')
    first = await condo.wait_state("web", "Stable")
    await docker.remove(first["current"]["id"])
    second = await condo.wait(
        lambda v: (
            v["services"]["web"]["state"] == "Stable"
            and v["services"]["web"]["current"]["id"] != first["current"]["id"]
        )
    )
    assert await condo.running_ids("web") == {second["services"]["web"]["current"]["id"]}


async def test_a_crashing_container_is_redeployed(
    condo: CondoUnderTest, nursery: trio.Nursery, docker: DockerClient
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/healthy:1"}}')
    first = await condo.wait_state("web", "Stable")
    await docker.stop(first["current"]["id"], grace=0)
    second = await condo.wait(
        lambda v: (
            v["services"]["web"]["state"] == "Stable"
            and v["services"]["web"]["current"]["id"] != first["current"]["id"]
        )
    )
    ids = {r.id for r in await condo.containers("web")}
    assert ids == {second["services"]["web"]["current"]["id"]}


async def test_pull_missing_image_from_the_local_registry(
    condo: CondoUnderTest, nursery: trio.Nursery, docker_cli: object
) -> None:
    image = "localhost:5000/condo-test/busybox:1"
    await trio.run_process(["docker", "rmi", "-f", image], capture_stdout=True, check=False)
    await start_condo(nursery, condo)
    condo.write("web", f'{{:spec {{:Image "{image}" :Cmd ["sleep" "3600"]}}}}')
    svc = await condo.wait_state("web", "Stable", image=image)
    assert svc["error"] is None


async def test_a_missing_tag_is_an_error_and_the_old_one_keeps_serving(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    condo.write("web", '{:spec {:Image "condo-test/healthy:1"}}')
    first = await condo.wait_state("web", "Stable")
    condo.write("web", '{:spec {:Image "localhost:5000/condo-test/healthy:oops"}}')
    svc = await condo.wait_state("web", "TryAgainNext")
    assert "not found" in svc["error"]["message"] or "manifest unknown" in svc["error"]["message"]
    assert svc["current"]["id"] == first["current"]["id"]
    assert svc["retry_at"] is not None
    assert await condo.running_ids("web") == {first["current"]["id"]}


async def test_two_prefixes_work_together_and_stay_stable(
    condo: CondoUnderTest, nursery: trio.Nursery, tmp_path: Path
) -> None:
    other = tmp_path / "more-specs"
    other.mkdir()
    await start_condo(nursery, condo, condo.specs, other)
    condo.write("one", '{:spec {:Image "condo-test/busybox:1"}}')
    condo.write("two", '{:spec {:Image "condo-test/busybox:1"}}', prefix=other)
    await condo.wait_state("one", "Stable")
    await condo.wait_state("two", "Stable")
    ids = {r.id for r in await condo.containers()}
    assert len(ids) == 2
    await trio.sleep(30)  # the original restarted both forever; nothing may move here
    assert {r.id for r in await condo.containers()} == ids
    view = condo.store_view["services"]
    assert view["one"]["state"] == view["two"]["state"] == "Stable"


async def test_restart_adopts_without_duplicates_and_removes_orphans(
    condo: CondoUnderTest, tmp_path: Path
) -> None:
    condo.write("keep", '{:spec {:Image "condo-test/busybox:1"}}')
    condo.write("gone", '{:spec {:Image "condo-test/busybox:1"}}')
    async with trio.open_nursery() as first_run:
        running = await start_condo(first_run, condo)
        keep = await condo.wait_state("keep", "Stable")
        await condo.wait_state("gone", "Stable")
        running.shutdown()
    # Shut down gracefully: the workloads keep running.
    assert len(await condo.containers()) == 2
    condo.remove("gone")  # removed while condo was down
    async with trio.open_nursery() as second_run:
        running = await start_condo(second_run, condo)
        with trio.fail_after(20):  # the orphan of the removed spec is retired
            while len(await condo.containers()) > 1:
                await trio.sleep(0.1)
        again = await condo.wait_state("keep", "Stable")
        assert again["current"]["id"] == keep["current"]["id"]
        assert [r.id for r in await condo.containers()] == [keep["current"]["id"]]
        await condo.wait(lambda v: "gone" not in v["services"])
        running.shutdown()


async def test_a_stable_container_turning_unhealthy_is_replaced(
    condo: CondoUnderTest, nursery: trio.Nursery
) -> None:
    await start_condo(nursery, condo)
    # Healthy at once, unhealthy ~3 s later (its probe file disappears).
    condo.write(
        "web",
        """{:spec {:Image "condo-test/busybox:1"
         :Cmd ["sh" "-c"
               "echo ok > /ok; trap 'exit 0' TERM; sleep 3 & wait; rm /ok; sleep 999 & wait"]
         :Healthcheck {:Test ["CMD-SHELL" "cat /ok"] :Interval 300000000 :Retries 1}}
  :deploy [:After 0]}""",
    )
    first = await condo.wait_state("web", "Stable")
    replaced = await condo.wait(
        lambda v: (
            v["services"]["web"]["state"] in ("WaitNext", "Stable")
            and (v["services"]["web"]["next"] or v["services"]["web"]["current"])["id"]
            != first["current"]["id"]
        )
    )
    svc = replaced["services"]["web"]
    if svc["state"] == "WaitNext":  # (it may already be Stable again, which clears the error)
        assert "unhealthy" in svc["error"]["message"]
    assert await condo.running_ids("web") != {first["current"]["id"]}

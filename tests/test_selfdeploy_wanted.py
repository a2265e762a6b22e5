"""The self-deployer takes the newest self.edn: every change made while a deploy is under way
collapses into the last one (condo.selfdeploy.WantedSelf), deployed once the first one failed.

In-process, with the engine-facing steps of the deployer replaced by recorders (the real-engine
paths are tests/integration/test_selfdeploy.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from condo import selfdeploy
from condo.errors import SelfDeployFailed
from condo.selfdeploy import SelfContext, SelfStatus, WantedSelf, run_self_deployer
from condo.spec import SelfSpec


def self_spec(tag: str) -> SelfSpec:
    return SelfSpec(container={"Image": f"condo:{tag}"}, hash=f"hash-{tag}")


async def test_changes_during_a_deploy_collapse_into_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployed: list[str] = []
    events: list[str] = []
    first_under_way = trio.Event()
    release = trio.Event()

    async def not_handed_over(docker: Any, spec: SelfSpec, host: str) -> bool:
        return False

    async def no_container(docker: Any) -> None:
        return None

    async def deploy(ctx: SelfContext, spec: SelfSpec, own: Any) -> None:
        deployed.append(spec.hash)
        if len(deployed) == 1:
            first_under_way.set()
            await release.wait()
            raise SelfDeployFailed("the first successor was unhealthy")
        # The second one succeeds: side by side, no hand-over container.

    monkeypatch.setattr(selfdeploy, "already_handed_over", not_handed_over)
    monkeypatch.setattr(selfdeploy, "find_own_container", no_container)
    monkeypatch.setattr(selfdeploy, "deploy_self", deploy)
    monkeypatch.delenv(selfdeploy.SELF_ENV, raising=False)

    async def suspend() -> None:
        events.append("suspend")

    statuses: list[SelfStatus] = []
    context = SelfContext(
        docker=None,  # type: ignore[arg-type]  # every engine call is replaced above
        host="h1",
        state_path=Path("/nonexistent/state.json"),
        prefixes=(),
        docker_url="unix:///nonexistent",
        suspend=suspend,
        resume=lambda: events.append("resume"),
        report=statuses.append,
        handed_over=lambda: events.append("handed_over"),
        exit_condo=lambda: events.append("exit"),
    )
    wanted = WantedSelf()
    wanted.offer(self_spec("1"))  # present at start-up
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            # The deployer returns once it handed over (run_condo then exits).
            nursery.start_soon(run_self_deployer, context, wanted)
            await first_under_way.wait()
            for tag in ("2", "3", "4"):  # edits while the first deploy is under way
                wanted.offer(self_spec(tag))
            release.set()
    assert deployed == ["hash-1", "hash-4"]
    assert events == ["suspend", "resume", "suspend", "handed_over", "exit"]
    assert [(s.hash, s.state) for s in statuses] == [
        ("hash-1", "deploying"),
        ("hash-1", "failed"),
        ("hash-4", "deploying"),
    ]

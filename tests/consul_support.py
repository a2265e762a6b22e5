"""What the Consul tests share, against the fake (test_consul_tasks) and a real agent (integration).

A stable state to publish, somebody asking for the fleet (so that the source follows), waiting
for a picture of a StateSource without polling, and a crowd of tasks parked beyond one picture
(the "thousands of waiters cost one query" checks), and the web app over a Consul source as
condo runs it. Nothing here talks to Consul itself: each test brings its own source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio
from quart_trio import QuartTrio

from condo.consul import ConsulSource
from condo.fsm import Box, Phase, ServiceState
from condo.metrics import Metrics
from condo.spec import ServiceSpec
from condo.store import Store
from condo.waiting import Picture, StateSource
from condo.web.app import WebContext, build_app
from condo.web.assets import StaticFiles
from condo.web.health import EngineHealth
from condo.web.hosts import AllowedHosts
from condo.web.lifecycle import Closing
from condo.web.local import LocalSource


def stable(image: str) -> ServiceState:
    spec = ServiceSpec(container={"Image": image})
    box = Box(id="c-" + image, name="web_x", spec=spec, created_at=1.0, healthcheck=True)
    return ServiceState(phase=Phase.Stable, desired=spec, current=box)


async def _no_engine() -> str:
    return "1.41"  # no engine here: /healthz is not what these tests ask


def web_app_over(source: ConsulSource, store: Store, metrics: Metrics) -> QuartTrio:
    """The web app with `source` as every host's picture (and its host directory), as condo
    runs it with Consul; its one background task (the waits' follower) is cancelled at once on
    leaving, not given quart's 5 s."""
    context = WebContext(
        store=store,
        local=LocalSource(store),
        global_source=source,
        host_directory=source,
        health=EngineHealth(_no_engine),
        state_file_error=lambda: None,
        metrics=metrics,
        closing=Closing(),
        static=StaticFiles.scan(),
        allowed_hosts=AllowedHosts.of(),
    )
    app = build_app(context)
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    return app


async def asking(source: StateSource) -> None:
    """Somebody asks for the fleet until cancelled: the source follows (an open wait, a feed)."""
    with source.demand():
        await trio.sleep_forever()


async def until_pictured(source: StateSource, predicate: Callable[[Picture], bool]) -> Picture:
    """Wait (without polling) for a picture of `source` that satisfies `predicate`."""
    while not predicate(picture := source.picture()):
        await source.wait_beyond(picture.token)
    return picture


@attrs.define
class Crowd:
    """Tasks parked in `wait_beyond(token)`; `woken` counts those that have returned."""

    token: int
    woken: int = 0


@asynccontextmanager
async def open_crowd(source: StateSource, count: int) -> AsyncIterator[Crowd]:
    """`count` tasks wait beyond `source`'s current picture; leaving waits for every one to wake."""
    crowd = Crowd(source.picture().token)

    async def waiter() -> None:
        await source.wait_beyond(crowd.token)
        crowd.woken += 1

    async with trio.open_nursery() as waiters:
        for _ in range(count):
            waiters.start_soon(waiter)
        yield crowd

"""Small task-tree helpers shared by condo's modules (no I/O of their own).

Owns `run_beside`: the one shape in which condo runs a piece of work next to a watcher task and
catches what the work raises. Under Trio's strict exception groups an exception that leaves a
nursery is always wrapped in an `ExceptionGroup`, so a plain `except DockerError` around a nursery
never matches; `run_beside` hands the single error back as itself, so callers catch it as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

Watcher = Callable[[trio.TaskStatus[None]], Awaitable[object]]


async def run_beside(
    body: Callable[[], Awaitable[T]], watcher: Watcher, *, name: str | None = None
) -> T | None:
    """Run `body` while `watcher` runs beside it; `body`'s result, or None if `watcher` ended first.

    The watcher starts first and `body` only once it has called `task_status.started()` (so a
    watcher that subscribes to something sees everything `body` causes). When `body` returns the
    watcher is cancelled; when the watcher returns, `body` is cancelled and None is returned. An
    exception from either (or from the watcher's start) leaves unwrapped, the other task
    cancelled; only when both fail does the exception group itself leave. `name` is the
    watcher task's Trio name.
    """
    results: list[T] = []
    single: BaseException | None = None

    async def watch(nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        await watcher(task_status)
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, nursery, name=name)
            results.append(await body())
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        single = group.exceptions[0]
    if single is not None:
        # Raised outside the except block: it keeps its own traceback, cause and context, and
        # does not drag the group along as its context.
        raise single
    return results[0] if results else None

"""`/v1/wait_for`: its parameters and the wait itself.

`parse_wait_params` turns the query into a `WaitParams` or raises `BadParams` (a 400, never a
500). `wait_deployed` waits, without polling, until `evaluate` says the service is deployed
everywhere; the caller owns the deadline (its cancel scope) and the shutdown guard. The picture is
checked before the first checkpoint, so a timeout of 0 still answers "done" when it is. A stale
picture answers nothing: the wait goes on (and its timeout says why).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from condo.waiting import StateSource, Verdict, evaluate

DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0
MAX_NAME = 255
MAX_IMAGE = 1024


class BadParams(ValueError):
    """The query of a wait_for request is unusable; the message says why."""


@attrs.frozen(kw_only=True)
class WaitParams:
    name: str
    image: str
    timeout: float


def parse_wait_params(args: Mapping[str, str]) -> WaitParams:
    name = (args.get("name") or "").strip()
    image = (args.get("image") or "").strip()
    if not name:
        raise BadParams("the name parameter is required")
    if not image:
        raise BadParams("the image parameter is required")
    if len(name) > MAX_NAME:
        raise BadParams(f"name is longer than {MAX_NAME} characters")
    if len(image) > MAX_IMAGE:
        raise BadParams(f"image is longer than {MAX_IMAGE} characters")
    raw = args.get("timeout")
    if raw is None or raw.strip() == "":
        timeout = DEFAULT_TIMEOUT
    else:
        try:
            timeout = float(raw)
        except ValueError:
            raise BadParams(f"timeout must be a number of seconds, got {raw[:40]!r}") from None
        if not math.isfinite(timeout) or not 0 <= timeout <= MAX_TIMEOUT:
            raise BadParams(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds")
    return WaitParams(name=name, image=image, timeout=timeout)


async def wait_deployed(source: StateSource, name: str, image: str) -> Verdict:
    """Return the first verdict that says `name` is Stable on `image` on every host running it,
    or that `image` failed for good on some host (`Verdict.failed`).

    A stale picture (its source could not be read lately) is never a verdict: the wait goes on
    until a fresh one says so (the source wakes its waiters when it is fresh again).
    """
    while True:
        picture = source.picture()
        if not source.stale:
            verdict = evaluate(name, image, picture.hosts, picture.records)
            if verdict.done or verdict.failed:
                return verdict
        await source.wait_beyond(picture.token)

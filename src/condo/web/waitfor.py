"""`/v1/wait_for`: its parameters and the wait itself.

`parse_wait_params` turns the query into a `WaitParams` or raises `BadParams` (a 400, never a
500). `SharedWaits` is how every long-poll waits, without polling: however many requests wait for
one (name, image), the verdict is evaluated once per picture by one task, and a final one (the
service Stable on the image on every host running it, or the image failed for good on one) wakes
them all at once: quart's route through cancel scopes, condo.web.door's parked waiters through
`on_final`. A key is evaluated as it is joined, so a timeout of 0 still answers "done" when it
is. A stale picture answers nothing: the wait goes on (and its timeout says why). The caller owns
the deadline and the shutdown guard. `run` follows the source only while some key has waiters
(its `demand()`): condo.consul's source reads Consul only while somebody asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import attrs
import trio

from condo.waiting import Picture, StateSource, Verdict, evaluate

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


@attrs.define(eq=False)
class SharedVerdict:
    """The waits of one (name, image): evaluated once per picture, however many wait on it.

    `verdict` is set once final (done, or failed for good); `answer` then holds what the web app
    made of it (its encoded response, built once and sent to every waiter as is). Each waiter
    holds a cancel scope in `scopes`: a final verdict cancels them all, which is their wake-up;
    the front door's waiters are in `parked` instead, and `SharedWaits.on_final` wakes them.
    """

    name: str
    image: str
    scopes: set[trio.CancelScope] = attrs.Factory(set)
    evaluated: tuple[int, bool] | None = None  # (picture token, stale) of the last evaluation
    verdict: Verdict | None = None
    answer: object = None
    parked: set[object] = attrs.Factory(set)  # condo.web.door's waiters (no task, no scope)


class SharedWaits:
    """Every open wait of a source, grouped by (name, image) (see `SharedVerdict`).

    `run()` is the one task that follows the source: on each new picture it evaluates every key
    with waiters once (`evaluations` counts them), and wakes the waiters of the keys whose
    verdict is final. A key joined between pictures is evaluated at once by `join`, so a wait
    whose service is already deployed answers before any checkpoint.
    """

    def __init__(self, source: StateSource) -> None:
        self.source = source
        self.keys: dict[tuple[str, str], SharedVerdict] = {}
        self.evaluations = 0
        # Called with each key whose verdict turns final (condo.web.door answers its waiters).
        self.on_final: Callable[[SharedVerdict], None] | None = None
        self._joined = trio.Event()  # set when a key comes while `run` waits for one
        self._following: trio.CancelScope | None = None  # `run` following the source, if it is

    def join(self, name: str, image: str) -> SharedVerdict:
        """The shared verdict of (name, image), evaluated on the current picture."""
        key = self.keys.get((name, image))
        if key is None:
            key = self.keys[(name, image)] = SharedVerdict(name=name, image=image)
            self._joined.set()
        self._evaluate(key, self.source.picture())
        return key

    @contextmanager
    def waiting(self, key: SharedVerdict) -> Iterator[trio.CancelScope]:
        """A cancel scope that a final verdict of `key` cancels; the key goes when its last
        waiter leaves."""
        scope = trio.CancelScope()
        if key.verdict is not None:
            scope.cancel()
        key.scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            key.scopes.discard(scope)
            self.leave(key)

    def leave(self, key: SharedVerdict) -> None:
        """Forget `key` if nobody waits on it any more (its waiters call this as they go)."""
        if not key.scopes and not key.parked and self.keys.get((key.name, key.image)) is key:
            del self.keys[(key.name, key.image)]
            if not self.keys and self._following is not None:
                self._following.cancel()  # nobody waits: stop asking the source

    async def run(self) -> None:
        """Follow the source while any key has waiters, until cancelled."""
        while True:
            while not self.keys:
                self._joined = trio.Event()
                await self._joined.wait()
            with self.source.demand(), trio.CancelScope() as following:
                self._following = following
                while self.keys:
                    picture = self.source.picture()
                    for key in list(self.keys.values()):
                        self._evaluate(key, picture)
                    await self.source.wait_beyond(picture.token)
            self._following = None

    def _evaluate(self, key: SharedVerdict, picture: Picture) -> None:
        stale = self.source.stale
        if key.verdict is not None or key.evaluated == (picture.token, stale):
            return
        key.evaluated = (picture.token, stale)
        if stale:  # a stale picture is no verdict: wait for a fresh one
            return
        self.evaluations += 1
        verdict = evaluate(key.name, key.image, picture.hosts, picture.records)
        if verdict.done or verdict.failed:
            key.verdict = verdict
            for scope in key.scopes:
                scope.cancel()
            if self.on_final is not None:
                self.on_final(key)

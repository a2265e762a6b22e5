"""`/healthz`'s view of the engine: one ping at a time, its answer cached briefly.

Under load, every health check within `ttl` seconds of the last ping shares its answer, and
concurrent checks wait for the one ping in flight, so the engine sees at most one ping per `ttl`
however many probes hit condo. A ping that takes longer than `ping_limit` counts as a failure.
Times are Trio's clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from condo.errors import DockerError

DEFAULT_TTL = 1.0
DEFAULT_PING_LIMIT = 2.0


@attrs.frozen(kw_only=True)
class EngineStatus:
    """The outcome of one ping."""

    ok: bool
    api_version: str | None = None
    error: str | None = None
    checked_at: float  # Trio time


class EngineHealth:
    """Pings the engine on demand, at most once per `ttl` seconds."""

    def __init__(
        self,
        ping: Callable[[], Awaitable[str]],
        *,
        ttl: float = DEFAULT_TTL,
        ping_limit: float = DEFAULT_PING_LIMIT,
    ) -> None:
        self._ping = ping
        self._ttl = ttl
        self._ping_limit = ping_limit
        self._lock = trio.Lock()
        self._last: EngineStatus | None = None

    async def status(self) -> EngineStatus:
        async with self._lock:
            last = self._last
            if last is not None and trio.current_time() - last.checked_at < self._ttl:
                return last
            self._last = await self._check()
            return self._last

    async def _check(self) -> EngineStatus:
        with trio.move_on_after(self._ping_limit):
            try:
                version = await self._ping()
            except DockerError as exc:  # the engine is down or broken: that is the answer
                return EngineStatus(ok=False, error=str(exc), checked_at=trio.current_time())
            return EngineStatus(ok=True, api_version=version, checked_at=trio.current_time())
        return EngineStatus(
            ok=False,
            error=f"the engine did not answer a ping within {self._ping_limit:g} s",
            checked_at=trio.current_time(),
        )

"""The engine's container events as one gap-free stream: `run_events`.

Owns: following `GET /events` forever, reconnecting after drops and engine restarts, replaying
what happened in the gap and de-duplicating it.

Invariants:
- Each event reaches `send` at most once, in the engine's order, and an event the engine still
  remembers is never skipped across a reconnect: the stream resumes from a window before the
  last event seen (`since` is inclusive, and events can be appended slightly out of time order),
  and keys (timeNano, container, action) already forwarded in that window are dropped.
- After every gap: the replayed events first, then one `EventsResumed`, then live events. The
  marker is the consumer's cue to re-inspect: the engine keeps only a bounded backlog (and none
  across its own restart), so a replay can be incomplete, never wrong. A gap in which the engine
  refuses condo's API versions (EngineUnsupported: replaced by one with a higher floor) also
  sends one marker at once: re-inspecting is how consumers learn that nothing they show can be
  confirmed any more (no stream would ever end that gap by itself).
- Backoff between attempts: 0.1 s doubling to 2 s, back to 0.1 s once a stream opens. Time is
  Trio's clock, except the replay bounds, which are the engine's notion of wall-clock time.
- On Podman, which runs no healthchecks without systemd, a container of ours that starts with a
  check has it run through libpod at its interval until the first verdict, which is sent as
  Docker's health_status event would be (`_PodmanHealth`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import NoReturn

import structlog
import trio

from condo.docker.client import DockerClient
from condo.docker.models import ContainerEvent, ContainerId, EventsResumed
from condo.errors import DockerError, DockerUnavailable, EngineUnsupported

log = structlog.get_logger(__name__)

ACTIONS = (
    "create",  # a container with our labels appeared (ours, another instance's, a human's)
    "start",
    "die",  # carries exitCode; covers crashes, stops, kills and OOM kills alike
    "stop",  # a stop request completed (comes after die)
    "destroy",
    "rename",  # condo finds its containers by name too
    "health_status",  # "health_status: healthy|unhealthy", the verdict deploys wait on
    "pause",  # a paused container does not serve
    "unpause",
)
"""The container actions condo follows. Left out on purpose: kill (a signal was sent; if it
changed anything, die follows), oom and restart (die and start follow), exec_* (three per
healthcheck probe), attach/commit/copy/export/resize/top/update (no lifecycle change)."""

FIRST_RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 2.0
REPLAY_WINDOW_NANOS = 1_000_000_000
"""How far before the last event seen a replay starts, and how long keys are remembered."""


class _Seen:
    """The keys of recently forwarded events, and the newest event time."""

    def __init__(self) -> None:
        # Insertion-ordered: events arrive (nearly) in time order, so the oldest come first.
        self._recent: dict[tuple[int, str, str, str | None], None] = {}
        self.latest_nanos: int | None = None

    def first_time(self, event: ContainerEvent) -> bool:
        key = (event.time_nano, event.container_id, event.action, event.health)
        if key in self._recent:
            return False
        self._recent[key] = None
        if self.latest_nanos is None or event.time_nano > self.latest_nanos:
            self.latest_nanos = event.time_nano
        horizon = self.latest_nanos - REPLAY_WINDOW_NANOS
        while self._recent:
            oldest = next(iter(self._recent))
            if oldest[0] >= horizon:
                break
            del self._recent[oldest]
        return True

    def resume_nanos(self, floor_nanos: int) -> int:
        """Where a replay starts: a window before the newest event, or `floor_nanos` if none."""
        if self.latest_nanos is None:
            return floor_nanos
        return self.latest_nanos - REPLAY_WINDOW_NANOS


async def _forward(
    events: AsyncIterator[ContainerEvent],
    seen: _Seen,
    send: trio.MemorySendChannel[ContainerEvent | EventsResumed],
    health: _PodmanHealth,
) -> None:
    async for event in events:
        if seen.first_time(event):
            log.debug(
                "docker.event",
                action=event.action,
                health=event.health,
                container=event.container_id[:12],
            )
            await send.send(event)
            if event.action == "start":
                health.watch(event.container_id)


class _PodmanHealth:
    """Podman without systemd never runs healthchecks, so no verdict would ever come: for each
    container of ours that starts with a check, run it through libpod at the check's interval
    until the first verdict (what a waiting candidate needs), and send that verdict as Docker's
    health_status event would be. A no-op on Docker."""

    def __init__(
        self,
        client: DockerClient,
        send: trio.MemorySendChannel[ContainerEvent | EventsResumed],
        nursery: trio.Nursery,
        labels: Mapping[str, str],
    ) -> None:
        self._client = client
        self._send = send
        self._nursery = nursery
        self._labels = labels
        self._watched: set[ContainerId] = set()

    def watch(self, cid: ContainerId) -> None:
        if self._client.is_podman and cid not in self._watched:
            self._watched.add(cid)
            self._nursery.start_soon(self._poll, cid)

    async def watch_running(self) -> None:
        """After a gap (and at the start): containers that started meanwhile may wait too."""
        if not self._client.is_podman:
            return
        with contextlib.suppress(DockerError):  # the next gap brings the next chance
            for row in await self._client.list_containers(labels=self._labels):
                if row.state == "running":
                    self.watch(row.id)

    async def _poll(self, cid: ContainerId) -> None:
        try:
            info = await self._client.inspect(cid)
            if not info.running or info.health != "starting":
                return  # no check, no longer running, or its verdict is in
            while True:
                await trio.sleep(info.health_interval)
                # Its answer is not the verdict: libpod says "unhealthy" for any failed probe,
                # whatever the check's Retries; the container's health counts them (its
                # FailingStreak) as Docker does.
                await self._client.run_healthcheck(cid)
                info = await self._client.inspect(cid)
                if not info.running or info.health is None:
                    return
                if info.health in ("healthy", "unhealthy"):
                    await self._send.send(
                        ContainerEvent(
                            time_nano=time.time_ns(),
                            action="health_status",
                            health=info.health,
                            container_id=cid,
                            attributes={**info.labels, "name": info.name},
                        )
                    )
                    return
        except (DockerError, trio.BrokenResourceError, trio.ClosedResourceError):
            return  # gone, or nobody listens any more; a gap re-arms it
        finally:
            self._watched.discard(cid)


async def run_events(
    client: DockerClient,
    send: trio.MemorySendChannel[ContainerEvent | EventsResumed],
    *,
    labels: Mapping[str, str],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Stream the events of containers carrying all of `labels` into `send`, forever.

    Reports `started()` once the first stream is open, or once the first attempt failed (the gap
    then ends with `EventsResumed`): start it before the first inspection, so nothing falls
    between the two. Drops, engine restarts and a down engine are retried, never
    raised; an error from `send` (the receiver went away) ends it.

    Keep the receiving side moving (route, do not work, in the receiver): while `send` blocks the
    engine buffers this subscriber's events, and moby's publisher drops what does not fit in its
    per-subscriber buffer (1024) within 100 ms, silently. A replay reaches back only as far as
    the engine's backlog (its last 256 events, none from before its own restart).
    """
    seen = _Seen()
    # Where a replay starts while no event has been seen yet. Our wall clock stands in for the
    # engine's (the same machine for a unix socket); a skew only shortens a replay, and the
    # EventsResumed resync covers what a replay misses.
    floor_nanos = time.time_ns()
    gap_started_at: float | None = None
    had_gap = False
    refusal_told = False  # this gap's refusal was passed on (one marker per gap)
    started = False
    delay = FIRST_RECONNECT_DELAY

    async with trio.open_nursery() as nursery:
        health = _PodmanHealth(client, send, nursery, labels)

        async def follow(since: int | None, until: int | None) -> None:
            """One stream, forwarded to its end; once open, the start is reported and the
            backoff starts over."""
            nonlocal started, delay
            async with client.open_event_stream(
                labels=labels, actions=ACTIONS, since_nanos=since, until_nanos=until
            ) as events:
                if not started:
                    task_status.started()
                    started = True
                delay = FIRST_RECONNECT_DELAY
                await health.watch_running()
                await _forward(events, seen, send, health)

        while True:
            try:
                if gap_started_at is not None:
                    # Replay the gap as a stream that ends by itself, so the marker can follow it.
                    since = seen.resume_nanos(floor_nanos)
                    until = max(time.time_ns(), since + REPLAY_WINDOW_NANOS)
                    if client.is_podman:
                        # Podman replays nothing for an `until` already past when it reads it.
                        until = time.time_ns() + REPLAY_WINDOW_NANOS
                    await follow(since, until)
                    log.info("docker.events.resumed", gap=round(time.time() - gap_started_at, 3))
                    await send.send(EventsResumed(gap_started_at))
                    gap_started_at = None
                    refusal_told = False
                # Live; after a gap from a window back again, so that nothing between the end of
                # the replay and this subscription is lost (the window's duplicates are dropped).
                await follow(seen.resume_nanos(floor_nanos) if had_gap else None, None)
                # The engine closed the stream cleanly (it does when shutting down): a gap.
                raise DockerUnavailable("GET /events: the engine ended the stream")
            except (
                DockerError
            ) as exc:  # every failure of the stream is a gap to bridge, never fatal
                had_gap = True
                if not started:
                    # The engine is away at start-up: the caller need not wait for it, since the
                    # gap ends with EventsResumed, and with it a resync of everything.
                    task_status.started()
                    started = True
                if gap_started_at is None:
                    gap_started_at = time.time()
                    log.warning("docker.events.interrupted", error=str(exc))
                else:
                    log.debug("docker.events.retry", error=str(exc), delay=delay)
                if isinstance(exc, EngineUnsupported) and not refusal_told:
                    # Consumers would go on showing what they saw before the engine changed.
                    refusal_told = True
                    await send.send(EventsResumed(gap_started_at))
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)

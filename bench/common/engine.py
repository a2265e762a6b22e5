"""The Docker engine over its socket, only to observe (`/events`) and clean up; condo itself is
never imported to do the measuring.

Owns the labels the benchmarks filter on: every container any benchmark makes carries
`condo-bench.run=<id>` (`RUN_LABEL`), so a run can remove all of them, whatever failed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping

import attrs
import httpx
import trio

from bench.common.wait import Feed, wall

DOCKER_SOCKET = "/var/run/docker.sock"
RUN_LABEL = "condo-bench.run"
CASE_LABEL = "condo-bench.case"
HOST_LABEL = "condo.host"
SERVICE_LABEL = "condo.service"

REMOVE_CONCURRENCY = 8


@attrs.frozen(kw_only=True)
class EngineEvent:
    action: str  # create, start, die, destroy, health_status
    health: str | None  # for health_status: healthy / unhealthy
    container_id: str
    name: str
    labels: Mapping[str, str]
    at: float

    @property
    def service(self) -> str | None:
        return self.labels.get(SERVICE_LABEL)


def _event_from(raw: object) -> EngineEvent | None:
    if not isinstance(raw, dict) or raw.get("Type") != "container":
        return None
    action = str(raw.get("Action", ""))
    actor = raw.get("Actor") or {}
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    health = None
    if action.startswith("health_status"):
        action, _, health = action.partition(":")
        health = health.strip()
    return EngineEvent(
        action=action,
        health=health,
        container_id=str(actor.get("ID", "")),
        name=attributes.get("name", ""),
        labels=attributes,
        at=int(raw.get("timeNano", 0)) / 1e9,
    )


class Engine:
    """The Docker engine, for watching and cleaning up (never for what is being measured)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[Engine]:
        transport = httpx.AsyncHTTPTransport(uds=DOCKER_SOCKET)
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://docker", timeout=timeout
        ) as client:
            yield cls(client)

    async def version(self) -> tuple[str, str]:
        response = await self._client.get("/version")
        response.raise_for_status()
        body = response.json()
        return str(body["Version"]), str(body["ApiVersion"])

    async def image_present(self, image: str) -> bool:
        response = await self._client.get(f"/images/{image}/json")
        return response.status_code == 200

    async def container_ids(self, labels: Mapping[str, str]) -> list[str]:
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        response = await self._client.get(
            "/containers/json", params={"all": "true", "filters": filters}
        )
        response.raise_for_status()
        return [str(row["Id"]) for row in response.json()]

    async def remove_labelled(self, labels: Mapping[str, str]) -> int:
        """Force-remove every container carrying all `labels`; returns how many there were."""
        ids = await self.container_ids(labels)
        limiter = trio.CapacityLimiter(REMOVE_CONCURRENCY)

        async def remove(cid: str) -> None:
            async with limiter:
                # 404: condo (or compose) removed it meanwhile; an engine away: the caller
                # lists again and sees what is left (Run.sweep retries).
                with contextlib.suppress(httpx.TransportError):
                    await self._client.delete(f"/containers/{cid}", params={"force": "true"})

        async with trio.open_nursery() as nursery:
            for cid in ids:
                nursery.start_soon(remove, cid)
        return len(ids)

    async def create_and_start(self, body: Mapping[str, object]) -> tuple[str, float]:
        """Create and start a container; returns its id and when the create request was sent."""
        sent = wall()
        response = await self._client.post("/containers/create", json=dict(body))
        response.raise_for_status()
        cid = str(response.json()["Id"])
        started = await self._client.post(f"/containers/{cid}/start")
        started.raise_for_status()
        return cid, sent

    async def run_events(
        self,
        labels: Mapping[str, str],
        feed: Feed[EngineEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Append the engine's container events for `labels` to `feed` until cancelled.

        `started()` once the engine accepted the subscription: nothing after it is missed.
        """
        filters = json.dumps(
            {
                "type": ["container"],
                "label": [f"{k}={v}" for k, v in labels.items()],
                "event": ["create", "start", "die", "destroy", "health_status"],
            }
        )
        timeout = httpx.Timeout(10.0, read=None)  # an idle stream is not an error
        async with self._client.stream(
            "GET", "/events", params={"filters": filters}, timeout=timeout
        ) as response:
            response.raise_for_status()
            task_status.started()
            async for line in response.aiter_lines():
                if line.strip():
                    event = _event_from(json.loads(line))
                    if event is not None:
                        feed.append(event)


@contextlib.asynccontextmanager
async def recording_events(
    engine: Engine, labels: Mapping[str, str]
) -> AsyncIterator[Feed[EngineEvent]]:
    """The engine's container events for `labels`, recorded while the block runs."""
    feed: Feed[EngineEvent] = Feed()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run_events, labels, feed)
        try:
            yield feed
        finally:
            nursery.cancel_scope.cancel()

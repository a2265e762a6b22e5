"""What condo's proxy should do, derived from the services' states alone (pure: no I/O).

A listener of a service's desired spec (`:proxy`) leads to the service's Stable container, and
to nothing else: a candidate gets no connection until it is Stable. During an `[:After n]`
drain (WaitNext with `draining`) the new container is `ready` and the old one `drain`: it takes
no new connection, its open ones continue until it is stopped. A container whose spec does not
publish the listener's container port (an older spec without that `:proxy` entry) is no server
of it. A listener without a ready server holds its connections (see condo.proxy.haproxy).

Invariants:
- Each listen address belongs to one service (the first by name when two specs claim it: the
  other's claim is reported in `conflicts`, never routed).
- A server is named after its container, so that one container keeps its name across listeners,
  reloads and restarts of condo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

from condo.fsm import Box, Phase, ServiceState
from condo.spec import ProxyListener

ServerState = Literal["ready", "drain"]


@attrs.frozen
class Server:
    """One container behind a listener."""

    container: str  # the container's id
    name: str  # the container's name, for people
    target: int  # the container port it listens on
    state: ServerState

    @property
    def key(self) -> str:
        """The server's name in the proxy: stable for one container."""
        return "c" + self.container[:16]


@attrs.frozen
class Route:
    """One listener and where it leads."""

    service: str
    listener: ProxyListener
    servers: tuple[Server, ...]
    hold_timeout: float  # how long a connection waits for a ready server (see service_routes)

    @property
    def ready(self) -> Server | None:
        return next((s for s in self.servers if s.state == "ready"), None)


def serving(state: ServiceState) -> tuple[Box | None, Box | None]:
    """(the container that takes new connections, the one that drains), from the state."""
    match state.phase:
        case Phase.Stable | Phase.TryAgainNext:
            return state.current, None
        case Phase.WaitNext if state.draining:
            return state.next, state.current
        case Phase.WaitNext:
            return state.current, None
    return None, None


def _publishes(box: Box, target: int) -> bool:
    return any(listener.target == target for listener in box.spec.proxy)


def service_routes(name: str, state: ServiceState) -> tuple[Route, ...]:
    """The routes of one service's desired `:proxy` (none once its file is gone)."""
    desired = state.desired
    if desired is None or state.removed or not desired.proxy:
        return ()
    ready, draining = serving(state)
    routes = []
    for listener in desired.proxy:
        servers = []
        pairs: tuple[tuple[Box | None, ServerState], ...] = ((ready, "ready"), (draining, "drain"))
        for box, server_state in pairs:
            if box is not None and _publishes(box, listener.target):
                servers.append(Server(box.id, box.name, listener.target, server_state))
        routes.append(
            Route(
                service=name,
                listener=listener,
                servers=tuple(servers),
                # A [:Before] gap is the old container's stop, then the new one's start and
                # health check: a connection arriving at its start waits through both.
                hold_timeout=desired.health_timeout
                + (desired.stop_timeout if desired.deploy.strategy == "Before" else 0.0),
            )
        )
    return tuple(routes)


@attrs.frozen
class Conflict:
    """`service`'s listener `listen` is already the listener of `owner`."""

    service: str
    listen: str
    owner: str


def desired_routes(
    states: Mapping[str, ServiceState],
) -> tuple[tuple[Route, ...], tuple[Conflict, ...]]:
    """Every service's routes, by service name; a listener clashing with one of a service
    earlier by name is left out and reported."""
    routes: list[Route] = []
    conflicts: list[Conflict] = []
    for name in sorted(states):
        for route in service_routes(name, states[name]):
            owner = next((r for r in routes if r.listener.clashes(route.listener)), None)
            if owner is not None:
                conflicts.append(Conflict(name, route.listener.listen, owner.service))
                continue
            routes.append(route)
    return tuple(routes), tuple(conflicts)


def listener_views(state: ServiceState) -> list[dict[str, object]]:
    """A service's listeners in `/v1/state`: where each listens, which container it leads to."""
    return [_route_view(route) for route in service_routes("", state)]


def _route_view(route: Route) -> dict[str, object]:
    ready = route.ready
    return {
        "listen": route.listener.listen,
        "port": route.listener.target,
        "mode": route.listener.mode,
        "to": None if ready is None else {"id": ready.container, "name": ready.name},
        "draining": [
            {"id": s.container, "name": s.name} for s in route.servers if s.state == "drain"
        ],
    }

"""The values condo.docker hands out, and the parsing of the engine's JSON into them.

Owns: `ContainerId`, `Container`, `ContainerSummary`, `ContainerEvent`, `EventsResumed`, and the
`parse_*` functions that turn one decoded engine answer into one of them (an image's
`RepoDigests` into a tuple).

Invariants:
- Every value is a frozen attrs class whose mappings are read-only (`MappingProxyType`), so a
  value handed to a service can never be changed behind its back.
- `dict[str, Any]` stops here: the parsers take the decoded JSON and nothing outside this package
  ever sees it. A field the engine omits gets a documented default; a missing identity (`Id`) or
  an answer of the wrong shape raises `MalformedAnswer`, which the client maps to condo's errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, NewType

import attrs

ContainerId = NewType("ContainerId", str)

DEFAULT_HEALTH_INTERVAL = 30.0
"""Seconds: the engines' healthcheck interval when the container's check does not set one."""

# Podman's names for what Docker calls "destroy" and "die" (events and event filters).
_PODMAN_ACTIONS = {"remove": "destroy", "died": "die"}


def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    # A read-only copy: attrs' `frozen` stops attribute assignment, this stops item assignment.
    return MappingProxyType(dict(value or {}))


def _frozen_ports(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class Container:
    """One container as `GET /containers/{id}/json` describes it."""

    id: ContainerId
    name: str
    """Without the engine's leading "/"."""
    image: str
    """`Config.Image`: the reference as it was asked for, not the image id."""
    labels: Mapping[str, str] = attrs.field(converter=_frozen_mapping)
    status: str
    """created | running | paused | restarting | removing | exited | dead."""
    running: bool
    health: str | None
    """None when the container has no healthcheck; else starting | healthy | unhealthy. The engine
    keeps the last value after the container stopped, so look at `status`/`running` first."""
    exit_code: int
    created_at: float
    """Unix seconds."""
    restart_policy: str
    """"" (the engine's default, same as "no"), "no", "always", "unless-stopped", "on-failure"."""
    image_id: str = ""
    """`Image`: the id of the image it runs (what a copy of it must be created from)."""
    host_ports: frozenset[str] = frozenset()
    """The host ports `HostConfig.PortBindings` publishes, as "PORT/PROTO" (e.g. "4280/tcp")."""
    binds: tuple[str, ...] = ()
    """`HostConfig.Binds`, as given at creation."""
    auto_remove: bool = False
    loopback_ports: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_ports)
    """`NetworkSettings.Ports`' bindings on 127.0.0.1, as "PORT/PROTO" → the host port the engine
    chose (what condo's proxy connects to); empty while the container does not run."""
    ip_address: str = ""
    """Its IPv4 address on its (first) network ("" without one, e.g. host networking): where
    condo's NAT sends other hosts' connections to a `:proxy` listener."""
    network_mode: str = ""
    """`HostConfig.NetworkMode` ("host": it shares the host's network, and its nftables)."""
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    """Seconds between two healthchecks (`Config.Healthcheck.Interval`; the engine's 30 s when
    unset). Podman without systemd never runs the checks itself: condo runs them at this pace."""


@attrs.frozen(kw_only=True)
class ContainerSummary:
    """One row of `GET /containers/json?all=1`.

    `image` is what the engine lists: the reference the container was created from, or the image id
    when that reference has since moved to another image.
    """

    id: ContainerId
    name: str
    image: str
    labels: Mapping[str, str] = attrs.field(converter=_frozen_mapping)
    state: str
    created_at: float


@attrs.frozen(kw_only=True)
class ContainerEvent:
    """One container event from `GET /events`."""

    time_nano: int
    """The engine's timestamp, nanoseconds since the epoch (the engine's clock)."""
    action: str
    """"create", "start", "die", "stop", "destroy", "rename", "health_status", "pause", "unpause".
    The engine's "health_status: healthy" is split into action "health_status" and `health`."""
    health: str | None
    """"healthy" / "unhealthy" for health_status events, else None."""
    container_id: ContainerId
    attributes: Mapping[str, str] = attrs.field(converter=_frozen_mapping)
    """The container's labels plus the engine's own keys: name, image, exitCode (a string), ..."""


@attrs.frozen
class EventsResumed:
    """The events stream was re-established after a gap.

    Events that happened during the gap were replayed (they come before this marker), but the
    engine keeps only a bounded backlog and forgets it when it restarts: consumers re-inspect what
    they care about (level-triggered resync).
    """

    gap_started_at: float
    """Unix seconds (wall clock) at which the stream was found broken."""


class MalformedAnswer(Exception):
    """The engine answered something of a shape condo does not understand.

    Internal to condo.docker: the client maps it to DockerApiError.
    """


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_timestamp(text: str) -> float:
    """The engine's RFC 3339 timestamp (nanosecond precision) as unix seconds."""
    match = _TIMESTAMP.match(text)
    if match is None:
        raise MalformedAnswer(f"unreadable timestamp {text!r}")
    whole, fraction, zone = match.groups()
    base = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return base.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedAnswer(f"{what} is not an object")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value, what).items()}


def _container_id(value: Any) -> ContainerId:
    if not isinstance(value, str) or not value:
        raise MalformedAnswer("no container id in the answer")
    return ContainerId(value)


def parse_container(data: Any) -> Container:
    """`GET /containers/{id}/json` → `Container`."""
    data = _mapping(data, "container")
    config = _mapping(data.get("Config"), "Config")
    state = _mapping(data.get("State"), "State")
    host_config = _mapping(data.get("HostConfig"), "HostConfig")
    health = _mapping(state.get("Health"), "State.Health").get("Status")
    interval = _mapping(config.get("Healthcheck"), "Config.Healthcheck").get("Interval")
    return Container(
        id=_container_id(data.get("Id")),
        name=str(data.get("Name", "")).removeprefix("/"),
        image=str(config.get("Image", "")),
        labels=_str_map(config.get("Labels"), "Config.Labels"),
        status=str(state.get("Status", "")),
        running=bool(state.get("Running", False)),
        # "none" is what the engine reports for a healthcheck disabled with Test ["NONE"].
        health=str(health) if health not in (None, "", "none") else None,
        exit_code=int(state.get("ExitCode", 0)),
        created_at=parse_timestamp(str(data.get("Created", ""))),
        restart_policy=str(
            _mapping(host_config.get("RestartPolicy"), "RestartPolicy").get("Name", "")
        ),
        image_id=str(data.get("Image", "")),
        host_ports=published_host_ports(host_config.get("PortBindings")),
        binds=tuple(str(b) for b in host_config.get("Binds") or ()),
        auto_remove=bool(host_config.get("AutoRemove", False)),
        loopback_ports=loopback_ports(_mapping(data.get("NetworkSettings"), "NetworkSettings")),
        ip_address=ip_address(_mapping(data.get("NetworkSettings"), "NetworkSettings")),
        network_mode=str(host_config.get("NetworkMode") or ""),
        health_interval=interval / 1e9
        if isinstance(interval, int) and interval > 0
        else DEFAULT_HEALTH_INTERVAL,
    )


def parse_repo_digests(data: Any) -> tuple[str, ...]:
    """`GET /images/{name}/json` → its `RepoDigests` (null or absent: none)."""
    digests = _mapping(data, "image").get("RepoDigests") or []
    if not isinstance(digests, list):
        raise MalformedAnswer("RepoDigests is not a list")
    return tuple(str(d) for d in digests)


def published_host_ports(port_bindings: Any) -> frozenset[str]:
    """`{"80/tcp": [{"HostIp": ..., "HostPort": "4280"}]}` → {"4280/tcp"} (PortBindings' shape,
    in an inspect answer or a create body alike); bindings without a fixed host port are left out
    (the engine picks a free one, which clashes with nothing)."""
    if not isinstance(port_bindings, Mapping):
        return frozenset()
    ports = set()
    for container_port, bindings in port_bindings.items():
        proto = str(container_port).partition("/")[2] or "tcp"
        for binding in bindings if isinstance(bindings, list) else ():
            host_port = binding.get("HostPort") if isinstance(binding, Mapping) else None
            if host_port not in (None, "", "0", 0):
                ports.add(f"{host_port}/{proto}")
    return frozenset(ports)


def loopback_ports(network_settings: Mapping[str, Any]) -> dict[str, int]:
    """`{"Ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}]}}` → {"80/tcp":
    32768}: the ports the engine really published on 127.0.0.1 (ephemeral ones included)."""
    ports = network_settings.get("Ports")
    found: dict[str, int] = {}
    if not isinstance(ports, Mapping):
        return found
    for container_port, bindings in ports.items():
        for binding in bindings if isinstance(bindings, list) else ():
            if not isinstance(binding, Mapping) or binding.get("HostIp") != "127.0.0.1":
                continue
            host_port = str(binding.get("HostPort", ""))
            if host_port.isdigit() and 0 < int(host_port) < 65536:
                found[str(container_port)] = int(host_port)
                break
    return found


def ip_address(network_settings: Mapping[str, Any]) -> str:
    """`NetworkSettings.IPAddress` (the default bridge's), else the first network's address."""
    if address := network_settings.get("IPAddress"):
        return str(address)
    networks = network_settings.get("Networks")
    for network in networks.values() if isinstance(networks, Mapping) else ():
        if isinstance(network, Mapping) and network.get("IPAddress"):
            return str(network["IPAddress"])
    return ""


def _primary_name(names: Any) -> str:
    # Legacy links add extra names like "/other/alias"; the container's own has no inner "/".
    if not isinstance(names, list) or not names:
        return ""
    stripped = [str(n).removeprefix("/") for n in names]
    return next((n for n in stripped if "/" not in n), stripped[0])


def parse_summaries(data: Any) -> list[ContainerSummary]:
    """`GET /containers/json` → `ContainerSummary`s."""
    if not isinstance(data, list):
        raise MalformedAnswer("container list is not a list")
    summaries = []
    for row in data:
        row = _mapping(row, "container list row")
        summaries.append(
            ContainerSummary(
                id=_container_id(row.get("Id")),
                name=_primary_name(row.get("Names")),
                image=str(row.get("Image", "")),
                labels=_str_map(row.get("Labels"), "Labels"),
                state=str(row.get("State", "")),
                created_at=float(row.get("Created", 0)),
            )
        )
    return summaries


def parse_event(data: Any) -> ContainerEvent | None:
    """One `/events` line → `ContainerEvent`, or None for what condo does not follow.

    Ignored: events of other types and exec_* actions (every healthcheck probe makes three).
    Podman's shapes are read as Docker's: `"Action": "health_status"` with the verdict in
    `HealthStatus`, "remove" for "destroy", "died" for "die".
    """
    data = _mapping(data, "event")
    if data.get("Type") != "container":
        return None
    raw_action = str(data.get("Action", ""))
    if raw_action.startswith("exec_"):
        return None
    action, _, detail = raw_action.partition(": ")
    action = _PODMAN_ACTIONS.get(action, action)
    if action == "health_status" and not detail:
        detail = str(data.get("HealthStatus") or "")
    actor = _mapping(data.get("Actor"), "Actor")
    time_nano = data.get("timeNano")
    if not isinstance(time_nano, int):
        raise MalformedAnswer("event without timeNano")
    return ContainerEvent(
        time_nano=time_nano,
        action=action,
        health=(detail or None) if action == "health_status" else None,
        container_id=_container_id(actor.get("ID")),
        attributes=_str_map(actor.get("Attributes"), "Actor.Attributes"),
    )

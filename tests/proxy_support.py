"""What the proxy tests share for their stand-in engines: the Engine's inspect answer for a
running container, parsed as condo's Docker client parses it.

The proxy task asks the engine only `inspect` (a container's published ports, its address, its
network mode); each test's stand-in says which, through `inspected` and `published_on_loopback`.
"""

from __future__ import annotations

from collections.abc import Mapping

from condo.docker.models import Container, parse_container


def inspected(
    cid: str, network: Mapping[str, object], host_config: Mapping[str, object] | None = None
) -> Container:
    """The container `cid`, running, with these `NetworkSettings` (and `HostConfig`), as
    `parse_container` reads the engine's inspect body."""
    return parse_container(
        {
            "Id": cid,
            "Created": "2026-01-01T00:00:00.000000000Z",
            "Config": {},
            "State": {"Running": True},
            "HostConfig": dict(host_config or {}),
            "NetworkSettings": dict(network),
        }
    )


def published_on_loopback(
    port: int, *, target: int = 80, address: str | None = None
) -> dict[str, object]:
    """`NetworkSettings` publishing `target`/tcp on 127.0.0.1:`port` (and the container's
    `IPAddress` when given)."""
    network: dict[str, object] = {
        "Ports": {f"{target}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    }
    if address is not None:
        network["IPAddress"] = address
    return network

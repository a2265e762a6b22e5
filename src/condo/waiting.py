"""What "deployed everywhere" means, and where the state of every host comes from.

`evaluate(name, image, hosts)` is the one rule behind `/v1/wait_for` and `condo wait`: the service
is done when at least one host runs it and every host that runs it has it Stable on `image`. A
host "runs" a service when it has an entry for it that is not `Init` (a host whose spec for the
service is gone, or never had it, does not count). Pure: no I/O.

`StateSource` is the port the web app reads through: the local store (no Consul) or Consul's view
of every host (condo.consul). Both wait without polling: the local one on the store's change
event, Consul's on one blocking-query watcher shared by every waiter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

# host -> service -> SERVICE view (the /v1/state shape of one service)
HostsView = Mapping[str, Mapping[str, Mapping[str, Any]]]


@attrs.frozen(kw_only=True)
class Verdict:
    """Whether `name` is Stable on `image` everywhere it runs, and who is not yet."""

    done: bool
    # host -> {"state", "image"} of every host that runs the service but is not there yet
    pending: Mapping[str, Mapping[str, Any]]
    # every host that runs the service
    hosts: tuple[str, ...]


def evaluate(name: str, image: str, hosts: HostsView) -> Verdict:
    """Apply the rule to one picture of every host's services."""
    running: list[str] = []
    pending: dict[str, Mapping[str, Any]] = {}
    for host, services in sorted(hosts.items()):
        service = services.get(name)
        if service is None or service.get("state") == "Init" or service.get("removed"):
            continue
        running.append(host)
        current = service.get("current") or {}
        on_image = current.get("image") == image
        if not (service.get("state") == "Stable" and on_image):
            pending[host] = {
                "state": service.get("state"),
                "image": current.get("image"),
                "deploying": service.get("deploying"),
                "error": service.get("error"),
            }
    return Verdict(done=bool(running) and not pending, pending=pending, hosts=tuple(running))


@attrs.frozen(kw_only=True)
class Picture:
    """Every host's services at one moment; `token` identifies the moment for `wait_beyond`."""

    token: int
    hosts: HostsView


class StateSource(Protocol):
    """Where the web app reads every host's state from: the local store, or Consul.

    Implementations keep one latest picture and wake waiters on change, so that thousands of
    concurrent `/v1/wait_for` requests cost nothing while they wait.
    """

    def picture(self) -> Picture:
        """The latest picture (never blocks)."""
        ...

    @property
    def stale(self) -> bool:
        """True while the picture may be out of date (its source could not be read lately)."""
        ...

    async def wait_beyond(self, token: int) -> None:
        """Return once a picture newer than `token` is available (spurious wake-ups allowed)."""
        ...

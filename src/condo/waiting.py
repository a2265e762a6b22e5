"""What "deployed everywhere" means, and where the state of every host comes from.

`evaluate(name, image, hosts, records)` is the one rule behind `/v1/wait_for` and `condo wait`: the
service is done when at least one host runs it and every host that runs it has it Stable on `image`
(past its probation: `probation_until` is null). A host "runs" a service when it has an entry for
it that is not `Init` (a host whose spec for the service is gone, or never had it, does not count),
or when its `HostRecord` says it ran it. The record (Consul only) outlives the host's session: a
host that is cut off, whose condo was killed or whose agent died still runs what it ran, so it is
pending ("unreachable since T") and never done, until it says otherwise (its spec for the service
is removed) or an operator forgets it (`condo forget HOST`). The image has *failed* on a host, for
good, when that host reverted a deploy of it (`reverted.from`), or its deploy of it met a permanent
error (`error.permanent`: the image does not exist, the engine rejects the body) and it waits to
retry it (a deploy in flight, of a fixed spec or of an image pushed since, is no verdict yet):
waiting longer cannot help. Pure: no I/O.

`StateSource` is the port the web app reads through: the local store (no Consul) or Consul's view
of every host (condo.consul). Both wait without polling: the local one on the store's change
event, Consul's on one blocking-query watcher shared by every waiter. Consul's reads only while
somebody asks: a waiter (`wait_beyond`) or a holder of `demand()` (an open wait, a feed), and a
one-shot reader first awaits `fresh()`; the local one is always fresh (both are no-ops there).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs

# host -> service -> SERVICE view (the /v1/state shape of one service)
HostsView = Mapping[str, Mapping[str, Mapping[str, Any]]]

UNREACHABLE = "unreachable"  # the pending state of a host whose liveness lapsed


@attrs.frozen(kw_only=True)
class HostRecord:
    """What a host last said it runs, kept beyond its session (condo.consul's host record)."""

    # service -> {"state", "image"} as the host last published it
    services: Mapping[str, Mapping[str, Any]]
    live: bool  # its session is alive: its service entries in `hosts` are current
    # Wall time this host was last known live (None: unknown); shown, never used to decide.
    last_seen: float | None = None


@attrs.frozen(kw_only=True)
class Verdict:
    """Whether `name` is Stable on `image` everywhere it runs, and who is not yet."""

    done: bool
    # host -> {"state", "image"} of every host that runs the service but is not there yet
    pending: Mapping[str, Mapping[str, Any]]
    # every host that runs the service
    hosts: tuple[str, ...]
    # host -> {"state", "image", "reason", ...} of every host where `image` failed for good
    failed: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)


def evaluate(
    name: str, image: str, hosts: HostsView, records: Mapping[str, HostRecord] | None = None
) -> Verdict:
    """Apply the rule to one picture of every host's services (and, with Consul, their records)."""
    records = records or {}
    running: list[str] = []
    pending: dict[str, Mapping[str, Any]] = {}
    failed: dict[str, Mapping[str, Any]] = {}
    for host in sorted(hosts.keys() | records.keys()):
        record = records.get(host)
        recorded = record.services.get(name) if record is not None else None
        if record is not None and not record.live:
            if recorded is not None:
                running.append(host)
                pending[host] = {
                    "state": UNREACHABLE,
                    "since": record.last_seen,
                    "image": recorded.get("image"),
                    "last_state": recorded.get("state"),
                }
            continue
        service = hosts.get(host, {}).get(name)
        if service is None or service.get("state") == "Init" or service.get("removed"):
            if recorded is not None and not (service is not None and service.get("removed")):
                # It said it runs the service, and has not published it since (a restart
                # before its first reconciliation): not done here yet.
                running.append(host)
                pending[host] = {
                    "state": service.get("state") if service is not None else "Init",
                    "image": recorded.get("image"),
                    "deploying": None,
                    "error": None,
                }
            continue
        running.append(host)
        current = service.get("current") or {}
        on_image = current.get("image") == image
        # A state the engine could not confirm (it refuses condo's API version) is no verdict.
        unobserved = bool((service.get("error") or {}).get("unobserved"))
        on_probation = service.get("probation_until") is not None
        if not (service.get("state") == "Stable" and on_image) or unobserved or on_probation:
            pending[host] = {
                "state": service.get("state"),
                "image": current.get("image"),
                "deploying": service.get("deploying"),
                "error": service.get("error"),
            }
            if on_probation:
                pending[host] = {**pending[host], "probation_until": service["probation_until"]}
            reason = _failed_for_good(service, image)
            if reason is not None:
                failed[host] = {**pending[host], "reason": reason}
    return Verdict(
        done=bool(running) and not pending, pending=pending, hosts=tuple(running), failed=failed
    )


def _failed_for_good(service: Mapping[str, Any], image: str) -> str | None:
    """Why `image` will not turn Stable on this host without somebody acting (None: it may)."""
    reverted = service.get("reverted") or {}
    if reverted.get("from") == image:
        return f"reverted to {reverted.get('to')}: {reverted.get('reason')}"
    error = service.get("error") or {}
    # The error stays shown until a deploy turns Stable, but it is a verdict only while the host
    # waits to retry that spec: a fixed spec, or a retry of an image pushed since, may succeed.
    retrying = service.get("state") in ("TryAgain", "TryAgainNext")
    if error.get("permanent") and retrying and service.get("image") == image:
        return str(error.get("message"))
    return None


@attrs.frozen(kw_only=True)
class Picture:
    """Every host's services at one moment; `token` identifies the moment for `wait_beyond`."""

    token: int
    hosts: HostsView
    # host -> its record (Consul only): what it ran, and whether it is live
    records: Mapping[str, HostRecord] = attrs.Factory(dict)


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

    @property
    def read_at(self) -> float | None:
        """Wall time of the last good read of the source (None: never; always now for the
        local store)."""
        ...

    @property
    def following(self) -> bool:
        """True while the source follows its origin (Consul's: only while somebody asks)."""
        ...

    async def wait_beyond(self, token: int) -> None:
        """Return once a picture newer than `token` is available (spurious wake-ups allowed);
        waiting is demand (see `demand`)."""
        ...

    def demand(self) -> AbstractContextManager[None]:
        """Keep the picture followed while this is held (synchronous, free: a count)."""
        ...

    async def fresh(self) -> None:
        """Return once the picture is fresh, or says it is stale (bounded: a one-shot reader's
        first await)."""
        ...


class HostDirectory(Protocol):
    """The hosts' records (condo.consul): what an operator may forget."""

    async def forget(self, host: str) -> None:
        """Remove a host's record, so that waits no longer count it; condo.errors.ForgetRefused
        for a host that is unknown or live, or while Consul cannot be read."""
        ...


def hosts_document(picture: Picture, only: str | None = None) -> dict[str, dict[str, Any]]:
    """`/v1/global_state`'s `hosts` (and the feed's): every host of the picture, live or not.

    `{H: {"services": {NAME: SERVICE}, "live": bool, "last_seen": T|null, "runs": {NAME:
    {"state", "image"}}}}`; `runs` (the host's record) is absent for a host that keeps none.
    With `only`, every host still, but `services` and `runs` hold that service alone (if any):
    all that `evaluate` reads of it.
    """
    return {
        host: host_document(picture, host, only)
        for host in sorted(picture.hosts.keys() | picture.records.keys())
    }


def host_document(picture: Picture, host: str, only: str | None = None) -> dict[str, Any]:
    """One host's body of `hosts_document` (the feed encodes hosts one by one: condo.web.feed)."""
    record = picture.records.get(host)
    services = picture.hosts.get(host, {})
    body: dict[str, Any] = {
        "services": dict(services) if only is None else _one(services, only),
        "live": True if record is None else record.live,
        "last_seen": None if record is None else record.last_seen,
    }
    if record is not None:
        ran = record.services if only is None else _one(record.services, only)
        body["runs"] = {name: dict(said) for name, said in ran.items()}
    return body


def _one(services: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, Any]:
    return {name: services[name]} if name in services else {}


def read_hosts_document(document: Mapping[str, Any]) -> tuple[HostsView, dict[str, HostRecord]]:
    """The picture back from a `hosts_document` (for `condo wait`'s progress)."""
    hosts: dict[str, Mapping[str, Mapping[str, Any]]] = {}
    records: dict[str, HostRecord] = {}
    for host, body in document.items():
        hosts[host] = body.get("services") or {}
        runs = body.get("runs")
        if isinstance(runs, dict):
            records[host] = HostRecord(
                services=runs, live=bool(body.get("live", True)), last_seen=body.get("last_seen")
            )
    return hosts, records

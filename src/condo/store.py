"""The observable state of every service this condo runs: one writer, many readers.

Service drivers write their `ServiceState`, the supervisor writes spec errors; the state file
writer, the API, the dashboard feed and Consul read. Readers never get a backlog: they wait for
the version to move past the one they saw, then read the latest value (level-triggered, so a slow
reader can never block a driver). Each change swaps in a fresh `trio.Event` (Trio events cannot be
cleared, by design).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from condo.errors import SpecError
from condo.fsm import Instant, ServiceState
from condo.memo import PerVersion
from condo.record import StateEncoder, state_document, to_record, to_view


@attrs.frozen(kw_only=True)
class ServiceEntry:
    """What the outside sees of one service."""

    state: ServiceState
    spec_error: SpecError | None = None
    spec_file: str | None = None


# A service's state changed: (service, old state or None, new state).
Transition = Callable[[str, ServiceState | None, ServiceState], None]


def now() -> Instant:
    """This moment on both clocks (Trio's for deadlines, the wall's for display)."""
    return Instant(mono=trio.current_time(), wall=time.time())


class Store:
    """Latest-value store of service entries with change notification."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._entries: dict[str, ServiceEntry] = {}
        self._version = 0
        self._changed = trio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._transition_observers: list[Transition] = []
        self._self_deploy: Mapping[str, Any] | None = None
        self._proxy_error: Mapping[str, Any] | None = None
        self._proxy_planes: Mapping[str, str] = {}
        self._settled = False
        self._view = PerVersion(lambda: self._version, lambda _: self._build_view(now()))
        self._encoder = StateEncoder()

    @property
    def version(self) -> int:
        return self._version

    @property
    def entries(self) -> Mapping[str, ServiceEntry]:
        return self._entries

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` (synchronously, it must not block) after every change."""
        self._listeners.append(listener)

    def on_transition(self, observer: Transition) -> None:
        """Call `observer(service, old, new)` (synchronously, it must not block) after every
        change of a service's state; `old` is None for a service the store did not have."""
        self._transition_observers.append(observer)

    def set_state(self, service: str, state: ServiceState) -> None:
        before = self._entries.get(service)
        entry = before or ServiceEntry(state=state)
        self._put(service, attrs.evolve(entry, state=state))
        old = None if before is None else before.state
        if old != state:
            for observer in self._transition_observers:
                observer(service, old, state)

    def set_spec_error(self, service: str, error: SpecError | None, file: str | None) -> None:
        entry = self._entries.get(service) or ServiceEntry(state=ServiceState())
        if entry.spec_error == error and entry.spec_file == file:
            return
        self._put(service, attrs.evolve(entry, spec_error=error, spec_file=file))

    @property
    def self_deploy(self) -> Mapping[str, Any] | None:
        """The last self-deploy (`/v1/state`'s `"self"`: hash, state, error), or None."""
        return self._self_deploy

    def set_self_deploy(self, status: Mapping[str, Any] | None) -> None:
        if status != self._self_deploy:
            self._self_deploy = status
            self._bump()

    @property
    def proxy_error(self) -> Mapping[str, Any] | None:
        """Why the proxy's data plane cannot run (`/v1/state`'s `"proxy"`: error, at), or None."""
        return self._proxy_error

    def set_proxy_error(self, error: str | None) -> None:
        """The proxy task's last pass failed with `error` (None: it succeeded). The same error
        again keeps its first `at` and changes nothing."""
        if error is None and self._proxy_error is None:
            return
        if self._proxy_error is not None and self._proxy_error["error"] == error:
            return
        self._proxy_error = None if error is None else {"error": error, "at": time.time()}
        self._bump()

    def set_proxy_planes(self, planes: Mapping[str, str]) -> None:
        """Which data plane carries each listen address (`/v1/state`'s listeners' `plane`)."""
        if planes != self._proxy_planes:
            self._proxy_planes = dict(planes)
            self._bump()

    @property
    def settled(self) -> bool:
        """True once every service this host runs has an entry: every spec directory was
        listed and the engine's containers of this host were looked at (condo.supervisor).
        Before that, a service missing from the store may just not be known yet."""
        return self._settled

    def mark_settled(self) -> None:
        if not self._settled:
            self._settled = True
            self._bump()

    def drop(self, service: str) -> None:
        if self._entries.pop(service, None) is not None:
            self._bump()

    async def wait_changed(self, seen_version: int) -> int:
        """Wait until the version is past `seen_version`; return the new version."""
        while self._version <= seen_version:
            await self._changed.wait()
        return self._version

    def records(self, at: Instant | None = None) -> dict[str, Any]:
        """Every service's state file record."""
        at = at or now()
        return {name: to_record(e.state, at) for name, e in sorted(self._entries.items())}

    def state_document(self) -> dict[str, Any]:
        """The state file's whole content, as of now."""
        return state_document(self.host, self.records(), self._self_deploy)

    def state_bytes(self) -> bytes:
        """`persist.encode_state(self.state_document())`, re-encoding only the records that
        changed since the last call (the state writer's source)."""
        entries = sorted((name, e.state) for name, e in self._entries.items())
        return self._encoder.encode(self.host, entries, self._self_deploy, now())

    def view(self, at: Instant | None = None) -> dict[str, Any]:
        """The `/v1/state` body (built once per version: readers may share it, not change it)."""
        return self._view.value if at is None else self._build_view(at)

    def _build_view(self, moment: Instant) -> dict[str, Any]:
        services = {
            name: to_view(e.state, moment, e.spec_error)
            for name, e in sorted(self._entries.items())
        }
        for service in services.values():
            for listener in service["proxy"]:
                # Known once the proxy task routed it (condo.proxy.reconcile.choose_plane).
                listener["plane"] = self._proxy_planes.get(listener["listen"])
        view: dict[str, Any] = {"host": self.host, "services": services}
        if self._self_deploy is not None:
            view["self"] = dict(self._self_deploy)
        if self._proxy_error is not None:
            view["proxy"] = dict(self._proxy_error)
        return view

    def _put(self, service: str, entry: ServiceEntry) -> None:
        if self._entries.get(service) == entry:
            return
        self._entries[service] = entry
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for listener in self._listeners:
            listener()

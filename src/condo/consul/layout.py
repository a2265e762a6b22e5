"""Where condo's state lives in Consul's KV store, and what the values look like. Pure: no I/O.

Layout (under the `--consul-prefix`, default `condo`)::

    <prefix>/<service>/<host>   →  {"host": H, "service": NAME, "state": SERVICE,
                                    "version": condo's version, "at": unix seconds}
    <prefix>/.live/<host>       →  {"host": H, "version", "at"}      held by the host's session
    <prefix>/.hosts/<host>      →  {"host": H, "services": {NAME: {"state", "image"}},
                                    "version", "at"}                 no session: outlives it

- The service keys and `.live/<host>` are held by the host's session: they say what the host
  runs *now*, and that it is alive. `.hosts/<host>` is the host's record: what it last said it
  runs, kept when its session ends (a partition, a killed condo, a dead agent), so that a host
  that cannot be seen is "unreachable", never "does not run it". Only the host itself changes
  its record (a service leaves it when its spec is removed), or `condo forget HOST`.
- Service names start with a letter or a digit, so `.live` and `.hosts` are never services.

- `<prefix>` has no leading or trailing `/` (`/condo/` is read as `condo`); it may itself hold
  `/` (`team/condo`). Everything under `<prefix>/` that does not have exactly two more segments,
  or whose value does not decode, or whose value names another key, is foreign: readers skip it.
- `SERVICE` is the `/v1/state` object of that service (doc/contract.md); `at` is when that host
  wrote it (wall clock, display only).
- Every key is held (`?acquire=`) by its host's session (`Behavior: delete`): when the host's condo
  dies its keys vanish within 2 x TTL; on a clean shutdown at once.

Service-first order lets `/v1/wait_for` read one service of every host with one prefix query, and
an operator list the hosts of a service with `consul kv get -recurse <prefix>/<service>/`.

Invariant: `decode_value(key, encode_value(...))` gives back exactly what was encoded, for every
service and host name condo accepts (any name without `/`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

import condo
from condo.errors import ConfigError

LIVE = ".live"  # <prefix>/.live/<host>: the host's session is alive
RECORDS = ".hosts"  # <prefix>/.hosts/<host>: what the host last said it runs


@attrs.frozen
class KeyLayout:
    """The keys of one prefix. Build it with `KeyLayout.of(prefix)`, which normalises and checks."""

    prefix: str

    @classmethod
    def of(cls, prefix: str) -> KeyLayout:
        normal = prefix.strip().strip("/")
        if not normal:
            # An empty prefix would make the watcher read (and the takeover judge) the whole KV.
            raise ConfigError(f"--consul-prefix {prefix!r}: must name a folder, e.g. condo")
        if any(part in ("", ".", "..") for part in normal.split("/")):
            raise ConfigError(f"--consul-prefix {prefix!r}: empty, . or .. path segment")
        return cls(normal)

    @property
    def folder(self) -> str:
        """What every key of this layout starts with (the blocking query's prefix)."""
        return f"{self.prefix}/"

    def key(self, service: str, host: str) -> str:
        return f"{self.prefix}/{service}/{host}"

    def live_key(self, host: str) -> str:
        return f"{self.prefix}/{LIVE}/{host}"

    def record_key(self, host: str) -> str:
        return f"{self.prefix}/{RECORDS}/{host}"

    def session_name(self, host: str) -> str:
        """What the session of `host`'s condo is called: names the host and the prefix."""
        return f"condo:{self.prefix}:{host}"

    def parse(self, key: str) -> tuple[str, str] | None:
        """`<prefix>/<service>/<host>` → (service, host), `.live/<host>` → (LIVE, host),
        `.hosts/<host>` → (RECORDS, host); None for any other key."""
        if not key.startswith(self.folder):
            return None
        parts = key[len(self.folder) :].split("/")
        if len(parts) != 2 or not all(parts):
            return None
        return parts[0], parts[1]


def check_name(what: str, name: str) -> None:
    """A host or service name must be one key segment (no `/`, not empty)."""
    if not name or "/" in name:
        raise ConfigError(f"{what} {name!r} cannot be a Consul key segment (empty or has '/')")


@attrs.frozen(kw_only=True)
class Published:
    """One decoded value: what `host` said about `service` at `at`."""

    host: str
    service: str
    state: Mapping[str, Any]
    version: str
    at: float


def encode_value(host: str, service: str, state: Mapping[str, Any], at: float) -> bytes:
    """The bytes stored at `<prefix>/<service>/<host>`."""
    document = {
        "host": host,
        "service": service,
        "state": state,
        "version": condo.__version__,
        "at": at,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class ForeignValue(ValueError):
    """A value under the prefix that condo did not write (or that another version broke)."""


# The fields of a SERVICE that readers of the picture look into (condo.waiting.evaluate).
OBJECT_FIELDS = ("current", "error", "reverted")


def decode_value(layout: KeyLayout, key: str, raw: bytes | None) -> Published:
    """The value at `key`, checked against the key itself; raises ForeignValue otherwise."""
    where = layout.parse(key)
    if where is None:
        raise ForeignValue("not a <prefix>/<service>/<host> key")
    document = _object(raw)
    host, service, state = document.get("host"), document.get("service"), document.get("state")
    if not isinstance(host, str) or not isinstance(service, str):
        raise ForeignValue("no host or service name")
    if (service, host) != where:
        # A value copied to another key would count one host twice, or a host that is gone.
        raise ForeignValue(f"names {service}/{host}, not its own key")
    if not isinstance(state, dict) or not isinstance(state.get("state"), str):
        raise ForeignValue("no service state")
    for name in OBJECT_FIELDS:
        if not isinstance(state.get(name), dict | None):
            # condo.waiting reads into them: one such key would fail every wait on its service.
            raise ForeignValue(f"the service state's {name} is not an object")
    at = document.get("at")
    version = document.get("version")
    return Published(
        host=host,
        service=service,
        state=state,
        version=version if isinstance(version, str) else "",
        at=_number(at),
    )


@attrs.frozen(kw_only=True)
class Record:
    """A host's record (`.hosts/<host>`): what it last said it runs, and when it said it."""

    host: str
    services: Mapping[str, Mapping[str, Any]]  # service -> {"state", "image"}
    at: float


def summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a record keeps of one SERVICE view: enough to say what ran there."""
    current = state.get("current") or {}
    return {"state": state.get("state"), "image": current.get("image")}


def encode_record(host: str, services: Mapping[str, Mapping[str, Any]], at: float) -> bytes:
    document = {"host": host, "services": services, "version": condo.__version__, "at": at}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def encode_live(host: str, at: float) -> bytes:
    document = {"host": host, "version": condo.__version__, "at": at}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def decode_record(layout: KeyLayout, key: str, raw: bytes | None) -> Record:
    """The record at `key` (`.hosts/<host>`); raises ForeignValue otherwise."""
    where = layout.parse(key)
    if where is None or where[0] != RECORDS:
        raise ForeignValue("not a <prefix>/.hosts/<host> key")
    document = _object(raw)
    if document.get("host") != where[1]:
        raise ForeignValue("names another host than its key")
    services = document.get("services")
    if not isinstance(services, dict) or not all(
        isinstance(name, str) and isinstance(value, dict) for name, value in services.items()
    ):
        raise ForeignValue("no services object")
    return Record(host=where[1], services=services, at=_number(document.get("at")))


def _object(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise ForeignValue("empty value")
    try:
        document = json.loads(raw)
    except ValueError:  # JSON or UTF-8 errors alike: somebody else's bytes
        raise ForeignValue("not JSON") from None
    if not isinstance(document, dict):
        raise ForeignValue("not a JSON object")
    return document


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

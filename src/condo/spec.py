"""Spec files: parse and validate one file's bytes into a frozen value, or a SpecError.

This module is pure (no I/O, no trio, no httpx; import-linter enforces it). It says what a condo
spec is; reading EDN text, with the places of its parts and problems, is `condo.edn`'s. It owns:

* the file's bytes → text rules (size, NUL, UTF-8) and the one-map-per-file rule;
* the EDN → JSON conversion of the `:spec` map, the Docker create-container body;
* every validation rule for a service spec (`<service>.edn`) and for condo's own `self.edn`;
* spec identity: `ServiceSpec` equality is semantic (comments, whitespace and key order do not
  matter) and `ServiceSpec.container_hash` is the one fingerprint that decides a redeploy; every
  other key (`ServiceSpec.options_json`) is adopted in place.

Invariants:

* `parse_spec` / `parse_self_spec` raise nothing but `SpecError`, whatever the bytes, with the
  1-based line where the problem can be found when there is one. `condo.edn` raises nothing but
  `EdnError`; it becomes a SpecError here, once, in condo's words where they differ.
* A `container` body is plain JSON (dict/list/str/int/float/bool/None, str keys, finite floats,
  at most `MAX_DEPTH` levels deep) without `Name`: Docker's create takes the name as a query
  parameter, so a fixed name lives in `fixed_name`. Treat `container` as read-only.
* EDN sets become lists sorted by their elements' canonical JSON, so a spec's JSON (and its hash)
  does not depend on Python's per-process hash seed.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import difflib
import fractions
import functools
import hashlib
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, Final, Literal, get_args

import attrs

from condo import edn
from condo.edn import Keyword, Symbol
from condo.errors import SpecError

MAX_SPEC_BYTES: int = 1 << 20
MAX_DEPTH: Final = 64
"""Deepest nesting of collections a spec file may use (a real spec needs about 6)."""

DEFAULT_HEALTH_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 10.0
MAX_SERVICE_NAME = 200
RESERVED_LABEL_PREFIX: Final = "condo."

PullPolicy = Literal["always", "missing", "never"]
PULL_POLICIES: Final[tuple[PullPolicy, ...]] = get_args(PullPolicy)

OnFailure = Literal["retry", "revert"]
ON_FAILURES: Final[tuple[OnFailure, ...]] = get_args(OnFailure)

ProxyMode = Literal["tcp", "http"]
PROXY_MODES: Final[tuple[ProxyMode, ...]] = get_args(ProxyMode)
PROXY_BIND_HOST: Final = "127.0.0.1"
"""Where a proxied container publishes its port (an ephemeral host port): loopback only."""
_PROXY_KEYS: Final = ("listen", "port", "mode")

JsonObject = dict[str, Any]
"""Plain JSON, what Docker gets."""

STORED_SPEC_FILE: Final = "<stored spec>"
"""The `file` of a SpecError raised by `ServiceSpec.from_json`."""

_SERVICE_NAME_RE: Final = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# Docker's own rule (moby daemon/names): at least two characters.
_CONTAINER_NAME_RE: Final = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")

# Top-level keys of a service spec; anything else is a typo worth an error.
_SERVICE_KEYS: Final = (
    "spec",
    "deploy",
    "health-timeout",
    "stop-timeout",
    "stable-after",
    "pull",
    "on-failure",
    "probation",
    "proxy",
)
# Keys of the create body that condo itself reads. Docker matches JSON keys case-insensitively,
# so `:labels` would reach Docker as Labels while escaping condo's checks: demand the exact case.
_READ_KEYS: Final = {"image": "Image", "name": "Name", "labels": "Labels", "env": "Env"}


# --- values -------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """The one JSON text of a plain JSON value: sorted keys, compact, ASCII, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


def _non_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


@attrs.frozen
class DeployStrategy:
    """How a new container replaces the stable one.

    `Before`: stop the old container, then start the new one. `After`: start the new one, wait
    until it is healthy, wait `delay` more seconds, then stop the old one.
    """

    strategy: Literal["Before", "After"]
    delay: float = attrs.field(default=0.0, converter=float, validator=_non_negative)

    def to_json(self) -> list[Any]:
        return ["Before"] if self.strategy == "Before" else ["After", self.delay]


def _body(container: JsonObject, fixed_name: str | None) -> JsonObject:
    return container if fixed_name is None else {**container, "Name": fixed_name}


@attrs.frozen
class ProxyListener:
    """One `:proxy` listener: the proxy listens on `host:port` (`host` "" = every interface)
    and forwards each connection to the Stable container's `target` port."""

    host: str
    port: int
    target: int
    mode: ProxyMode = "tcp"
    line: int | None = attrs.field(default=None, eq=False)  # where the spec file names it

    def clashes(self, other: ProxyListener) -> bool:
        """Both cannot listen at once: one port, and one host or either on every interface."""
        return self.port == other.port and (
            not self.host or not other.host or self.host == other.host
        )

    @property
    def listen(self) -> str:
        """`[HOST:]PORT` as the spec writes it (an IPv6 host in brackets)."""
        if not self.host:
            return str(self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_json(self) -> JsonObject:
        return {"listen": self.listen, "port": self.target, "mode": self.mode}


def _with_proxy_ports(container: JsonObject, proxy: tuple[ProxyListener, ...]) -> JsonObject:
    """`container` plus, for each proxied port, a binding on 127.0.0.1 to an ephemeral host port
    (the proxy's way in: never the bridge address) and its ExposedPorts entry."""
    if not proxy:
        return container
    body = copy.deepcopy(container)
    exposed = body.setdefault("ExposedPorts", {})
    host_config = body.setdefault("HostConfig", {})
    bindings = host_config.setdefault("PortBindings", {})
    for target in sorted({listener.target for listener in proxy}):
        key = f"{target}/tcp"
        if not isinstance(exposed, dict) or not isinstance(bindings, dict):
            break  # a malformed body: the engine will say so, with its own words
        exposed.setdefault(key, {})
        wanted = {"HostIp": PROXY_BIND_HOST, "HostPort": ""}
        existing = bindings.get(key)
        entries = list(existing) if isinstance(existing, list) else []
        if wanted not in entries:
            entries.append(wanted)
        bindings[key] = entries
    return body


def _is_floating(image: str) -> bool:
    """True when `image` names no tag or `latest`: what it means can change under condo."""
    if "@" in image:  # a digest pins the content, whatever the tag says
        return False
    last = image.rsplit("/", 1)[-1]  # a registry host:port colon comes before a slash
    return ":" not in last or last.split(":", 1)[1] == "latest"


@attrs.frozen(kw_only=True)
class ServiceSpec:
    """One valid `<service>.edn`: the create body plus condo's own options.

    Equality (and hashing) looks at `container` through its canonical JSON, so it is semantic.
    """

    container: JsonObject = attrs.field(eq=canonical_json)
    fixed_name: str | None = None
    deploy: DeployStrategy = DeployStrategy("Before")
    health_timeout: float = attrs.field(
        default=DEFAULT_HEALTH_TIMEOUT, converter=float, validator=_non_negative
    )
    stop_timeout: float = attrs.field(
        default=DEFAULT_STOP_TIMEOUT, converter=float, validator=_non_negative
    )
    stable_after: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    pull: PullPolicy | None = None
    # What a failed deploy does: `retry` with backoff, or `revert` to the last good spec.
    on_failure: OnFailure = "retry"
    # Seconds a new container must stay running (and healthy) after it turned Stable before
    # its deploy counts as good.
    probation: float = attrs.field(default=0.0, converter=float, validator=_non_negative)
    # `:proxy`: the listeners of condo's proxy that lead to this service's Stable container.
    proxy: tuple[ProxyListener, ...] = ()

    @property
    def image(self) -> str:
        image = self.container["Image"]
        assert isinstance(image, str)  # parse_spec and from_json guarantee it
        return image

    @functools.cached_property  # computed once: the value is frozen (container is read-only)
    def container_hash(self) -> str:
        """Hex sha256 of the canonical create body (with `Name`): what decides a redeploy.

        `deploy`, the timeouts, `on_failure` and `probation` do not enter it: changing them never
        replaces a container.
        """
        return _sha256(_body(self.create_body, self.fixed_name))

    @functools.cached_property
    def create_body(self) -> JsonObject:
        """`container` as the engine gets it: with `:proxy`, each proxied port is also published
        on 127.0.0.1 to an ephemeral host port. Read-only, like `container`."""
        return _with_proxy_ports(self.container, self.proxy)

    @functools.cached_property
    def warnings(self) -> tuple[str, ...]:
        """What is valid but will not work as the file hopes (`condo validate`, /v1/state)."""
        if self.deploy.strategy != "After" or self.proxy:
            return ()
        fixed = sorted(_fixed_host_ports(self.container))
        if not fixed:
            return ()
        return (
            f"[:After n] starts the new container beside the old one, but both cannot bind the"
            f" fixed host port{'s' if len(fixed) > 1 else ''} {', '.join(fixed)}: the new one"
            ' will fail to start; use :proxy (e.g. :proxy [{:listen "8080" :port 80}]) and'
            " drop the HostPort",
        )

    # Computed once, like container_hash: every /v1/state view of every service shows both, and
    # the views are rebuilt for all services on any change (readers share them, never change them).
    @functools.cached_property
    def field_hashes(self) -> dict[str, str]:
        """16 hex chars of each top-level key of the create body (with `Name`): which parts of
        the container differ between two specs, without saying what they hold (Env, Labels)."""
        body = _body(self.create_body, self.fixed_name)
        return {key: _sha256([key, value])[:16] for key, value in body.items()}

    @functools.cached_property
    def options_json(self) -> JsonObject:
        """`to_json` without the create body: the keys that never replace a container."""
        options = self.to_json()
        del options["spec"]
        return options

    def effective_pull(self) -> PullPolicy:
        """`pull` if set, else `always` for a floating tag (none or `latest`), else `missing`;
        `never` for an image id (`sha256:…`, what a revert pins an image without a registry
        digest to): no registry has it by that name, and the engine would read it as the Docker
        Hub repository `sha256`."""
        if self.image.startswith("sha256:"):
            return "never"
        if self.pull is not None:
            return self.pull
        return "always" if _is_floating(self.image) else "missing"

    def to_json(self) -> JsonObject:
        """The spec as JSON (state file, API); `from_json` reads it back.

        The shape extends the original condo's (`spec`, `deploy`, `health_timeout`,
        `stop_timeout`), so `from_json` also reads the original's state files.
        """
        shape: JsonObject = {
            "spec": copy.deepcopy(_body(self.container, self.fixed_name)),
            "deploy": self.deploy.to_json(),
            "health_timeout": self.health_timeout,
            "stop_timeout": self.stop_timeout,
            "stable_after": self.stable_after,
            "pull": self.pull,
            "on_failure": self.on_failure,
            "probation": self.probation,
        }
        if self.proxy:  # only when set: specs without it keep the shape older condos wrote
            shape["proxy"] = [listener.to_json() for listener in self.proxy]
        return shape

    @classmethod
    def from_json(cls, data: object, *, file: str = STORED_SPEC_FILE) -> ServiceSpec:
        """The inverse of `to_json`; raises SpecError (without a line) on anything else.

        Missing optional keys take their defaults and unknown keys are ignored, so state files
        written by older or newer versions still load.
        """
        return _service_from_json(data, file)


@attrs.frozen
class SelfSpec:
    """A valid `self.edn`: the bare create body of condo's own container.

    `hash` (16 hex chars of the canonical body's sha256) is what `CONDO_SELF` carries.
    """

    container: JsonObject = attrs.field(eq=canonical_json)
    hash: str
    fixed_name: str | None = None


def check_service_name(name: str) -> str | None:
    """None when `name` can prefix container names (`<service>_<suffix>`), else why not."""
    if not name:
        return "the service name is empty"
    if len(name) > MAX_SERVICE_NAME:
        return f"the service name is {len(name)} characters long, more than {MAX_SERVICE_NAME}"
    if not _SERVICE_NAME_RE.fullmatch(name):
        return (
            f"the service name {name!r} cannot prefix a Docker container name: use letters,"
            " digits, '_', '.' and '-', starting with a letter or a digit"
        )
    return None


# --- entry points -------------------------------------------------------------------------------


def parse_spec(data: bytes, file: str) -> ServiceSpec:
    """Parse and validate a service spec file's bytes. Raises SpecError only."""
    src = _Source(file, _decode(data, file))
    form = src.read_one_form()
    if not isinstance(form, Mapping):
        raise src.error(
            f"the top level must be a map like {{:spec {{:Image ...}}}}, found {edn.describe(form)}"
        )
    options: dict[str, Any] = {}
    for raw_key, value in form.items():
        key = edn.unwrap(raw_key)
        if not (isinstance(key, Keyword) and key.name in _SERVICE_KEYS):
            raise src.error(_unknown_key_message(key), (_key_text(key),))
        options[key.name] = edn.unwrap(value)

    if "spec" not in options:
        raise src.error("missing :spec, the map with the Docker create-container body")
    if not isinstance(options["spec"], Mapping):
        raise src.error(
            ":spec must be a map (the Docker create-container body),"
            f" found {edn.describe(options['spec'])}",
            ("spec",),
        )
    body = src.to_plain(options["spec"], ("spec",))
    fixed_name, container = _check_container(body, ("spec",), src.error)
    return ServiceSpec(
        container=container,
        fixed_name=fixed_name,
        deploy=_check_deploy(options.get("deploy"), src.option_error("deploy")),
        health_timeout=_check_seconds(
            options.get("health-timeout"),
            DEFAULT_HEALTH_TIMEOUT,
            src.option_error("health-timeout"),
        ),
        stop_timeout=_check_seconds(
            options.get("stop-timeout"), DEFAULT_STOP_TIMEOUT, src.option_error("stop-timeout")
        ),
        stable_after=_check_seconds(
            options.get("stable-after"), 0.0, src.option_error("stable-after")
        ),
        pull=_check_pull(options.get("pull"), src.option_error("pull")),
        on_failure=_check_on_failure(options.get("on-failure"), src.option_error("on-failure")),
        probation=_check_seconds(options.get("probation"), 0.0, src.option_error("probation")),
        proxy=_check_proxy(
            src.to_plain(options["proxy"], ("proxy",)) if "proxy" in options else None,
            container,
            src.error,
        ),
    )


def parse_self_spec(data: bytes, file: str) -> SelfSpec:
    """Parse and validate `self.edn`, a bare create body (no `:spec` wrapper). SpecError only."""
    src = _Source(file, _decode(data, file))
    form = src.read_one_form()
    if not isinstance(form, Mapping):
        raise src.error(
            f"self.edn must be a map, the bare create-container body like {{:Image ...}},"
            f" found {edn.describe(form)}"
        )
    body = src.to_plain(form, ())
    if "spec" in body and "Image" not in body:
        raise src.error(
            "self.edn is a bare create-container body: put :Image and the rest at the top"
            " level, without the :spec wrapper (and without :deploy or timeouts)",
            ("spec",),
        )
    fixed_name, container = _check_container(body, (), src.error)
    return SelfSpec(container, _sha256(_body(container, fixed_name))[:16], fixed_name)


# --- validation shared by EDN files and stored JSON ----------------------------------------------

KeyPath = tuple[str | int, ...]
Fail = Callable[[str, KeyPath], SpecError]


def _check_container(body: JsonObject, at: KeyPath, fail: Fail) -> tuple[str | None, JsonObject]:
    """Check what condo reads of a plain create body; return (fixed name, body without Name)."""
    where = _show_path(at) + " " if at else ""
    for key in body:
        exact = _READ_KEYS.get(key.lower())
        if exact is not None and key != exact:
            raise fail(
                f"write {where}:{exact}, not {_show_key(key)} (condo reads these keys with this"
                " exact case)",
                (*at, key),
            )
    if "Image" not in body:
        close = difflib.get_close_matches("Image", list(body), n=1, cutoff=0.6)
        hint = f" (is {_show_key(close[0])} a typo?)" if close else ""
        raise fail(
            f'missing {where}:Image, the image to run (e.g. "registry/app:1.2"){hint}',
            (*at, close[0]) if close else at,
        )
    image = body["Image"]
    if not isinstance(image, str):
        raise fail(f"{where}:Image must be a string, found {edn.describe(image)}", (*at, "Image"))
    if not image.strip():
        raise fail(f"{where}:Image is empty", (*at, "Image"))
    if any(c.isspace() for c in image):
        raise fail(f"{where}:Image {image!r} contains whitespace", (*at, "Image"))

    container = dict(body)
    name = container.pop("Name", None)
    if name is not None:
        if not isinstance(name, str):
            raise fail(f"{where}:Name must be a string, found {edn.describe(name)}", (*at, "Name"))
        if not _CONTAINER_NAME_RE.fullmatch(name):
            raise fail(
                f"{where}:Name {name!r} is not a valid Docker container name: at least two of"
                " letters, digits, '_', '.' and '-', starting with a letter or a digit",
                (*at, "Name"),
            )

    # Labels and Env values may be secrets (never shown by the API, the feed or Consul): their
    # errors say what kind of value was found, never the value, since a spec error goes there.
    labels = container.get("Labels")
    if labels is not None:
        if not isinstance(labels, dict):
            raise fail(
                f"{where}:Labels must be a map of strings to strings, found {edn.kind(labels)}",
                (*at, "Labels"),
            )
        for label, value in labels.items():
            if label.lower().startswith(RESERVED_LABEL_PREFIX):
                raise fail(
                    f"{where}:Labels {_show_key(label)} uses the reserved prefix"
                    f" {RESERVED_LABEL_PREFIX!r}: condo sets its own condo.* labels"
                    " (condo.service, condo.host, ...)",
                    (*at, "Labels", label),
                )
            if not isinstance(value, str):
                raise fail(
                    f"{where}:Labels {_show_key(label)} must have a string value, found"
                    f" {edn.kind(value)}",
                    (*at, "Labels", label),
                )

    env = container.get("Env")
    if env is not None:
        if not isinstance(env, list):
            raise fail(
                f'{where}:Env must be a vector of "KEY=value" strings, found {edn.kind(env)}',
                (*at, "Env"),
            )
        for index, item in enumerate(env):
            if not isinstance(item, str):
                raise fail(
                    f'{where}:Env must hold "KEY=value" strings, found {edn.kind(item)}',
                    (*at, "Env", index),
                )
    return name, container


OptionFail = Callable[[str], SpecError]


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `:stop-timeout true` is a mistake, not a 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_deploy(value: Any, fail: OptionFail) -> DeployStrategy:
    if value is None:
        return DeployStrategy("Before")
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [edn.unwrap(item) for item in value]
        if items == [Keyword("Before")]:
            return DeployStrategy("Before")
        if len(items) == 2 and items[0] == Keyword("After"):
            delay = items[1]
            if _is_number(delay) and math.isfinite(delay) and delay >= 0:
                return DeployStrategy("After", float(delay))
    raise fail(
        f"must be [:Before] or [:After n] with n seconds >= 0 to wait once the new container"
        f" is healthy, found {edn.show(value)}"
    )


def _check_seconds(value: Any, default: float, fail: OptionFail) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise fail(f"must be a number of seconds, found {edn.show(value)} (a boolean)")
    if not _is_number(value):
        raise fail(f"must be a number of seconds, found {edn.describe(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise fail(f"must be a finite number of seconds >= 0, found {edn.show(value)}")
    return float(value)


def _check_pull(value: Any, fail: OptionFail) -> PullPolicy | None:
    if value is None:
        return None
    for policy in PULL_POLICIES:
        if value == Keyword(policy):
            return policy
    raise fail(f"must be one of :always, :missing or :never, found {edn.show(value)}")


def _check_on_failure(value: Any, fail: OptionFail) -> OnFailure:
    if value is None:
        return "retry"
    for choice in ON_FAILURES:
        if value == Keyword(choice):
            return choice
    raise fail(f"must be :retry or :revert, found {edn.show(value)}")


def _fixed_host_ports(container: JsonObject) -> set[str]:
    """The fixed host ports `HostConfig.PortBindings` publishes, as "[IP:]PORT" ("" and "0"
    are ephemeral, not fixed)."""
    host_config = container.get("HostConfig")
    bindings = host_config.get("PortBindings") if isinstance(host_config, dict) else None
    found: set[str] = set()
    if not isinstance(bindings, dict):
        return found
    for entries in bindings.values():
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            port = str(entry.get("HostPort") or "").strip()
            if port in ("", "0"):
                continue
            ip = str(entry.get("HostIp") or "")
            found.add(f"{ip}:{port}" if ip not in ("", "0.0.0.0", "::") else port)
    return found


def _overlaps(listener: ProxyListener, published: str) -> bool:
    """Whether a fixed host binding "[IP:]PORT" takes the listener's address."""
    ip, _, port = published.rpartition(":")
    if port != str(listener.port):
        return False
    ip = ip.strip("[]")
    return not ip or not listener.host or ip == listener.host


def _parse_listen(value: object) -> tuple[str, int] | None:
    """`"[HOST:]PORT"` (HOST an IP literal, IPv6 in brackets) or a bare port number."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not sep:
        host = ""
    elif bracketed:
        host = host[1:-1]
    # ASCII digits: int() reads other scripts' digits too.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        return None
    if host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        # IPv6 in brackets only ("::1:8080" is an address itself), and with no zone
        # ("%eth0"): HAProxy refuses it, and with it the whole config, every listener's.
        if isinstance(address, ipaddress.IPv6Address) and (not bracketed or address.scope_id):
            return None
        host = str(address)
    return host, int(port_text)


def _check_proxy(value: object, container: JsonObject, fail: Fail) -> tuple[ProxyListener, ...]:
    """`:proxy`, already plain JSON: a vector of `{:listen "[HOST:]PORT" :port N :mode M}`.

    A listen address twice in the vector, or also published by the body's own PortBindings, is
    an error (the proxy and the container cannot both bind it)."""
    if value is None:
        return ()
    example = '[{:listen "127.0.0.1:8080" :port 80}]'
    if not isinstance(value, list):
        raise fail(f":proxy must be a vector of listeners like {example}", ("proxy",))
    published = _fixed_host_ports(container)
    listeners: list[ProxyListener] = []
    for index, item in enumerate(value):
        at: KeyPath = ("proxy", index)
        if not isinstance(item, dict):
            raise fail(f":proxy [{index}] must be a map like {example[1:-1]}", at)
        for key in item:
            if key not in _PROXY_KEYS:
                raise fail(
                    f":proxy [{index}] has the unknown key {_show_key(key)}; the keys are"
                    " :listen, :port and :mode",
                    (*at, key),
                )
        listen = _parse_listen(item.get("listen"))
        if listen is None:
            raise fail(
                f':proxy [{index}] :listen must be "[HOST:]PORT" (HOST an IP address, PORT'
                f" 1-65535), found {json.dumps(item.get('listen'))}",
                (*at, "listen") if "listen" in item else at,
            )
        target = item.get("port")
        if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= 65535:
            raise fail(
                f":proxy [{index}] :port must be the container's port, 1-65535, found"
                f" {json.dumps(target)}",
                (*at, "port") if "port" in item else at,
            )
        mode = item.get("mode", "tcp")
        if mode not in PROXY_MODES:
            raise fail(
                f":proxy [{index}] :mode must be :tcp or :http, found {json.dumps(mode)}",
                (*at, "mode"),
            )
        line = fail("", (*at, "listen") if "listen" in item else at).line
        listener = ProxyListener(listen[0], listen[1], target, mode, line)
        for other in listeners:
            if listener.clashes(other):
                raise fail(
                    f":proxy [{index}] :listen {listener.listen} is also {other.listen}, an"
                    " earlier listener of this spec",
                    (*at, "listen"),
                )
        for binding in sorted(published):
            if _overlaps(listener, binding):
                raise fail(
                    f":proxy [{index}] :listen {listener.listen} is also published by"
                    f" :HostConfig :PortBindings ({binding}): the proxy listens there; drop"
                    " that HostPort",
                    (*at, "listen"),
                )
        listeners.append(listener)
    return tuple(listeners)


def shared_listener_errors(specs: Mapping[str, tuple[str, ServiceSpec]]) -> dict[str, SpecError]:
    """Services (name → (file, spec)) whose `:proxy` listen addresses clash with another's: an
    error for each, at its listener's line, naming the other's file."""
    errors: dict[str, SpecError] = {}
    ordered = sorted(specs.items())
    for index, (name, (file, spec)) in enumerate(ordered):
        for other_name, (other_file, other) in ordered[index + 1 :]:
            for mine in spec.proxy:
                theirs = next((t for t in other.proxy if mine.clashes(t)), None)
                if theirs is None:
                    continue
                for who, where, listener, rival_file in (
                    (name, file, mine, other_file),
                    (other_name, other_file, theirs, file),
                ):
                    message = (
                        f":proxy :listen {listener.listen} is also a listener in {rival_file}:"
                        " a listen address belongs to one service"
                    )
                    errors.setdefault(who, SpecError(where, message, listener.line))
    return errors


def _service_from_json(data: object, file: str) -> ServiceSpec:
    def fail(message: str, _at: KeyPath = ()) -> SpecError:
        return SpecError(file, message)

    def option_fail(key: str) -> OptionFail:
        return lambda message: SpecError(file, f"{key} {message}")

    if not isinstance(data, dict):
        raise fail(f"a stored spec must be a JSON object, found {edn.describe(data)}")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise fail(f'a stored spec needs a "spec" object, found {edn.describe(spec)}')
    _check_plain(spec, ("spec",), fail)
    fixed_name, container = _check_container(spec, ("spec",), fail)

    deploy_value = data.get("deploy")
    if isinstance(deploy_value, list) and deploy_value and isinstance(deploy_value[0], str):
        deploy_value = [Keyword(deploy_value[0]), *deploy_value[1:]]
    pull = data.get("pull")
    on_failure = data.get("on_failure")
    return ServiceSpec(
        container=container,
        fixed_name=fixed_name,
        deploy=_check_deploy(deploy_value, option_fail("deploy")),
        health_timeout=_check_seconds(
            data.get("health_timeout"), DEFAULT_HEALTH_TIMEOUT, option_fail("health_timeout")
        ),
        stop_timeout=_check_seconds(
            data.get("stop_timeout"), DEFAULT_STOP_TIMEOUT, option_fail("stop_timeout")
        ),
        stable_after=_check_seconds(data.get("stable_after"), 0.0, option_fail("stable_after")),
        pull=_check_pull(Keyword(pull) if isinstance(pull, str) else pull, option_fail("pull")),
        on_failure=_check_on_failure(
            Keyword(on_failure) if isinstance(on_failure, str) else on_failure,
            option_fail("on_failure"),
        ),
        probation=_check_seconds(data.get("probation"), 0.0, option_fail("probation")),
        proxy=_check_proxy(data.get("proxy"), container, fail),
    )


def _check_plain(value: object, at: KeyPath, fail: Fail) -> None:
    """Raise unless `value` is plain JSON no deeper than MAX_DEPTH (stored specs are input too)."""
    stack: list[tuple[object, KeyPath]] = [(value, at)]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise fail(f"{_show_path(path)} is nested deeper than {MAX_DEPTH} levels", path)
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise fail(f"{_show_path(path)} has a non-string key {key!r}", path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise fail(f"{_show_path(path)} is not a finite number", path)
        elif item is not None and not isinstance(item, (str, int, bool)):
            raise fail(f"{_show_path(path)} is not JSON ({type(item).__name__})", path)


# --- reading the file -----------------------------------------------------------------------------


def _decode(data: bytes, file: str) -> str:
    """The file's text, or SpecError for what is not a small UTF-8 text file."""
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(file, f"the file is larger than {MAX_SPEC_BYTES} bytes; not a spec")
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(
            file,
            "the file contains a NUL byte: binary data, not a spec",
            data.count(b"\n", 0, nul) + 1,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # the position of the first bad byte gives the line
        raise SpecError(
            file,
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded)",
            data.count(b"\n", 0, exc.start) + 1,
        ) from None
    return text


class _Source:
    """One file while it is being read: its EDN document, and SpecErrors at the right line."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.document: edn.Document | None = None

    def error(self, message: str, at: KeyPath = ()) -> SpecError:
        """A SpecError at the deepest part of key path `at` that can be found in the text."""
        found = None if self.document is None else self.document.locate(at)
        return SpecError(self.file, message, None if found is None else found.line)

    def option_error(self, key: str) -> OptionFail:
        return lambda message: self.error(f":{key} {message}", (key,))

    def read_one_form(self) -> Any:
        """The file's one top-level form, or SpecError in condo's words."""
        try:
            self.document = edn.read_document(self.text, max_depth=MAX_DEPTH, one=True)
        except edn.NotOneValue as exc:
            if exc.blank:
                raise SpecError(self.file, "the file is empty") from None
            if not exc.count:
                raise SpecError(
                    self.file, "the file holds only comments or discarded forms (#_)"
                ) from None
            raise SpecError(
                self.file,
                f"the file holds {exc.count} top-level forms; a spec is exactly one map",
                exc.line,
            ) from None
        except edn.UnknownTag as exc:
            raise SpecError(
                self.file,
                f"unknown tag #{exc.tag} (EDN tags condo understands: #inst, #uuid)",
                exc.line,
            ) from None
        except edn.EdnError as exc:
            raise SpecError(self.file, exc.message, exc.line) from None
        return edn.unwrap(self.document.forms[0])

    def to_plain(self, value: Any, at: KeyPath) -> Any:
        """EDN → plain JSON, as Docker wants it.

        Keywords and symbols become their names (`:ns/name` → "ns/name") as keys and values;
        vectors, lists and sets become lists (sets sorted by canonical JSON); chars, #inst,
        #uuid, decimals (1.5M) and ratios become strings; ^metadata is dropped.
        """
        value = edn.unwrap(value)
        if len(at) > MAX_DEPTH + 1:
            raise self.error(f"{_show_path(at)} is nested deeper than {MAX_DEPTH} levels", at)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape is not text
                raise self.error(
                    f"{_show_path(at)} holds an invalid \\u escape (a lone surrogate)", at
                ) from None
            return str(value)  # Char is a str subclass; JSON wants the plain type
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(
                    f"{_show_path(at)} is {value}, not a finite number: JSON cannot carry it", at
                )
            return value
        if isinstance(value, (Keyword, Symbol)):
            return str(value.name)
        if isinstance(value, (decimal.Decimal, fractions.Fraction, uuid.UUID)):
            return str(value)
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()
        if isinstance(value, Mapping):
            return self._map_to_plain(value, at)
        if isinstance(value, Set):
            items = [self.to_plain(item, (*at, 0)) for item in value]
            return sorted(items, key=canonical_json)
        if isinstance(value, Sequence):
            return [self.to_plain(item, (*at, index)) for index, item in enumerate(value)]
        raise self.error(
            f"{_show_path(at)} holds {edn.describe(value)}, which JSON cannot carry", at
        )

    def _map_to_plain(self, value: Mapping[Any, Any], at: KeyPath) -> JsonObject:
        plain: JsonObject = {}
        for raw_key, item in value.items():
            key = edn.unwrap(raw_key)
            if isinstance(key, (Keyword, Symbol)):
                name = str(key.name)
            elif isinstance(key, str):
                name = str(key)
            else:
                raise self.error(
                    f"{_show_path(at) or 'the map'} has the key {edn.show(key)}: keys must be"
                    " keywords or strings",
                    at,
                )
            if name in plain:
                raise self.error(
                    f"{_show_path(at) or 'the map'} has the key {_show_key(name)} twice (e.g."
                    " as a keyword and as a string)",
                    (*at, name),
                )
            plain[name] = self.to_plain(item, (*at, name))
        return plain


# --- words ----------------------------------------------------------------------------------------


def _show_key(key: str) -> str:
    return f":{key}" if re.fullmatch(r"[A-Za-z_][\w.\-/]*", key) else json.dumps(key)


def _show_path(at: Iterable[str | int]) -> str:
    return " ".join(f"[{step}]" if isinstance(step, int) else _show_key(step) for step in at)


def _key_text(key: Any) -> str:
    if isinstance(key, (Keyword, Symbol)):
        return str(key.name)
    return key if isinstance(key, str) else edn.show(key)


def _unknown_key_message(key: Any) -> str:
    known = ", ".join(f":{name}" for name in _SERVICE_KEYS)
    if isinstance(key, Keyword):
        close = difflib.get_close_matches(key.name, _SERVICE_KEYS, n=1)
        hint = f" (did you mean :{close[0]}?)" if close else ""
        return f"unknown key {edn.show(key)}{hint}; the keys are {known}"
    if isinstance(key, str) and key in _SERVICE_KEYS:
        return f"the key {edn.show(key)} must be the keyword :{key}"
    return f"unknown key {edn.show(key)}: top-level keys are keywords, one of {known}"

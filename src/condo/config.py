"""The configuration of one `condo run`: a frozen value built once by the CLI.

Parsing of option strings that need more than a type (the `--server` address) lives here too, so
that the CLI stays a thin layer and the rules are tested in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import attrs

from condo.errors import ConfigError

DEFAULT_SERVER = "127.0.0.1:4280"
# Held at once by the API (fewer when the open-files limit is lower: condo.fds.web_caps).
DEFAULT_MAX_WAITS = 10_000
DEFAULT_MAX_FEEDS = 100
LogFormat = Literal["auto", "console", "json"]


@attrs.frozen(kw_only=True)
class Bind:
    """Where the HTTP API listens."""

    host: str
    port: int
    reuse_port: bool = False
    """SO_REUSEPORT: another process (a successor condo) may listen on the same port at once."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(value: str, *, reuse_port: bool = False) -> Bind | None:
    """`[HOST:]PORT` → Bind (a bare PORT binds 127.0.0.1); `off` → None."""
    text = value.strip()
    if text.lower() in ("off", "none", ""):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--server {value!r}: expected [HOST:]PORT or off") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--server {value!r}: port {port} is out of range")
    return Bind(host=host, port=port, reuse_port=reuse_port)


def parse_allowed_host(value: str) -> str:
    """An `--allowed-host` name or address as the API compares it: lower case, IPv6 unbracketed.

    Any port is allowed for an allowed name, so a value with a port (or a path, or blanks) is a
    ConfigError rather than a rule that would never match.
    """
    text = value.strip().lower()
    name = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    bare_v6 = name.count(":") >= 2
    if not name or any(c in name for c in "/@?#[] \t") or (":" in name and not bare_v6):
        raise ConfigError(
            f"--allowed-host {value!r}: expected a host name or address without a port"
        )
    return name


def parse_notify_url(value: str) -> str:
    """A `--notify` URL: absolute http(s), with a host. The error never shows the URL (a
    webhook's path is often its secret)."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        valid = valid and text.isprintable() and " " not in text
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError("--notify: expected an absolute http:// or https:// URL")
    return text


@attrs.frozen(kw_only=True)
class Config:
    """Everything `condo run` was told."""

    prefixes: tuple[Path, ...]
    state_path: Path
    docker_url: str = "unix:///var/run/docker.sock"
    docker_config: Path | None = None
    host: str
    server: Bind | None = None
    stop_on_exit: bool = False
    expose: Literal["none", "consul"] = "none"
    consul_endpoint: str = "http://127.0.0.1:8500"
    consul_prefix: str = "condo"
    consul_token: str | None = attrs.field(default=None, repr=False)
    api_token: str | None = attrs.field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()  # besides loopback and the bind address (parsed)
    max_waits: int = DEFAULT_MAX_WAITS
    max_feeds: int = DEFAULT_MAX_FEEDS
    rescan_interval: float = 10.0  # seconds; README "Spec files" promises it
    # `:tcp` listeners: the kernel's NAT when condo can use it ("auto"), or always HAProxy.
    proxy_plane: Literal["auto", "haproxy"] = "auto"
    # Webhooks for deploy notices (parsed); not in the repr: a webhook URL may hold a secret.
    notify_urls: tuple[str, ...] = attrs.field(default=(), repr=False)

    def check(self) -> None:
        """Raise ConfigError for what cannot work (checked before anything starts)."""
        if not self.prefixes:
            raise ConfigError("at least one PREFIX directory is required")
        for prefix in self.prefixes:
            # A missing directory at start-up would look like "every service removed".
            if not prefix.is_dir():
                raise ConfigError(f"PREFIX {prefix} is not a directory")
        if self.docker_config is not None and not self.docker_config.is_file():
            raise ConfigError(f"--docker-config {self.docker_config} is not a file")
        if not self.state_path.parent.is_dir():
            raise ConfigError(f"--state {self.state_path}: its directory does not exist")
        # An empty token would lock HTTP (no header carries one) but open the feed to `?token=`.
        if self.api_token is not None and not self.api_token.strip():
            raise ConfigError("--api-token is empty: give a real token, or leave the option out")
        # HTTP clients' tokens arrive stripped (a header value): one with blanks around it
        # would open the feed but never HTTP.
        if self.api_token is not None and self.api_token != self.api_token.strip():
            raise ConfigError("--api-token starts or ends with blanks: remove them")
        if self.max_waits < 0 or self.max_feeds < 0:
            raise ConfigError("--max-waits and --max-feeds cannot be negative")

"""The configuration of one `condo run`: a frozen value built once by the CLI.

Parsing of option strings that need more than a type (the `--server` address) lives here too, so
that the CLI stays a thin layer and the rules are tested in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from condo.errors import ConfigError

DEFAULT_SERVER = "127.0.0.1:4280"
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
    rescan_interval: float = 1.0

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

"""Which `Host` the API answers and which `Origin` may open its websocket (DNS rebinding, CSRF).

A page on any website can make the operator's browser talk to condo: through a DNS name that
resolves to 127.0.0.1 (rebinding: the browser then sends that name as `Host`), or by opening a
websocket (browsers send their page's `Origin`, and websockets are not bound by CORS). So:

- `AllowedHosts.allows(host_header)`: the name in `Host` (any port) is an IP address written
  out (rebinding needs a DNS name the attacker controls, and clients in other containers reach
  condo by its address, which changes with every container), `localhost`, the address condo
  binds, or a name given with `--allowed-host`. Only canonical IP literals count (`127.0.0.1`,
  `[::1]`; not `127.1` or `0x7f.1`). An HTTP/1.0 request without `Host` reaches the app with an
  empty one and is refused.
- `same_origin(origin_header, host_header)`: a websocket's `Origin`, when present, names exactly
  the authority the request was sent to (scheme http or https, same name, same port). No
  `Origin` (the CLI, scripts) passes; `Origin: null` (sandboxed pages, files) does not.

Names compare case-insensitively, IPv6 addresses without their brackets. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_authority(authority: str) -> tuple[str, int | None] | None:
    """`name[:port]` or `[v6][:port]` → (lower-case name, port or None); None when malformed."""
    text = authority.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or not name:
            return None
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            return None
    else:
        name, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        if ":" in port_text_or_empty or not name:
            return None  # a bare IPv6 address is not a valid Host
    if port_text is None:
        return name, None
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        return None
    return name, int(port_text)


@attrs.frozen
class AllowedHosts:
    """The names the API answers to, whatever the port."""

    names: frozenset[str]

    @classmethod
    def of(cls, bind_hosts: Iterable[str] = (), extra: Iterable[str] = ()) -> AllowedHosts:
        """Loopback, the bind addresses that are names (not 0.0.0.0 or ::), and `extra`.

        `extra` comes parsed (condo.config.parse_allowed_host): lower case, IPv6 unbracketed.
        """
        names = set(LOOPBACK)
        names.update(host.strip("[]").lower() for host in bind_hosts)
        names.update(extra)
        return cls(frozenset(names - WILDCARDS))

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True
        parts = split_authority(host_header)
        return parts is not None and (parts[0] in self.names or _is_ip_address(parts[0]))


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)  # strict: no shorthand, no hex, no leading zeros
    except ValueError:
        return False
    return True


def same_origin(origin_header: str | None, host_header: str | None) -> bool:
    """Whether a websocket's `Origin` is the API's own (see the module's docstring)."""
    if origin_header is None:
        return True
    try:
        origin = urlsplit(origin_header.strip())
    except ValueError:  # e.g. an unbalanced "[" in the authority
        return False
    default_port = DEFAULT_PORTS.get(origin.scheme.lower())
    if default_port is None or host_header is None or origin.path not in ("", "/"):
        return False
    theirs = split_authority(origin.netloc)
    ours = split_authority(host_header)
    if theirs is None or ours is None:
        return False
    # Browsers leave the scheme's default port out of both; a client may spell it out.
    return (theirs[0], theirs[1] or default_port) == (ours[0], ours[1] or default_port)

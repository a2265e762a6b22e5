"""The labels condo puts on every container it creates, what they mean, and the names it makes.

`condo.host` and `condo.service` say who owns a container: a condo process only ever touches
containers that carry its own host name (several condo processes may share one engine).
`condo.spec-hash` is the spec's container hash, so that recovery can tell which spec a container
was started from without trusting anything but the engine.
"""

from __future__ import annotations

import secrets
import string

SERVICE = "condo.service"
HOST = "condo.host"
SPEC_HASH = "condo.spec-hash"
RESERVED_PREFIX = "condo."
NAME_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
NAME_SUFFIX_LENGTH = 10


def owned_by(host: str, service: str | None = None) -> dict[str, str]:
    """The label filter that selects this host's containers (of one service, if given)."""
    labels = {HOST: host}
    if service is not None:
        labels[SERVICE] = service
    return labels


def for_container(host: str, service: str, spec_hash: str) -> dict[str, str]:
    """The labels condo adds to a container it creates."""
    return {HOST: host, SERVICE: service, SPEC_HASH: spec_hash}


def generated_name(prefix: str) -> str:
    """`<prefix>_<10 random characters>`: a container name of condo's that no other name takes
    (a spec without `:Name`, a self-deploy's successor)."""
    suffix = "".join(secrets.choice(NAME_SUFFIX_ALPHABET) for _ in range(NAME_SUFFIX_LENGTH))
    return f"{prefix}_{suffix}"

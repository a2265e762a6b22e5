"""The `--api-token` check: `Authorization: Bearer TOKEN` (or `?token=` on the websocket).

Comparison is constant-time (`hmac.compare_digest` on bytes), so response timing does not leak
how much of a guess was right. The token never appears in a log line or an error message.
"""

from __future__ import annotations

import hmac


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (scheme case-insensitive), or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def token_matches(expected: str, presented: str | None) -> bool:
    """Whether `presented` is the API token; constant-time in the token's content."""
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())

"""`PerVersion`: a value derived from a changing source, built at most once per version of it.

Every reader-side cache in condo is this one mechanism: the `/v1/state` view (condo.store), its
encoded body (condo.web.app), the feed's messages (condo.web.feed) and the local picture
(condo.web.local). However many readers ask, the value is built once per version and shared;
readers may hold it but never change it. A version is anything comparable that names one state of
the source: the Store's version number, or a picture's (token, stale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

Version = TypeVar("Version")
Value = TypeVar("Value")


class PerVersion(Generic[Version, Value]):
    """`build(version)`, cached while `version()` answers the same."""

    def __init__(self, version: Callable[[], Version], build: Callable[[Version], Value]) -> None:
        self._version = version
        self._build = build
        self._cached: tuple[Version, Value] | None = None

    def latest(self) -> tuple[Version, Value]:
        """The source's current version and the value built for it."""
        version = self._version()
        if self._cached is None or self._cached[0] != version:
            self._cached = (version, self._build(version))
        return self._cached

    @property
    def value(self) -> Value:
        return self.latest()[1]

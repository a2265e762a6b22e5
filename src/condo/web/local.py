"""`LocalSource`: this host's Store seen through the `StateSource` port (no Consul).

The picture is `{store.host: services}` with the `/v1/state` SERVICE objects; its token is the
Store's version. A picture is built at most once per version, however many waiters read it, and
waiting is the Store's own change event (no polling).
"""

from __future__ import annotations

from condo.store import Store
from condo.waiting import Picture


class LocalSource:
    """The local host's state as a StateSource."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._picture: Picture | None = None

    def picture(self) -> Picture:
        version = self._store.version
        if self._picture is None or self._picture.token != version:
            services = self._store.view()["services"]
            self._picture = Picture(token=version, hosts={self._store.host: services})
        return self._picture

    async def wait_beyond(self, token: int) -> None:
        await self._store.wait_changed(token)

"""`LocalSource`: this host's Store seen through the `StateSource` port (no Consul).

The picture is `{store.host: services}` with the `/v1/state` SERVICE objects; its token is the
Store's version. A picture is built at most once per version, however many waiters read it, and
waiting is the Store's own change event (no polling). Always followed and fresh: `demand` and
`fresh` cost nothing.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext

from condo.memo import PerVersion
from condo.store import Store
from condo.waiting import Picture


class LocalSource:
    """The local host's state as a StateSource."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._picture = PerVersion(
            lambda: store.version,
            lambda version: Picture(token=version, hosts={store.host: store.view()["services"]}),
        )

    def picture(self) -> Picture:
        return self._picture.value

    @property
    def stale(self) -> bool:
        return False  # the Store is this process's own memory: never out of date

    @property
    def read_at(self) -> float | None:
        return time.time()

    @property
    def following(self) -> bool:
        return True

    async def wait_beyond(self, token: int) -> None:
        await self._store.wait_changed(token)

    def demand(self) -> AbstractContextManager[None]:
        return nullcontext()

    async def fresh(self) -> None:
        return

"""The connection counts of condo's proxy listeners, as Prometheus counters: never backwards.

A listener's connections are counted by the data plane that carries it, and both planes' counts
can start again from 0: a HAProxy worker's frontend after a reload or a restart of HAProxy, the
NAT rule's named counter after its table was deleted and written again. A listener can also move
from one plane to the other (`--proxy-plane`, nftables turning unusable). `ConnectionCounts`
adds up everything a (service, listen) was ever counted: each counter's last reading, plus what
counters that started again had reached, plus what the other plane counted before a move.

Pure bookkeeping (no I/O): the proxy task feeds it the readings it takes (condo.proxy.reconcile).
"""

from __future__ import annotations

from typing import Literal

Listener = tuple[str, str]  # (service, listen)
Plane = Literal["nat", "haproxy"]


class ConnectionCounts:
    """Connections accepted per listener, summed over every counter that ever counted it."""

    def __init__(self) -> None:
        # (plane, counter, listener) → its last reading: a counter is a HAProxy frontend's or a
        # NAT counter's name; one name may count for another service later (a listen address
        # that moved), hence the listener in the key.
        self._last: dict[tuple[Plane, str, Listener], int] = {}
        # What counters that started again, or went, had counted: kept per listener.
        self._kept: dict[Listener, int] = {}

    def read(self, plane: Plane, counter: str, listener: Listener, count: int) -> None:
        """A reading of `counter`; one lower than the last means it started again from 0."""
        key = (plane, counter, listener)
        last = self._last.get(key, 0)
        if count < last:
            self._keep(listener, last)
        self._last[key] = count

    def restarted(self, plane: Plane) -> None:
        """Every counter of `plane` starts again from 0 (a new HAProxy worker): keep theirs."""
        for key in [key for key in self._last if key[0] == plane]:
            self._keep(key[2], self._last.pop(key))

    def accepted(self, listener: Listener) -> int:
        """Every connection `listener` was counted, by any counter, ever (this process's)."""
        counted = sum(count for (_, _, of), count in self._last.items() if of == listener)
        return self._kept.get(listener, 0) + counted

    def _keep(self, listener: Listener, count: int) -> None:
        self._kept[listener] = self._kept.get(listener, 0) + count

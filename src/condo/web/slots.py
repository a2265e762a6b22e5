"""`Slots`: how many requests of one kind (waits, feeds) may be open at once.

A request that would hold a connection for long takes a slot first; when none is free it is
answered 503 at once instead of queueing (a queue would hold the very descriptors the cap is there
to save; see condo.fds). Synchronous and never blocking: taking and releasing happen between
checkpoints of the one Trio thread, so a plain counter is exact.
"""

from __future__ import annotations


class Slots:
    """At most `cap` holders at once."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.taken = 0

    def try_take(self) -> bool:
        """Take a slot if one is free; the caller must `release()` it when done."""
        if self.taken >= self.cap:
            return False
        self.taken += 1
        return True

    def release(self) -> None:
        assert self.taken > 0, "released a slot nobody took"
        self.taken -= 1

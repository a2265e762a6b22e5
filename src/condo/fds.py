"""The process's file descriptors: raise the soft limit, keep a reserve out of the API's reach.

Every open `/v1/wait_for` and `/v1/feed` holds a socket. Left unbounded, a few hundred of them
under the usual soft limit (1024) take every descriptor, and then the state file cannot be
written and the engine cannot be called (EMFILE): condo stops supervising because of its readers.

- `raise_fd_limit()` lifts the soft RLIMIT_NOFILE to the hard one, once, at start-up.
- `web_caps(limit, max_waits, max_feeds)` splits `limit - RESERVE` between the two kinds of
  waiting request, so that what they can hold never eats into the `RESERVE` descriptors kept
  for condo's own work (state file, engine connections and events, Consul, inotify, logs).
  Feeds get at most what is asked for, and never less than an eighth of the budget unless asked
  for less; waits get the rest, up to what is asked for.
"""

from __future__ import annotations

import resource

import attrs

RESERVE = 128
FEED_SHARE = 8  # feeds are guaranteed 1/FEED_SHARE of the budget (if they ask for that much)
UNLIMITED = 1 << 30  # stands for RLIM_INFINITY in the arithmetic


@attrs.frozen
class Caps:
    """How many waits and feeds the API holds at once; beyond them it answers 503."""

    waits: int
    feeds: int


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE (UNLIMITED for RLIM_INFINITY)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit() -> tuple[int, int]:
    """Set the soft RLIMIT_NOFILE to the hard one; (before, after) the change.

    With an infinite hard limit the soft one goes to UNLIMITED's worth at most, which the kernel
    may refuse (Linux caps it at fs.nr_open): then the soft limit stays as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = UNLIMITED if soft == resource.RLIM_INFINITY else soft
    target = UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if target <= before:
        return before, before
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):  # not allowed here (e.g. above nr_open): keep what we have
        return before, before
    return before, target


def web_caps(limit: int, max_waits: int, max_feeds: int, *, reserve: int = RESERVE) -> Caps:
    """The waits and feeds that fit into `limit` descriptors next to `reserve` (see above)."""
    budget = max(0, limit - reserve)
    feeds = min(max_feeds, max(budget // FEED_SHARE, budget - max_waits))
    waits = min(max_waits, budget - feeds)
    return Caps(waits=waits, feeds=feeds)

"""condo.consul: the only code in condo that speaks to Consul (`--expose consul`).

Modules, each owning one thing:
    layout     the key layout `<prefix>/<service>/<host>` and the value's JSON (pure)
    client     `open_consul_client`, `ConsulClient`: endpoint, token, calls, the error mapping
    publisher  `Publisher`: this process's session and this host's keys, kept true
    source     `ConsulSource`: every host's services from blocking queries, while asked (a
               StateSource)

`run_consul` is the "consul" branch of condo's task tree::

    consul (run_consul; one httpx client)
    ├─ watcher     ConsulSource.run: blocking queries on <prefix>/ while somebody asks (its
    │              demand), the latest Picture; idle otherwise
    └─ publisher   Publisher.run: session keeper + writes, re-checked after every read (or by
                   reading its own keys at each renewal while the watcher idles)

Everything here raises `condo.errors.ConsulError` (or ConfigError for a bad endpoint, prefix or
host name); nothing outside this package sees httpx or Consul's JSON.
"""

from __future__ import annotations

import attrs
import structlog
import trio

from condo.config import Config
from condo.consul.client import (
    Acquire,
    ConsulClient,
    SessionId,
    open_consul_client,
    parse_endpoint,
)
from condo.consul.layout import KeyLayout, check_name, decode_value, encode_value
from condo.consul.publisher import SESSION_TTL, Publisher
from condo.consul.source import ConsulSource
from condo.store import Store

log = structlog.get_logger(__name__)

__all__ = [
    "SESSION_TTL",
    "Acquire",
    "ConsulClient",
    "ConsulRunning",
    "ConsulSource",
    "KeyLayout",
    "Publisher",
    "SessionId",
    "check_config",
    "decode_value",
    "encode_value",
    "open_consul_client",
    "run_consul",
]


@attrs.frozen
class ConsulRunning:
    """What `run_consul` reports: every host's picture, and this host's publisher."""

    source: ConsulSource
    publisher: Publisher


def check_config(config: Config) -> None:
    """Raise ConfigError for Consul settings that cannot work (call before anything starts)."""
    parse_endpoint(config.consul_endpoint)
    KeyLayout.of(config.consul_prefix)
    check_name("--host", config.host)


async def run_consul(
    config: Config,
    store: Store,
    *,
    task_status: trio.TaskStatus[ConsulRunning] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish `store` to Consul and watch every host's keys, until cancelled.

    Reports the ConsulSource and the Publisher (`ConsulRunning`) as soon as both tasks run,
    without waiting for Consul (it may be away; condo supervises regardless). A bad endpoint,
    prefix or host name raises ConfigError before that. On cancellation the session is destroyed,
    so this host's keys vanish at once.
    """
    check_config(config)
    layout = KeyLayout.of(config.consul_prefix)
    async with open_consul_client(config.consul_endpoint, token=config.consul_token) as client:
        source = ConsulSource(client, layout)
        publisher = Publisher(client, store, layout, config.host)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await nursery.start(publisher.run, source)
            log.info("consul.started", endpoint=repr(client), prefix=layout.prefix)
            task_status.started(ConsulRunning(source, publisher))

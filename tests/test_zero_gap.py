"""The pieces of a self-deploy without API gap: `--server-reuse-port`, and no port clash found for a
self.edn with host networking (the engine discards its PortBindings). End to end on the real
engine: tests/integration/test_selfdeploy_zero_gap.py."""

from __future__ import annotations

import pytest
import trio

from condo.config import Bind, parse_server
from condo.docker import Container, ContainerId
from condo.errors import ConfigError
from condo.selfdeploy import clashing_ports
from condo.spec import SelfSpec, parse_self_spec
from condo.web import ApiServer

CAP = 10

PUBLISHED = '{"80/tcp" [{:HostIp "127.0.0.1" :HostPort "4280"}]}'


def self_spec(host_config: str) -> SelfSpec:
    return parse_self_spec(
        f'{{:Image "condo:1.1" :HostConfig {{{host_config}}}}}'.encode(), "self.edn"
    )


def own_container() -> Container:
    return Container(
        id=ContainerId("c" * 64), name="condo", image="condo:1.0", labels={}, status="running",
        running=True, health="healthy", exit_code=0, created_at=0.0, restart_policy="",
        host_ports=frozenset({"4280/tcp"}),
    )  # fmt: skip


def test_a_shared_published_port_clashes() -> None:
    spec = self_spec(f":PortBindings {PUBLISHED}")
    assert clashing_ports(spec, own_container()) == {"4280/tcp"}


def test_host_networking_publishes_nothing_so_nothing_clashes() -> None:
    # `docker run --network host -p ...` keeps PortBindings in the inspect answer (with a warning
    # that they are discarded): they must not turn a start-beside into a stop-then-start.
    spec = self_spec(f':NetworkMode "host" :PortBindings {PUBLISHED}')
    assert clashing_ports(spec, own_container()) == frozenset()


def test_reuse_port_is_opt_in() -> None:
    assert parse_server("127.0.0.1:4280") == Bind(host="127.0.0.1", port=4280)
    assert parse_server("4280", reuse_port=True) == Bind(
        host="127.0.0.1", port=4280, reuse_port=True
    )


async def test_two_servers_share_a_port_only_when_both_reuse_it() -> None:
    with trio.fail_after(CAP):
        first = await ApiServer.listen(Bind(host="127.0.0.1", port=0, reuse_port=True))
        try:
            same = Bind(host="127.0.0.1", port=first.port, reuse_port=True)
            second = await ApiServer.listen(same)
            second.close()
            # Without the option on the newcomer, the port stays taken: a second condo run by
            # mistake still fails at start-up.
            with pytest.raises(ConfigError, match="cannot listen"):
                await ApiServer.listen(Bind(host="127.0.0.1", port=first.port))
        finally:
            first.close()

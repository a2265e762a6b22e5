"""The real Consul cluster that multi-host tests stand on (scripts/consul-cluster, driven by
tests/integration/cluster.py): it has a leader and its clients, its clients share one KV store, a
partitioned client loses its session and comes back after the heal, and a leader's death costs an
election and no key.

The figures (partition -> key gone, heal -> member alive, leader election) are printed; run with
`-s` to see them. Every test works under its own prefix `condo-test/<uuid>` and removes it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from tests.integration.cluster import (
    RULE_TAG,
    ConsulCluster,
    MemberStatus,
    add_rules,
    remove_leftover_rules,
    remove_rules,
    wait_until,
)

pytest_plugins = ["tests.integration.cluster_fixtures"]
pytestmark = pytest.mark.consul

TTL = "10s"  # Consul's minimum session TTL
KEY_GONE_LIMIT = 30.0  # partition -> the session's key deleted, seen through another client
# heal -> the cut-off client an alive member again, by Serf alone: measured from 0.2 s to ~29 s
# (Serf's next reconnect attempt, a fixed 30 s interval), once over 40 s in CI: an attempt can
# land just before the heal or go to a peer that is slow to answer, and the next is 30 s later.
# Two intervals and a margin: the limit says "comes back by itself", not how fast.
HEAL_LIMIT = 75.0
REJOIN_LIMIT = 5.0  # heal + `consul join` -> alive
ELECTION_LIMIT = 20.0  # leader killed -> a new leader
RENEW_DELAY = 2.0  # how often the holder renews its session (well inside the TTL)


@contextlib.asynccontextmanager
async def kv(cluster: ConsulCluster, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the agent on `address`; the test's prefix is removed after."""
    async with httpx.AsyncClient(base_url=cluster.http(address), timeout=10) as http:
        yield http


async def get_value(http: httpx.AsyncClient, key: str) -> bytes | None:
    response = await http.get(f"/v1/kv/{key}", params={"raw": "true"})
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.content


@pytest.fixture
async def prefix(cluster: ConsulCluster) -> AsyncIterator[str]:
    prefix = f"condo-test/{uuid.uuid4().hex[:12]}"
    yield prefix
    with trio.move_on_after(10, shield=True):  # cleanup even when the test was cancelled
        async with kv(cluster, cluster.clients[-1]) as http:
            await http.delete(f"/v1/kv/{prefix}", params={"recurse": "true"})


async def create_session(http: httpx.AsyncClient, name: str) -> str:
    """A session on the agent `http` talks to (its node's serfHealth check, the default)."""
    response = await http.put(
        "/v1/session/create", json={"Name": name, "TTL": TTL, "Behavior": "delete"}
    )
    response.raise_for_status()
    return str(response.json()["ID"])


async def acquire(http: httpx.AsyncClient, key: str, session: str, value: bytes) -> None:
    response = await http.put(f"/v1/kv/{key}", params={"acquire": session}, content=value)
    response.raise_for_status()
    assert response.json() is True, f"could not acquire {key}"


async def renew_forever(http: httpx.AsyncClient, session: str) -> None:
    """Renew like a condo would, through its own agent, and go on when a renewal fails."""
    while True:
        # A cut-off agent answers 500 (no path to the servers) or not at all: keep trying, as
        # a holder would; whether the session survives is what the test looks at.
        with contextlib.suppress(httpx.HTTPError):
            await http.put(f"/v1/session/renew/{session}", timeout=RENEW_DELAY)
        await trio.sleep(RENEW_DELAY)


def our_rules() -> list[str]:
    """This process's partition rules (INPUT and OUTPUT)."""
    mine = f"{RULE_TAG}{os.getpid()}-"
    listed = subprocess.run(
        ["iptables", "-w", "-S"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in listed.splitlines() if mine in line]


async def test_the_cluster_has_a_leader_and_every_client(cluster: ConsulCluster) -> None:
    with trio.fail_after(10):
        leaders = {await cluster.leader(via) for via in cluster.agents}
        assert len(leaders) == 1 and None not in leaders, leaders
        (leader,) = leaders
        assert leader is not None and leader.split(":")[0] in cluster.servers
        members = await cluster.members()
        assert {a: s for a, s in members.items() if a in cluster.agents} == dict.fromkeys(
            cluster.agents, MemberStatus.ALIVE
        )
        assert len(cluster.clients) >= 2
        async with httpx.AsyncClient(base_url=cluster.http(cluster.clients[0])) as http:
            me = (await http.get("/v1/agent/self")).json()
        assert me["Config"]["Server"] is False
        assert me["Member"]["Addr"] == cluster.clients[0]


def test_leftover_rules_of_dead_runs_go_and_live_ones_stay() -> None:
    dead_pid = 4194304 + 1  # above Linux's largest pid: no such process, ever
    assert not os.path.exists(f"/proc/{dead_pid}")
    run = uuid.uuid4().hex[:8]
    dead, live = f"{RULE_TAG}{dead_pid}-{run}", f"{RULE_TAG}{os.getpid()}-{run}"
    # A rule that matches nothing real: a cluster address talking to an unused one.
    match = ["-s", "127.0.0.2", "-d", "127.0.0.250", "-j", "DROP"]
    rules = [("INPUT", "-m", "comment", "--comment", tag, *match) for tag in (dead, live)]
    try:
        add_rules(rules)
        removed = remove_leftover_rules()
        assert (
            [line for line in removed if run in line]
            == [line for line in removed if dead in line]
            != []
        )
        assert [line for line in our_rules() if run in line] != []
    finally:
        remove_rules(lambda comment: comment in (dead, live))
    assert not [line for line in our_rules() if run in line]


async def test_a_write_through_one_client_is_read_through_another(
    cluster: ConsulCluster, prefix: str
) -> None:
    key = f"{prefix}/shared"
    with trio.fail_after(10):
        async with kv(cluster, cluster.clients[0]) as one, kv(cluster, cluster.clients[1]) as two:
            (await one.put(f"/v1/kv/{key}", content=b"from one")).raise_for_status()
            assert await get_value(two, key) == b"from one"


@pytest.mark.slow
async def test_a_partitioned_client_loses_its_session_and_comes_back(
    cluster: ConsulCluster, prefix: str
) -> None:
    cut, other = cluster.clients[0], cluster.clients[1]
    key = f"{prefix}/held"
    with trio.fail_after(KEY_GONE_LIMIT + HEAL_LIMIT + 30):
        async with (
            kv(cluster, cut) as holder,
            kv(cluster, other) as observer,
            trio.open_nursery() as nursery,
        ):
            session = await create_session(holder, f"condo-test:{prefix}")
            await acquire(holder, key, session, b"alive")
            nursery.start_soon(renew_forever, holder, session)
            assert await get_value(observer, key) == b"alive"

            async with cluster.partition(cut):
                assert our_rules(), "the partition added no rule"
                cut_at = trio.current_time()
                with trio.fail_after(KEY_GONE_LIMIT):
                    await wait_until(lambda: _gone(observer, key))
                key_gone = trio.current_time() - cut_at
                # The servers see it failed (Serf), not merely its session expired.
                with trio.fail_after(5):
                    await cluster.wait_member(cut, MemberStatus.FAILED)
                failed_seen = trio.current_time() - cut_at
            assert our_rules() == [], "the partition left rules behind"

            healed_at = trio.current_time()
            with trio.fail_after(HEAL_LIMIT):
                await cluster.wait_member(cut, MemberStatus.ALIVE)
                # ... and it reaches the servers again: a leader through its own agent.
                await cluster.wait_leader(via=cut)
            alive_again = trio.current_time() - healed_at
            nursery.cancel_scope.cancel()
    print(
        f"\n[cluster] partition -> key gone {key_gone:.1f}s (member failed by {failed_seen:.1f}s);"
        f" heal -> member alive {alive_again:.1f}s"
    )


@pytest.mark.slow
async def test_a_healed_client_rejoins_at_once_when_told(cluster: ConsulCluster) -> None:
    cut = cluster.clients[0]
    with trio.fail_after(KEY_GONE_LIMIT + REJOIN_LIMIT + 10):
        async with cluster.partition(cut):
            await cluster.wait_member(cut, MemberStatus.FAILED)
        healed_at = trio.current_time()
        await cluster.rejoin(cut)
        with trio.fail_after(REJOIN_LIMIT):
            await cluster.wait_member(cut, MemberStatus.ALIVE)
            await cluster.wait_leader(via=cut)
        rejoined = trio.current_time() - healed_at
    print(f"\n[cluster] heal + rejoin -> member alive {rejoined:.1f}s")


async def _gone(http: httpx.AsyncClient, key: str) -> bool:
    return await get_value(http, key) is None


@pytest.mark.slow
async def test_killing_the_leader_elects_another_and_loses_no_key(
    cluster: ConsulCluster, prefix: str
) -> None:
    keys = {f"{prefix}/plain/{n}": f"value {n}".encode() for n in range(5)}
    held = f"{prefix}/held"
    with trio.fail_after(ELECTION_LIMIT + 60):
        async with (
            kv(cluster, cluster.clients[0]) as writer,
            kv(cluster, cluster.clients[1]) as reader,
            trio.open_nursery() as nursery,
        ):
            for key, value in keys.items():
                (await writer.put(f"/v1/kv/{key}", content=value)).raise_for_status()
            session = await create_session(writer, f"condo-test:{prefix}")
            await acquire(writer, held, session, b"held")
            nursery.start_soon(renew_forever, writer, session)

            old = await cluster.leader()
            assert old is not None
            await cluster.stop_server(old.split(":")[0])
            killed_at = trio.current_time()
            with trio.fail_after(ELECTION_LIMIT):
                new = await cluster.wait_leader(via=cluster.clients[1], other_than=old)
            election = trio.current_time() - killed_at
            assert new.split(":")[0] in cluster.servers

            for key, value in keys.items():
                assert await get_value(reader, key) == value, key
            assert await get_value(reader, held) == b"held"
            entry = (await reader.get(f"/v1/kv/{held}")).json()[0]
            assert entry["Session"] == session

            await cluster.start_server(old.split(":")[0])
            nursery.cancel_scope.cancel()
    print(f"\n[cluster] leader {old} killed -> new leader {new} in {election:.1f}s")


@pytest.mark.slow
async def test_a_killed_client_agent_fails_and_comes_back_on_its_data(
    cluster: ConsulCluster,
) -> None:
    agent = cluster.clients[-1]
    with trio.fail_after(KEY_GONE_LIMIT + 20):
        async with httpx.AsyncClient(base_url=cluster.http(agent)) as http:
            node_id = (await http.get("/v1/agent/self")).json()["Config"]["NodeID"]
        await cluster.kill_agent(agent)
        killed_at = trio.current_time()
        assert await cluster.leader(via=agent) is None  # nothing answers there any more
        await cluster.wait_member(agent, MemberStatus.FAILED)
        failed = trio.current_time() - killed_at
        await cluster.start_agent(agent)
        async with httpx.AsyncClient(base_url=cluster.http(agent)) as http:
            assert (await http.get("/v1/agent/self")).json()["Config"]["NodeID"] == node_id
    print(f"\n[cluster] client agent killed -> member failed {failed:.1f}s")

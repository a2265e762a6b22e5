"""Fixtures for tests on the real Consul cluster (tests/integration/cluster.py), as a plugin: a
test module that needs them says `pytest_plugins = ["tests.integration.cluster_fixtures"]`.

`consul_cluster` starts the cluster on demand once per session (the suite needs nothing
pre-started) after removing partition rules that a killed run left; `cluster` hands it to one test
whole (every agent up, a leader) and makes it whole again after the test, whatever the test
killed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

from tests.integration.cluster import ConsulCluster, remove_leftover_rules

CLIENTS = int(os.environ.get("CONDO_CLUSTER_CLIENTS", "3"))  # simulated hosts
REPAIR_LIMIT = 60  # seconds to bring a killed agent or server back after a test


@pytest.fixture(scope="session")
def consul_cluster() -> ConsulCluster:
    """The cluster, started if it is not running. Left running at the end, like the engine: other
    sessions may share it, and the next start is then immediate."""
    remove_leftover_rules()
    return ConsulCluster.start(clients=CLIENTS)


@pytest.fixture
async def cluster(consul_cluster: ConsulCluster) -> AsyncIterator[ConsulCluster]:
    """The cluster, whole, for one test; whole again after it."""
    with trio.fail_after(REPAIR_LIMIT):
        await consul_cluster.ensure()
    yield consul_cluster
    # Shielded with a deadline: a cancelled test must still give back every agent it killed.
    with trio.move_on_after(REPAIR_LIMIT, shield=True) as scope:
        await consul_cluster.ensure()
    assert not scope.cancelled_caught, "could not make the cluster whole again"

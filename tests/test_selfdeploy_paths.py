"""self.edn must bind what the running condo reads (the red team's "another spec dir" attack)."""

from __future__ import annotations

from pathlib import Path

import pytest

from condo.docker import Container, ContainerId
from condo.selfdeploy import unshared_paths
from condo.spec import parse_self_spec

MINE = ("/var/run/docker.sock:/var/run/docker.sock", "/srv/condo:/var/lib/condo:rw")
READS = (Path("/var/lib/condo"), Path("/var/lib/condo"))  # the PREFIX and the state's folder


def own(binds: tuple[str, ...] = MINE) -> Container:
    return Container(
        id=ContainerId("c" * 64), name="condo", image="condo:1.0", labels={}, status="running",
        running=True, health="healthy", exit_code=0, created_at=0.0, restart_policy="",
        binds=binds,
    )  # fmt: skip


def self_edn(host_config: str) -> str:
    return f'{{:Image "condo:1.1" :HostConfig {host_config}}}'


@pytest.mark.parametrize(
    ("host_config", "unshared"),
    [
        # The same binds (options may differ): nothing is missing.
        ('{:Binds ["/var/run/docker.sock:/var/run/docker.sock" "/srv/condo:/var/lib/condo"]}', 0),
        ('{:Mounts [{:Type "bind" :Source "/srv/condo" :Target "/var/lib/condo"}]}', 0),
        # Another host folder, or none at all, where the specs and the state are read.
        ('{:Binds ["/var/run/docker.sock:/var/run/docker.sock" "/tmp/x:/var/lib/condo"]}', 1),
        ('{:Binds ["/var/run/docker.sock:/var/run/docker.sock"]}', 1),
    ],
)
def test_self_edn_must_bind_what_condo_reads(host_config: str, unshared: int) -> None:
    spec = parse_self_spec(self_edn(host_config).encode(), "self.edn")
    assert len(unshared_paths(spec, own(), READS)) == unshared


def test_outside_a_container_there_is_nothing_to_compare() -> None:
    spec = parse_self_spec(self_edn("{}").encode(), "self.edn")
    assert unshared_paths(spec, None, READS) == []
    # Paths this condo does not read from a bind (inside its image) are not compared either.
    assert unshared_paths(spec, own(()), READS) == []

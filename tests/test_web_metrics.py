"""condo.metrics and the Docker client's call observer, without an engine.

The registry's text format (escaping, histogram buckets), the service metrics derived from Store
changes (transitions, retries, deploy durations in exact virtual time, removal), the endpoint
templates that keep label values bounded, and the observer hook on a scripted transport.
"""

from __future__ import annotations

import math

import attrs
import httpx
import pytest
import trio

from condo.docker.auth import RegistryAuth
from condo.docker.client import CallRecord, DockerClient, endpoint_template
from condo.docker.models import ContainerId
from condo.errors import ContainerNotFound, DockerUnavailable
from condo.fsm import Box, Phase, ServiceState
from condo.metrics import Metrics, Registry, ServiceMetrics
from condo.spec import ServiceSpec
from condo.store import Store

CAP = 30


def state(phase: Phase, image: str = "img:1") -> ServiceState:
    spec = ServiceSpec(container={"Image": image})
    current = Box(id="c1", name="web_c1", spec=spec, created_at=1.0, healthcheck=False)
    return ServiceState(phase=phase, desired=spec, current=current)


# --- registry ----------------------------------------------------------------------------------


def test_registry_renders_the_text_format() -> None:
    registry = Registry()
    counter = registry.counter("condo_things_total", "Things.", ("kind",))
    gauge = registry.gauge("condo_level", "Level.")
    histogram = registry.histogram("condo_wait_seconds", "Waits.", buckets=(1.0, 5.0))
    counter.inc('a"b\\c\nd')
    counter.inc('a"b\\c\nd', amount=2)
    gauge.set(0.25)
    for value in (0.5, 3.0, 3.0, 100.0):
        histogram.observe(value)
    assert registry.render() == (
        "# HELP condo_things_total Things.\n"
        "# TYPE condo_things_total counter\n"
        'condo_things_total{kind="a\\"b\\\\c\\nd"} 3\n'
        "# HELP condo_level Level.\n"
        "# TYPE condo_level gauge\n"
        "condo_level 0.25\n"
        "# HELP condo_wait_seconds Waits.\n"
        "# TYPE condo_wait_seconds histogram\n"
        'condo_wait_seconds_bucket{le="1"} 1\n'
        'condo_wait_seconds_bucket{le="5"} 3\n'
        'condo_wait_seconds_bucket{le="+Inf"} 4\n'
        "condo_wait_seconds_sum 106.5\n"
        "condo_wait_seconds_count 4\n"
    )


def test_registry_refuses_mistakes() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="condo_"):
        registry.gauge("other_level", "x")
    registry.gauge("condo_level", "x")
    with pytest.raises(ValueError, match="twice"):
        registry.gauge("condo_level", "x")
    counter = registry.counter("condo_n_total", "x", ("a",))
    with pytest.raises(ValueError, match="labels"):
        counter.inc()
    with pytest.raises(ValueError, match="up"):
        counter.inc("x", amount=-1)
    with pytest.raises(ValueError, match="increasing"):
        registry.histogram("condo_h", "x", buckets=(2.0, 1.0))


def test_histogram_edges() -> None:
    histogram = Registry().histogram("condo_h", "x", ("l",), buckets=(1.0, 2.0))
    histogram.observe(1.0, "a")  # a bucket's bound is inclusive
    histogram.observe(math.inf, "a")
    assert histogram.count("a") == 2
    assert list(histogram.samples())[:3] == [
        ("condo_h_bucket", (("l", "a"), ("le", "1")), 1),
        ("condo_h_bucket", (("l", "a"), ("le", "2")), 1),
        ("condo_h_bucket", (("l", "a"), ("le", "+Inf")), 2),
    ]
    assert histogram.count("b") == 0


# --- service metrics ---------------------------------------------------------------------------


@attrs.define
class Watched:
    store: Store
    metrics: Metrics


def watch(store: Store) -> Watched:
    metrics = Metrics()
    service_metrics = ServiceMetrics(metrics, store)
    service_metrics.sync()
    store.subscribe(service_metrics.on_change)
    return Watched(store, metrics)


async def test_deploy_durations_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    watched = watch(Store("h"))
    store, metrics = watched.store, watched.metrics
    store.set_state("web", state(Phase.Wait))  # a new service, straight into Wait
    await trio.sleep(3)
    store.set_state("web", state(Phase.Stable))
    assert metrics.deploy_duration.count("web") == 1
    assert metrics.deploy_duration.sum("web") == 3
    assert metrics.transitions.value("web", "Wait", "Stable") == 1

    # [:After n]: WaitNext, a failure, a retry, then Stable: one deploy of 2 + 5 + 1 s.
    store.set_state("web", state(Phase.WaitNext, "img:2"))
    await trio.sleep(2)
    store.set_state("web", state(Phase.TryAgainNext, "img:2"))
    await trio.sleep(5)
    store.set_state("web", state(Phase.WaitNext, "img:2"))
    await trio.sleep(1)
    store.set_state("web", state(Phase.Stable, "img:2"))
    assert metrics.deploy_duration.count("web") == 2
    assert metrics.deploy_duration.sum("web") == 3 + 8
    assert metrics.retries.value("web") == 1
    assert metrics.service_state.value("web", "Stable") == 1
    assert metrics.service_state.value("web", "WaitNext") == 0


async def test_changes_that_keep_the_phase_count_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watched = watch(Store("h"))
    watched.store.set_state("web", state(Phase.Stable))
    watched.store.set_state("web", attrs.evolve(state(Phase.Stable), attempt=0, draining=True))
    watched.store.set_spec_error("web", None, "/x/web.edn")
    rendered = watched.metrics.render()
    assert "condo_service_transitions_total{" not in rendered
    assert watched.metrics.service_state.value("web", "Stable") == 1


async def test_a_removed_service_leaves_no_state_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watched = watch(Store("h"))
    watched.store.set_state("web", state(Phase.Wait))
    watched.store.set_state("db", state(Phase.Stable))
    watched.store.set_state("web", state(Phase.Init))
    watched.store.drop("web")
    assert watched.metrics.service_state.value("web", "Init") is None
    assert watched.metrics.service_state.value("db", "Stable") == 1
    # A deploy cut short by removal is not a deploy duration.
    assert watched.metrics.deploy_duration.count("web") == 0
    # The counters keep their history (Prometheus counters never go back).
    assert watched.metrics.transitions.value("web", "Wait", "Init") == 1


async def test_sync_adopts_the_current_phases(autojump_clock: trio.testing.MockClock) -> None:
    store = Store("h")
    store.set_state("web", state(Phase.Wait))
    store.set_state("db", state(Phase.Stable))
    await trio.sleep(10)
    watched = watch(store)  # subscribes late: what exists now is the baseline
    assert watched.metrics.service_state.value("web", "Wait") == 1
    assert watched.metrics.service_state.value("db", "Stable") == 1
    await trio.sleep(2)
    store.set_state("web", state(Phase.Stable))
    # Measured from when the metrics started watching: a lower bound, never a guess.
    assert watched.metrics.deploy_duration.sum("web") == 2
    assert watched.metrics.transitions.value("web", "Wait", "Stable") == 1


# --- the Docker client's call observer ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/_ping", "/_ping"),
        ("/version", "/version"),
        ("/events", "/events"),
        ("/containers/json", "/containers/json"),
        ("/containers/create", "/containers/create"),
        ("/containers/0123abcd/start", "/containers/{id}/start"),
        ("/containers/web_x1/json", "/containers/{id}/json"),
        ("/containers/0123abcd", "/containers/{id}"),
        ("/images/create", "/images/create"),
        ("/images/busybox:1/json", "/images/{name}/json"),
        ("/images/localhost:5000/condo-test/busybox:1/json", "/images/{name}/json"),
    ],
)
def test_endpoint_templates(path: str, template: str) -> None:
    assert endpoint_template(path) == template


def engine(status_for: dict[str, int]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/down"):
            raise httpx.ConnectError("refused", request=request)
        for suffix, status in status_for.items():
            if path.endswith(suffix):
                body = {"message": "No such container: nope"} if status == 404 else {}
                return httpx.Response(status, json=body, headers={"Api-Version": "1.41"})
        return httpx.Response(200, text="OK", headers={"Api-Version": "1.41"})

    return httpx.MockTransport(answer)


async def test_the_client_reports_every_call_to_its_observers() -> None:
    transport = engine({"/containers/nope/json": 404, "/containers/c1/start": 204})
    records: list[CallRecord] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://docker") as http:
        client = DockerClient(http, RegistryAuth.anonymous())
        remove = client.add_call_observer(records.append)
        with trio.fail_after(CAP):
            await client.ping()
            await client.start(ContainerId("c1"))
            with pytest.raises(ContainerNotFound):
                await client.inspect("nope")
            with pytest.raises(DockerUnavailable):
                await client.remove(ContainerId("down"))
        remove()
        remove()  # removing twice is harmless
        with trio.fail_after(CAP):
            await client.ping()
    assert [(r.method, r.endpoint, r.outcome) for r in records] == [
        ("GET", "/_ping", "200"),
        ("GET", "/version", "200"),  # the engine's API floor, asked once
        ("POST", "/containers/{id}/start", "204"),
        ("GET", "/containers/{id}/json", "404"),
        ("DELETE", "/containers/{id}", "DockerUnavailable"),
    ]
    assert all(r.took >= 0 for r in records)


async def test_metrics_take_the_client_records() -> None:
    metrics = Metrics()
    transport = engine({})
    async with httpx.AsyncClient(transport=transport, base_url="http://docker") as http:
        client = DockerClient(http, RegistryAuth.anonymous())
        client.add_call_observer(metrics.observe_docker_call)
        with trio.fail_after(CAP):
            await client.ping()
            await client.ping()
    assert metrics.docker_calls.count("GET", "/_ping", "200") == 2

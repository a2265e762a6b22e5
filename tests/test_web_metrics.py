"""condo.metrics and the Docker client's call observer, without an engine.

The exposition read back with prometheus_client's parser (exactly condo's families, types, label
names and HELP texts; escaping; histogram buckets), one registry per condo, the service metrics
derived from Store changes (transitions, retries, deploy durations in exact virtual time,
removal), the endpoint templates that keep label values bounded, and the observer hook on a
scripted transport.
"""

from __future__ import annotations

import attrs
import httpx
import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from condo.docker.auth import RegistryAuth
from condo.docker.client import CallRecord, DockerClient, endpoint_template
from condo.docker.models import ContainerId
from condo.errors import ContainerNotFound, DockerUnavailable
from condo.fsm import Box, Phase, ServiceState
from condo.metrics import DEPLOY_BUCKETS, Metrics, ServiceMetrics
from condo.spec import ServiceSpec
from condo.store import Store

CAP = 30
TRANSITIONS = "condo_service_transitions_total"


def edge(service: str, old: str, new: str) -> dict[str, str]:
    """The labels of one transition series (`from` is a keyword, hence the dict)."""
    return {"service": service, "from": old, "to": new}


def state(phase: Phase, image: str = "img:1") -> ServiceState:
    spec = ServiceSpec(container={"Image": image})
    current = Box(id="c1", name="web_c1", spec=spec, created_at=1.0, healthcheck=False)
    return ServiceState(phase=phase, desired=spec, current=current)


# --- the exposition ------------------------------------------------------------------------

# The outside contract (README "HTTP API"): family name -> type, label names, HELP.
FAMILIES = {
    "condo_service_state": (
        "gauge",
        {"service", "state"},
        "1 for the phase each service is in, 0 for the others.",
    ),
    "condo_service_transitions": (
        "counter",
        {"service", "from", "to"},
        "Phase changes of each service.",
    ),
    "condo_deploy_duration_seconds": (
        "histogram",
        {"service"},
        "From a candidate starting (Wait/WaitNext) to a Stable service, retries included.",
    ),
    "condo_service_retries": (
        "counter",
        {"service"},
        "Deploy attempts started again after a failure (TryAgain* -> Wait*).",
    ),
    "condo_docker_call_duration_seconds": (
        "histogram",
        {"method", "endpoint", "outcome"},
        "Docker Engine API call latency, until the answer's headers.",
    ),
    "condo_consul_publish_errors": (
        "counter",
        {"service"},
        "Failed writes (or deletes) of a service's Consul key: refused, too large, held"
        " elsewhere. The other keys are published regardless.",
    ),
    "condo_consul_publish_failing": (
        "gauge",
        {"service"},
        "1 while a service's Consul key is not as this host says (see consul.publish_failed).",
    ),
    "condo_consul_following": (
        "gauge",
        set(),
        "1 while this condo follows Consul's picture of every host (a wait, a feed, or a read of"
        " it within the linger), 0 while it reads nothing of it.",
    ),
    "condo_web_open_waits": ("gauge", set(), "Open /v1/wait_for long-polls."),
    "condo_web_open_feeds": ("gauge", set(), "Open /v1/feed websockets."),
    "condo_notify_sent": ("counter", {"receiver"}, "Notices a --notify receiver accepted (2xx)."),
    "condo_notify_failed": (
        "counter",
        {"receiver"},
        "Attempts to deliver a notice that did not succeed (no answer in time, 5xx, 408, 429,"
        " refused); every retry counts.",
    ),
    "condo_notify_dropped": (
        "counter",
        {"receiver"},
        "Notices given up: the receiver's queue was full (oldest first), or it refused them.",
    ),
    "condo_proxy_connections": (
        "counter",
        {"service", "listen"},
        "Connections each :proxy listener accepted (the NAT rule's counter, or HAProxy's frontend"
        " counts; summed across reloads and restarts).",
    ),
    "condo_proxy_open_connections": (
        "gauge",
        {"service", "listen"},
        "Connections open through each :proxy listener (established in conntrack, or in HAProxy's"
        " current worker).",
    ),
}


@attrs.frozen
class Deliveries:
    """A notifier's counts, as condo.notify.Notifier.counts() gives them."""

    sent: int
    failed: int
    dropped: int


class Listeners:
    def connections(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {("web", "127.0.0.1:8080"): (2, 17)}


@attrs.define
class Watcher:
    """condo.consul.ConsulSource as /metrics reads it."""

    following: bool


class Receivers:
    def __init__(self, counts: dict[str, Deliveries]) -> None:
        self._counts = counts

    def counts(self) -> dict[str, Deliveries]:
        return self._counts


def families(text: str) -> dict[str, Metric]:
    """The exposition read back by prometheus_client's parser (it raises on a malformed line)."""
    found: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in found, f"{family.name} twice"
        found[family.name] = family
    return found


def labels_of(family: Metric) -> set[str]:
    return {name for sample in family.samples for name in sample.labels} - {"le"}


async def test_the_exposition_is_the_contract(autojump_clock: trio.testing.MockClock) -> None:
    store = Store("h")
    watched = watch(store)
    metrics = watched.metrics
    store.set_state("web", state(Phase.Wait))
    await trio.sleep(3)
    store.set_state("web", state(Phase.TryAgain))
    store.set_state("web", state(Phase.Wait))
    store.set_state("web", state(Phase.Stable))
    metrics.observe_docker_call(
        CallRecord(method="GET", endpoint="/_ping", outcome="200", took=0.003)
    )
    metrics.observe_consul_publish('a"b\\c\nd', "refused")  # label values are escaped
    metrics.web_waiters.inc()
    metrics.notify.source = Receivers({"https://hooks.example": Deliveries(3, 2, 1)})
    metrics.proxy.source = Listeners()
    watcher = Watcher(following=False)
    metrics.consul_following.source = watcher
    assert metrics.value("condo_consul_following") == 0
    watcher.following = True

    text = metrics.render()
    assert text.endswith("\n")
    found = families(text)
    # Exactly condo's families: nothing added by the library (no _created, no process metrics).
    assert set(found) == set(FAMILIES)
    for name, (kind, label_names, help_text) in FAMILIES.items():
        assert (found[name].type, labels_of(found[name]), found[name].documentation) == (
            kind,
            label_names,
            help_text,
        ), name
    # The sample names a scraper sees, e.g. a counter's `_total`.
    sample_names = {sample.name for family in found.values() for sample in family.samples}
    assert sample_names == {
        "condo_service_state",
        "condo_service_transitions_total",
        "condo_service_retries_total",
        "condo_consul_publish_errors_total",
        "condo_consul_publish_failing",
        "condo_consul_following",
        "condo_web_open_waits",
        "condo_web_open_feeds",
        "condo_notify_sent_total",
        "condo_notify_failed_total",
        "condo_notify_dropped_total",
        "condo_proxy_connections_total",
        "condo_proxy_open_connections",
        *(
            f"condo_{h}_{part}"
            for h in ("deploy_duration_seconds", "docker_call_duration_seconds")
            for part in ("bucket", "sum", "count")
        ),
    }

    def value(family: str, sample_name: str, **labels: str) -> float:
        [match] = [
            s.value for s in found[family].samples if s.name == sample_name and s.labels == labels
        ]
        return match

    assert value("condo_service_state", "condo_service_state", service="web", state="Stable") == 1
    assert value("condo_service_state", "condo_service_state", service="web", state="Wait") == 0
    transitions = ("condo_service_transitions", "condo_service_transitions_total")
    assert value(*transitions, service="web", **{"from": "Wait", "to": "TryAgain"}) == 1
    assert value(*transitions, service="web", **{"from": "TryAgain", "to": "Wait"}) == 1
    assert value(*transitions, service="web", **{"from": "Wait", "to": "Stable"}) == 1
    assert value("condo_service_retries", "condo_service_retries_total", service="web") == 1
    deploy = "condo_deploy_duration_seconds"
    assert value(deploy, f"{deploy}_count", service="web") == 1
    assert value(deploy, f"{deploy}_sum", service="web") == 3
    assert value(deploy, f"{deploy}_bucket", service="web", le="2.0") == 0
    assert value(deploy, f"{deploy}_bucket", service="web", le="5.0") == 1
    assert value(deploy, f"{deploy}_bucket", service="web", le="+Inf") == 1
    # Cumulative buckets, one per bound and +Inf.
    buckets = [s for s in found[deploy].samples if s.name == f"{deploy}_bucket"]
    assert len(buckets) == len(DEPLOY_BUCKETS) + 1
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    docker = "condo_docker_call_duration_seconds"
    call = {"method": "GET", "endpoint": "/_ping", "outcome": "200"}
    assert value(docker, f"{docker}_bucket", le="0.005", **call) == 1
    assert value(docker, f"{docker}_sum", **call) == 0.003
    errors = ("condo_consul_publish_errors", "condo_consul_publish_errors_total")
    assert value(*errors, service='a"b\\c\nd') == 1
    assert value("condo_consul_following", "condo_consul_following") == 1  # read at scrape time
    assert (
        value("condo_consul_publish_failing", "condo_consul_publish_failing", service='a"b\\c\nd')
        == 1
    )
    assert value("condo_web_open_waits", "condo_web_open_waits") == 1
    assert value("condo_web_open_feeds", "condo_web_open_feeds") == 0
    receiver = {"receiver": "https://hooks.example"}
    assert value("condo_notify_sent", "condo_notify_sent_total", **receiver) == 3
    assert value("condo_notify_failed", "condo_notify_failed_total", **receiver) == 2
    assert value("condo_notify_dropped", "condo_notify_dropped_total", **receiver) == 1
    listener = {"service": "web", "listen": "127.0.0.1:8080"}
    assert value("condo_proxy_connections", "condo_proxy_connections_total", **listener) == 17
    assert value("condo_proxy_open_connections", "condo_proxy_open_connections", **listener) == 2


def test_two_condos_in_one_process_keep_their_own_series() -> None:
    first, second = Metrics(), Metrics()
    first.observe_consul_publish("db", "refused")
    assert first.value("condo_consul_publish_errors_total", service="db") == 1
    assert second.value("condo_consul_publish_errors_total", service="db") is None
    first.observe_consul_publish("db", None)
    first.observe_consul_publish("db", None)  # forgetting twice is harmless
    assert first.value("condo_consul_publish_failing", service="db") is None
    assert first.value("condo_consul_publish_errors_total", service="db") == 1


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
    assert metrics.value("condo_deploy_duration_seconds_count", service="web") == 1
    assert metrics.value("condo_deploy_duration_seconds_sum", service="web") == 3
    assert metrics.value(TRANSITIONS, **edge("web", "Wait", "Stable")) == 1

    # [:After n]: WaitNext, a failure, a retry, then Stable: one deploy of 2 + 5 + 1 s.
    store.set_state("web", state(Phase.WaitNext, "img:2"))
    await trio.sleep(2)
    store.set_state("web", state(Phase.TryAgainNext, "img:2"))
    await trio.sleep(5)
    store.set_state("web", state(Phase.WaitNext, "img:2"))
    await trio.sleep(1)
    store.set_state("web", state(Phase.Stable, "img:2"))
    assert metrics.value("condo_deploy_duration_seconds_count", service="web") == 2
    assert metrics.value("condo_deploy_duration_seconds_sum", service="web") == 3 + 8
    assert metrics.value("condo_service_retries_total", service="web") == 1
    assert metrics.value("condo_service_state", service="web", state="Stable") == 1
    assert metrics.value("condo_service_state", service="web", state="WaitNext") == 0


async def test_changes_that_keep_the_phase_count_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watched = watch(Store("h"))
    watched.store.set_state("web", state(Phase.Stable))
    watched.store.set_state("web", attrs.evolve(state(Phase.Stable), attempt=0, draining=True))
    watched.store.set_spec_error("web", None, "/x/web.edn")
    rendered = watched.metrics.render()
    assert "condo_service_transitions_total{" not in rendered
    assert watched.metrics.value("condo_service_state", service="web", state="Stable") == 1


async def test_a_removed_service_leaves_no_state_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watched = watch(Store("h"))
    watched.store.set_state("web", state(Phase.Wait))
    watched.store.set_state("db", state(Phase.Stable))
    watched.store.set_state("web", state(Phase.Init))
    watched.store.drop("web")
    assert watched.metrics.value("condo_service_state", service="web", state="Init") is None
    assert watched.metrics.value("condo_service_state", service="db", state="Stable") == 1
    # A deploy cut short by removal is not a deploy duration.
    assert watched.metrics.value("condo_deploy_duration_seconds_count", service="web") is None
    # The counters keep their history (Prometheus counters never go back).
    assert watched.metrics.value(TRANSITIONS, **edge("web", "Wait", "Init")) == 1


async def test_sync_adopts_the_current_phases(autojump_clock: trio.testing.MockClock) -> None:
    store = Store("h")
    store.set_state("web", state(Phase.Wait))
    store.set_state("db", state(Phase.Stable))
    await trio.sleep(10)
    watched = watch(store)  # subscribes late: what exists now is the baseline
    assert watched.metrics.value("condo_service_state", service="web", state="Wait") == 1
    assert watched.metrics.value("condo_service_state", service="db", state="Stable") == 1
    await trio.sleep(2)
    store.set_state("web", state(Phase.Stable))
    # Measured from when the metrics started watching: a lower bound, never a guess.
    assert watched.metrics.value("condo_deploy_duration_seconds_sum", service="web") == 2
    assert watched.metrics.value(TRANSITIONS, **edge("web", "Wait", "Stable")) == 1


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
    assert (
        metrics.value(
            "condo_docker_call_duration_seconds_count",
            method="GET",
            endpoint="/_ping",
            outcome="200",
        )
        == 2
    )

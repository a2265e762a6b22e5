"""condo's Prometheus metrics, on `prometheus_client`: the service metrics derived from the Store,
the Docker call latency fed by the engine client's call observer, the Consul publisher's
per-service failures fed by its failure observer, whether its watcher follows (read at scrape
time), the `--notify` receivers' deliveries read
from the notifier's counts at scrape time, and the `:proxy` listeners' connections read from the
proxy task's last look at HAProxy.

Owns: `Metrics` (every metric condo exports, on a `CollectorRegistry` of its own, rendered with
`generate_latest` in the text format 0.0.4), `ServiceMetrics` (subscribes to a `Store` and diffs
each service's phase on every change; the driver is never touched) and the collector that reads
`condo_service_state` from the Store at scrape time.

Invariants:
- The names, types, label names and HELP texts are condo's contract (README "HTTP API"): every
  name starts with `condo_`, and no other series is exported (no `_created`, no process or
  platform collectors: the registry is condo's own, never prometheus_client's global one, so two
  condos in one process, as in the tests, never share a series).
- Updating a metric is synchronous, O(labels), and never blocks: the Store calls its listeners
  inline after every change. prometheus_client's locks are uncontended threading locks (condo is
  one Trio thread), so they cost nanoseconds and never wait.
- Deploy durations and call latencies are measured on Trio's clock (monotonic, and virtual in
  tests); nothing here reads the wall clock.
- The module knows no engine: the Docker client hands in records that merely look like
  `DockerCall` (so condo.web, which renders the metrics, stays away from condo.docker).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from condo.fsm import Phase
from condo.store import ServiceEntry, Store

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4

DEPLOY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DOCKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The --notify deliveries: family name (without `_total`) and HELP, one counter per receiver.
NOTIFY_COUNTERS = {
    "sent": ("condo_notify_sent", "Notices a --notify receiver accepted (2xx)."),
    "failed": (
        "condo_notify_failed",
        "Attempts to deliver a notice that did not succeed (no answer in time, 5xx, 408, 429,"
        " refused); every retry counts.",
    ),
    "dropped": (
        "condo_notify_dropped",
        "Notices given up: the receiver's queue was full (oldest first), or it refused them.",
    ),
}

# `:proxy`: connections through each listener, read from the NAT or HAProxy's frontends.
PROXY_CONNECTIONS = (
    "condo_proxy_connections",
    "Connections each :proxy listener accepted (the NAT rule's counter, or HAProxy's frontend"
    " counts; summed across reloads and restarts).",
)
PROXY_OPEN = (
    "condo_proxy_open_connections",
    "Connections open through each :proxy listener (established in conntrack, or in HAProxy's"
    " current worker).",
)

SERVICE_STATE = "condo_service_state"
SERVICE_STATE_HELP = "1 for the phase each service is in, 0 for the others."

# A deploy begins when a candidate starts (Wait or WaitNext) and ends when one is Stable.
_DEPLOYING = (Phase.Wait, Phase.WaitNext)
_RETRYING = (Phase.TryAgain, Phase.TryAgainNext)


class DockerCall(Protocol):
    """One finished engine call (condo.docker.client.CallRecord has this shape)."""

    @property
    def method(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def took(self) -> float: ...


class DeliveryCounts(Protocol):
    """One receiver's deliveries (condo.notify.Counts has this shape)."""

    @property
    def sent(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def dropped(self) -> int: ...


class NotifyReceivers(Protocol):
    """condo.notify.Notifier, as far as /metrics cares."""

    def counts(self) -> Mapping[str, DeliveryCounts]: ...


class Following(Protocol):
    """condo.consul.ConsulSource, as far as /metrics cares."""

    @property
    def following(self) -> bool: ...


class ProxyListeners(Protocol):
    """The proxy's connection counts (condo.proxy.reconcile.ProxyReconciler has this method)."""

    def connections(self) -> Mapping[tuple[str, str], tuple[int, int]]:
        """(service, listen) → (open connections, connections accepted)."""
        ...


class Metrics:
    """Every metric condo exports, on one registry of its own."""

    def __init__(self) -> None:
        # prometheus_client adds a `<name>_created` series (wall-clock seconds) to each counter and
        # histogram by default; condo's series are its contract and those are not among them. The
        # switch is process-wide, and condo is the process.
        # (It has no annotations, hence the ignore.)
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        self.transitions = Counter(
            "condo_service_transitions_total",
            "Phase changes of each service.",
            ("service", "from", "to"),
            registry=registry,
        )
        self.deploy_duration = Histogram(
            "condo_deploy_duration_seconds",
            "From a candidate starting (Wait/WaitNext) to a Stable service, retries included.",
            ("service",),
            buckets=DEPLOY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "condo_service_retries_total",
            "Deploy attempts started again after a failure (TryAgain* -> Wait*).",
            ("service",),
            registry=registry,
        )
        self.docker_calls = Histogram(
            "condo_docker_call_duration_seconds",
            "Docker Engine API call latency, until the answer's headers.",
            ("method", "endpoint", "outcome"),
            buckets=DOCKER_BUCKETS,
            registry=registry,
        )
        self.consul_publish_errors = Counter(
            "condo_consul_publish_errors_total",
            "Failed writes (or deletes) of a service's Consul key: refused, too large, held"
            " elsewhere. The other keys are published regardless.",
            ("service",),
            registry=registry,
        )
        self.consul_publish_failing = Gauge(
            "condo_consul_publish_failing",
            "1 while a service's Consul key is not as this host says (see consul.publish_failed).",
            ("service",),
            registry=registry,
        )
        self.web_waiters = Gauge(
            "condo_web_open_waits", "Open /v1/wait_for long-polls.", registry=registry
        )
        self.web_feeds = Gauge(
            "condo_web_open_feeds", "Open /v1/feed websockets.", registry=registry
        )
        self.notify = NotifyDeliveries()
        registry.register(self.notify)
        self.proxy = ProxyConnections()
        registry.register(self.proxy)
        self.consul_following = ConsulFollowing()
        registry.register(self.consul_following)

    def observe_docker_call(self, call: DockerCall) -> None:
        """A call observer for the Docker client (`add_call_observer`)."""
        self.docker_calls.labels(call.method, call.endpoint, call.outcome).observe(call.took)

    def observe_consul_publish(self, service: str, error: str | None) -> None:
        """A failure observer for condo.consul's publisher (`add_failure_observer`)."""
        if error is None:
            self.consul_publish_failing.remove(service)  # absent is fine: nothing to forget
            return
        self.consul_publish_errors.labels(service).inc()
        self.consul_publish_failing.labels(service).set(1.0)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value, or None when the series does not exist (for tests and checks).

        `name` is the sample's (`..._count`, `..._bucket` with an `le` label); a label that is a
        Python keyword is passed as `**{"from": ...}`.
        """
        return self.registry.get_sample_value(name, labels)

    def render(self) -> str:
        """The whole registry in the Prometheus text format 0.0.4 (ends with a newline)."""
        return generate_latest(self.registry).decode()


class NotifyDeliveries:
    """`condo_notify_{sent,failed,dropped}_total` per receiver, read from the notifier at scrape
    time (a prometheus_client collector): what was counted before the web server started is
    there too, and without --notify the families are empty."""

    def __init__(self) -> None:
        self.source: NotifyReceivers | None = None

    def describe(self) -> Iterator[CounterMetricFamily]:
        return self.collect()

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = {} if self.source is None else self.source.counts()
        for field, (name, help_text) in NOTIFY_COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=("receiver",))
            for receiver, count in sorted(counts.items()):
                family.add_metric([receiver], float(getattr(count, field)))
            yield family


class ProxyConnections:
    """`condo_proxy_connections_total` and `condo_proxy_open_connections` per service and
    listener, read at scrape time from the proxy task's last look at HAProxy (a
    prometheus_client collector). Without `:proxy` the families are empty."""

    def __init__(self) -> None:
        self.source: ProxyListeners | None = None

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return self.collect()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = {} if self.source is None else self.source.connections()
        total = CounterMetricFamily(*PROXY_CONNECTIONS, labels=("service", "listen"))
        current = GaugeMetricFamily(*PROXY_OPEN, labels=("service", "listen"))
        for (service, listen), (open_now, accepted) in sorted(counts.items()):
            total.add_metric([service, listen], float(accepted))
            current.add_metric([service, listen], float(open_now))
        yield total
        yield current


class ConsulFollowing:
    """`condo_consul_following`: 1 while the Consul watcher follows the fleet (somebody asks), 0
    while it idles and reads nothing; read at scrape time. Without Consul the family is empty."""

    def __init__(self) -> None:
        self.source: Following | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self.collect()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "condo_consul_following",
            "1 while this condo follows Consul's picture of every host (a wait, a feed, or a"
            " read of it within the linger), 0 while it reads nothing of it.",
        )
        if self.source is not None:
            family.add_metric([], 1.0 if self.source.following else 0.0)
        yield family


class ServiceStates:
    """`condo_service_state`, read from the Store at scrape time (a prometheus_client collector).

    Level-triggered: a scrape sees every service the Store holds, in the phase it holds, and a
    removed service simply is not there; nothing has to be kept in step.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for name, entry in sorted(self._store.entries.items()):
            phase = entry.state.phase
            for candidate in Phase:
                family.add_metric([name, candidate.value], 1.0 if candidate is phase else 0.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(SERVICE_STATE, SERVICE_STATE_HELP, labels=("service", "state"))


class ServiceMetrics:
    """Derives the per-service metrics from the Store's changes.

    Construction registers `ServiceStates` on the metrics' registry. Subscribe with
    `store.subscribe(service_metrics.on_change)`; `sync()` once takes the current phases as the
    starting point (no transition is counted for them).
    """

    def __init__(self, metrics: Metrics, store: Store) -> None:
        self._metrics = metrics
        self._store = store
        self._seen: dict[str, ServiceEntry] = {}
        self._phases: dict[str, Phase] = {}
        self._deploy_started: dict[str, float] = {}
        metrics.registry.register(ServiceStates(store))

    def sync(self) -> None:
        """Adopt the Store's current phases without counting transitions."""
        for name, entry in self._store.entries.items():
            self._seen[name] = entry
            self._phases[name] = entry.state.phase
            if entry.state.phase in (*_DEPLOYING, *_RETRYING):
                # Already deploying when we started watching: measure from now (a lower bound).
                self._deploy_started[name] = trio.current_time()

    def on_change(self) -> None:
        """Store listener: diff every service's phase against the last one seen."""
        entries = self._store.entries
        at = trio.current_time()
        for name, entry in entries.items():
            if self._seen.get(name) is entry:
                continue  # unchanged object: nothing to diff (the common case)
            self._seen[name] = entry
            self._transition(name, self._phases.get(name), entry.state.phase, at)
        for name in [name for name in self._seen if name not in entries]:
            self._forget(name)

    def _transition(self, name: str, old: Phase | None, new: Phase, at: float) -> None:
        if old is new:
            return
        self._phases[name] = new
        if old is None:
            # A new service: its first phase is not a transition, but may begin a deploy.
            if new in _DEPLOYING:
                self._deploy_started[name] = at
            return
        self._metrics.transitions.labels(name, old.value, new.value).inc()
        if old in _RETRYING and new in _DEPLOYING:
            self._metrics.retries.labels(name).inc()
        if new in _DEPLOYING:
            self._deploy_started.setdefault(name, at)
        elif new is Phase.Stable:
            started = self._deploy_started.pop(name, None)
            if started is not None:
                self._metrics.deploy_duration.labels(name).observe(at - started)
        elif new is Phase.Init:
            self._deploy_started.pop(name, None)

    def _forget(self, name: str) -> None:
        # Its counters and durations keep their history (Prometheus counters never go back);
        # its condo_service_state series go with the Store's entry.
        del self._seen[name]
        self._phases.pop(name, None)
        self._deploy_started.pop(name, None)

"""condo's Prometheus metrics: a tiny registry, the service metrics derived from the Store, and
the Docker call latency fed by the engine client's call observer, and the Consul publisher's
per-service failures fed by its failure observer.

Owns: `Registry` (counters, gauges and histograms with labels, rendered in the Prometheus text
exposition format 0.0.4), `ServiceMetrics` (subscribes to a `Store` and diffs each service's phase
on every change; the driver is never touched) and `observe_docker_call`.

Invariants:
- Every metric name starts with `condo_`; label values are escaped; a histogram's buckets are
  cumulative and end with `+Inf`, whose count equals `_count`.
- Updating a metric is synchronous, O(labels), and never blocks: the Store calls its listeners
  inline after every change.
- Deploy durations and call latencies are measured on Trio's clock (monotonic, and virtual in
  tests); nothing here reads the wall clock.
- The module knows no engine: the Docker client hands in records that merely look like
  `DockerCall` (so condo.web, which renders the metrics, stays away from condo.docker).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import trio

from condo.fsm import Phase
from condo.store import ServiceEntry, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEPLOY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DOCKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]

# A deploy begins when a candidate starts (Wait or WaitNext) and ends when one is Stable.
_DEPLOYING = (Phase.Wait, Phase.WaitNext)
_RETRYING = (Phase.TryAgain, Phase.TryAgainNext)


def _labels(names: Sequence[str], values: Sequence[str]) -> Labels:
    if len(names) != len(values):
        raise ValueError(f"expected labels {list(names)}, got {list(values)}")
    return tuple(zip(names, values, strict=True))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels) + "}"


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        if not name.startswith("condo_"):
            raise ValueError(f"metric {name!r} must start with condo_")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        raise NotImplementedError

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for name, labels, value in self.samples():
            yield f"{name}{_format_labels(labels)} {_format_value(value)}"


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = _labels(self.label_names, label_values)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *label_values: str) -> float:
        return self._values.get(_labels(self.label_names, label_values), 0.0)

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        for labels, value in sorted(self._values.items()):
            yield self.name, labels, value


class Gauge(_Metric):
    """A value per label set that goes up and down (and may be removed)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, *label_values: str) -> None:
        self._values[_labels(self.label_names, label_values)] = value

    def add(self, amount: float, *label_values: str) -> None:
        key = _labels(self.label_names, label_values)
        self._values[key] = self._values.get(key, 0.0) + amount

    def remove_where(self, name: str, value: str) -> None:
        """Forget every series whose label `name` is `value` (e.g. a service that is gone)."""
        for key in [key for key in self._values if (name, value) in key]:
            del self._values[key]

    def value(self, *label_values: str) -> float | None:
        return self._values.get(_labels(self.label_names, label_values))

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        for labels, value in sorted(self._values.items()):
            yield self.name, labels, value


class Histogram(_Metric):
    """Observations counted into cumulative buckets per label set."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, help_text, label_names)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be increasing and non-empty")
        self.buckets = tuple(buckets)
        # per label set: counts per bucket (not cumulative; +Inf last), sum
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *label_values: str) -> None:
        key = _labels(self.label_names, label_values)
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), -1)
        counts[index] += 1
        total[0] += value

    def count(self, *label_values: str) -> int:
        series = self._series.get(_labels(self.label_names, label_values))
        return 0 if series is None else sum(series[0])

    def sum(self, *label_values: str) -> float:
        series = self._series.get(_labels(self.label_names, label_values))
        return 0.0 if series is None else series[1][0]

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        for labels, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                yield f"{self.name}_bucket", (*labels, ("le", _format_value(bound))), cumulative
            yield f"{self.name}_sum", labels, total[0]
            yield f"{self.name}_count", labels, cumulative


M = TypeVar("M", bound=_Metric)


class Registry:
    """The metrics of one condo process, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, label_names))

    def gauge(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, label_names))

    def histogram(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        return self._add(Histogram(name, help_text, label_names, buckets=buckets))

    def render(self) -> str:
        """The whole registry in the Prometheus text format (ends with a newline)."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"

    def _add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric


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


class Metrics:
    """Every metric condo exports, on one registry."""

    def __init__(self) -> None:
        self.registry = Registry()
        registry = self.registry
        self.service_state = registry.gauge(
            "condo_service_state",
            "1 for the phase each service is in, 0 for the others.",
            ("service", "state"),
        )
        self.transitions = registry.counter(
            "condo_service_transitions_total",
            "Phase changes of each service.",
            ("service", "from", "to"),
        )
        self.deploy_duration = registry.histogram(
            "condo_deploy_duration_seconds",
            "From a candidate starting (Wait/WaitNext) to a Stable service, retries included.",
            ("service",),
            buckets=DEPLOY_BUCKETS,
        )
        self.retries = registry.counter(
            "condo_service_retries_total",
            "Deploy attempts started again after a failure (TryAgain* -> Wait*).",
            ("service",),
        )
        self.docker_calls = registry.histogram(
            "condo_docker_call_duration_seconds",
            "Docker Engine API call latency, until the answer's headers.",
            ("method", "endpoint", "outcome"),
            buckets=DOCKER_BUCKETS,
        )
        self.consul_publish_errors = registry.counter(
            "condo_consul_publish_errors_total",
            "Failed writes (or deletes) of a service's Consul key: refused, too large, held"
            " elsewhere. The other keys are published regardless.",
            ("service",),
        )
        self.consul_publish_failing = registry.gauge(
            "condo_consul_publish_failing",
            "1 while a service's Consul key is not as this host says (see consul.publish_failed).",
            ("service",),
        )
        self.web_waiters = registry.gauge("condo_web_open_waits", "Open /v1/wait_for long-polls.")
        self.web_feeds = registry.gauge("condo_web_open_feeds", "Open /v1/feed websockets.")
        self.web_waiters.set(0)
        self.web_feeds.set(0)

    def observe_docker_call(self, call: DockerCall) -> None:
        """A call observer for the Docker client (`add_call_observer`)."""
        self.docker_calls.observe(call.took, call.method, call.endpoint, call.outcome)

    def observe_consul_publish(self, service: str, error: str | None) -> None:
        """A failure observer for condo.consul's publisher (`add_failure_observer`)."""
        if error is None:
            self.consul_publish_failing.remove_where("service", service)
            return
        self.consul_publish_errors.inc(service)
        self.consul_publish_failing.set(1.0, service)

    def render(self) -> str:
        return self.registry.render()


class ServiceMetrics:
    """Derives the per-service metrics from the Store's changes.

    Subscribe with `store.subscribe(service_metrics.on_change)`; `sync()` once takes the current
    phases as the starting point (no transition is counted for them).
    """

    def __init__(self, metrics: Metrics, store: Store) -> None:
        self._metrics = metrics
        self._store = store
        self._seen: dict[str, ServiceEntry] = {}
        self._phases: dict[str, Phase] = {}
        self._deploy_started: dict[str, float] = {}

    def sync(self) -> None:
        """Adopt the Store's current phases without counting transitions."""
        for name, entry in self._store.entries.items():
            self._seen[name] = entry
            self._phases[name] = entry.state.phase
            self._set_state(name, entry.state.phase)
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
        self._set_state(name, new)
        if old is None:
            # A new service: its first phase is not a transition, but may begin a deploy.
            if new in _DEPLOYING:
                self._deploy_started[name] = at
            return
        self._metrics.transitions.inc(name, old.value, new.value)
        if old in _RETRYING and new in _DEPLOYING:
            self._metrics.retries.inc(name)
        if new in _DEPLOYING:
            self._deploy_started.setdefault(name, at)
        elif new is Phase.Stable:
            started = self._deploy_started.pop(name, None)
            if started is not None:
                self._metrics.deploy_duration.observe(at - started, name)
        elif new is Phase.Init:
            self._deploy_started.pop(name, None)

    def _set_state(self, name: str, phase: Phase) -> None:
        for candidate in Phase:
            self._metrics.service_state.set(
                1.0 if candidate is phase else 0.0, name, candidate.value
            )

    def _forget(self, name: str) -> None:
        del self._seen[name]
        self._phases.pop(name, None)
        self._deploy_started.pop(name, None)
        self._metrics.service_state.remove_where("service", name)

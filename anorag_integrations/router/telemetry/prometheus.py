"""Prometheus metrics of routers, read from their own statistics at scrape time.

Nothing is added to a request's path for Prometheus: a custom collector reads each route's counters
(``RouteStats.counters()``, one lock), its breaker and its last probe when scraped. Every metric is
labelled ``router`` (``observability.name``, else the config file's stem) and ``route``; several
routers share one collector per registry, so each family is written once however many there are::

    anorag_requests_total{model, outcome}          calls ended, by the model that served them and outcome
                                                   (route: the one that ended it; "" when none was tried;
                                                   model "" when the call named no served model); see
                                                   tracing.outcome
    anorag_attempts_total                          attempts sent to the route
    anorag_attempt_failures_total{error_class}     failed attempts, by RouteError.error_class
    anorag_failovers_total                         requests that left the route after a transient failure
    anorag_output_tokens_total                     completion tokens the route reported
    anorag_hedges_total / anorag_hedges_won_total  hedged copies sent to the route / that answered first
    anorag_stream_continuations_total              cut streams the route continued
    anorag_request_duration_seconds                histogram: successful attempts, send to complete answer
    anorag_time_to_first_token_seconds             histogram: successful streams, send to first content
    anorag_requests_in_flight                      attempts in flight
    anorag_breaker_state{state}                    1 for the breaker's state, 0 for the others
    anorag_route_healthy                           1 when health() calls the route healthy
    anorag_throttled_until_timestamp_seconds       end of a Retry-After (Unix time; 0: not throttled)
    anorag_probe_duration_seconds                  the last active probe's latency
    anorag_route_info{model, kind}                 1, to join a route to the model and kind (chat, embedding) it serves
    anorag_route_serves{model}                     1 for each name the route serves now (its model, aliases,
                                                   the names its server lists: served-name aliases, LoRA)
    anorag_route_concurrency_limit                 attempts the route is sent at once (learnt, or max_concurrency)
    anorag_route_saturated                         1 while the route signals saturation (``admission/limit.py``)
    anorag_route_saturation_events_total           429/503/timeouts under load and slow answers that lowered it
    anorag_prefix_blocks_sent_total                ``prefix_aware``: prompt blocks this replica sent the route...
    anorag_prefix_blocks_predicted_total           ...and those its index (the fleet's, with shared state) predicted
                                                   cached: rate(predicted) / rate(sent), summed over replicas for
                                                   the fleet, is the predicted hit rate
    anorag_route_prefix_cache_hit_ratio            the server's own prefix-cache hit rate since it started
                                                   (``vllm:prefix_cache_hits_total / queries``, from ``/metrics``)

and per router only (no ``route`` label)::

    anorag_queue_depth{priority}                   calls waiting for a route with room
    anorag_shed_total{reason, priority}            calls shed with FleetSaturatedError, by its ``why``
    anorag_retries_denied_total                    retries and failovers the retry budget refused

Histograms, not quantile gauges: the statistics keep cumulative bucket counts beside their sample
windows (one integer increment per request), and only buckets add up across routes and replicas.
No URL is a label (a query string may hold a key); routes are named by their config key.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import forks
from ..endpoints.health import BreakerState
from .stats import Histogram

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ..core import Router
    from ..endpoints.route import Route

DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter uses by convention (``anorag-llm metrics``' default)."""
BREAKER_STATES = tuple(str(state) for state in BreakerState)
LABELS = ("router", "route")


def default_name(source: str) -> str:
    """The ``router`` label of a config read from ``source``: the file's stem ("default" for a dict)."""
    if source.startswith("<"):
        return "default"
    return Path(source).stem or "default"


class Exports:
    """One router's place in Prometheus registries and its metrics server; all given back by ``close()``.

    Holds the router weakly, so a router nobody holds is still collected (its finaliser closes this).
    """

    def __init__(self, router: Router) -> None:
        self._router = weakref.ref(router)
        obs = router.config.observability
        self.name = obs.name or default_name(router.config.source)
        """The ``router`` label of this router's metrics."""
        self._registries: list[CollectorRegistry] = []
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._lock = forks.rlock()

    def register(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        if self._router() is None:
            return
        with self._lock:
            if any(known is registry for known in self._registries):
                return
            _fleet(registry).add(self.name, self._router)
            self._registries.append(registry)

    def serve(self, port: int, addr: str) -> int:
        with self._lock:
            if self._server is None:
                if not self._registries:
                    self.register(CollectorRegistry(auto_describe=True))
                self._server = start_http_server(port, addr=addr, registry=self._registries[0])
            return int(self._server[0].server_port)

    def renew_after_fork(self) -> None:
        """In a forked child: the metrics server is the parent's (its socket too): forgotten, not stopped;
        ``serve_metrics()`` in the child starts the child's own."""
        self._server = None

    def close(self) -> None:
        """Leave every registry and stop the server."""
        with self._lock:
            registries, self._registries = self._registries, []
        for registry in registries:
            _leave(registry, self.name, self._router)
        self.halt()

    def halt(self) -> None:
        """Stop the server in a thread of its own, taking no lock: safe from the garbage collector's finaliser.

        The registries are left to forget the router themselves: their collector skips dead routers.
        """
        server, self._server = self._server, None
        if server is not None:
            httpd, thread = server
            threading.Thread(target=_stop_server, args=(httpd, thread), daemon=True).start()


def _stop_server(httpd: WSGIServer, thread: threading.Thread) -> None:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


_FLEETS: weakref.WeakKeyDictionary[CollectorRegistry, RouterCollector] = weakref.WeakKeyDictionary()
_FLEETS_LOCK = forks.lock()


def _fleet(registry: CollectorRegistry) -> RouterCollector:
    """The collector of every router registered in ``registry`` (registered there on first use)."""
    with _FLEETS_LOCK:
        fleet = _FLEETS.get(registry)
        if fleet is None:
            fleet = _FLEETS[registry] = RouterCollector()
            registry.register(fleet)
        return fleet


def _leave(registry: CollectorRegistry, name: str, router: weakref.ref[Router]) -> None:
    with _FLEETS_LOCK:
        fleet = _FLEETS.get(registry)
        if fleet is not None and fleet.remove(name, router):
            registry.unregister(fleet)
            del _FLEETS[registry]


class RouterCollector(Collector):
    """Every router registered in one registry: each family once, a ``router`` label per router."""

    def __init__(self) -> None:
        self._routers: dict[str, weakref.ref[Router]] = {}
        self._lock = forks.lock()

    def add(self, name: str, router: weakref.ref[Router]) -> None:
        with self._lock:
            known = self._routers.get(name)
            held = known() if known is not None else None
            if held is not None and known is not router and not held.closed:
                raise ValueError(
                    f"a router named {name!r} already exports metrics to this registry; give one of them "
                    "another observability.name in its config"
                )
            self._routers[name] = router

    def remove(self, name: str, router: weakref.ref[Router]) -> bool:
        """Forget ``router``; True when no router is left (the collector can leave the registry)."""
        with self._lock:
            if self._routers.get(name) is router:
                del self._routers[name]
            return not self._routers

    def _live(self) -> list[tuple[str, Router]]:
        with self._lock:
            pairs = [(name, ref()) for name, ref in self._routers.items()]
            for name, router in pairs:
                if router is None:  # collected without close(): forget it here, never from its finaliser
                    del self._routers[name]
        return [(name, router) for name, router in pairs if router is not None and not router.closed]

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry learns their names (and refuses clashes) cheaply."""
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        now, wall = time.monotonic(), time.time()
        for name, router in self._live():
            families.add_calls(name, router)
            tallies: dict[str, tuple[int, int]] = {}
            for pool in router.pools.values():
                if (tally := getattr(pool.policy, "tallies", None)) is not None:
                    tallies.update(tally())
            for route in router.routes.values():
                families.add_route(name, route, now, wall, tallies.get(route.name))
        return families.all()


class _Families:
    """The metric families of one scrape, filled route by route."""

    def __init__(self) -> None:
        def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=(*LABELS, *extra))

        def gauge(name: str, doc: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=(*LABELS, *extra))

        self.requests = counter(
            "anorag_requests", "Calls ended, by model and outcome (route: the one that ended it)", "model", "outcome"
        )
        self.attempts = counter("anorag_attempts", "Attempts sent to the route")
        self.failures = counter("anorag_attempt_failures", "Failed attempts, by error class", "error_class")
        self.failovers = counter("anorag_failovers", "Requests that left the route after a transient failure")
        self.tokens = counter("anorag_output_tokens", "Completion tokens the route reported")
        self.hedges = counter("anorag_hedges", "Hedged copies of slow requests sent to the route")
        self.hedges_won = counter("anorag_hedges_won", "Hedged copies sent to the route that answered first")
        self.continuations = counter("anorag_stream_continuations", "Streams cut elsewhere that the route continued")
        self.latency = HistogramMetricFamily(
            "anorag_request_duration_seconds",
            "Successful attempts: from sending the request to the complete answer",
            labels=LABELS,
        )
        self.ttft = HistogramMetricFamily(
            "anorag_time_to_first_token_seconds",
            "Successful streams: from sending the request to the first content chunk",
            labels=LABELS,
        )
        self.in_flight = gauge("anorag_requests_in_flight", "Attempts in flight on the route")
        self.breaker = gauge("anorag_breaker_state", "1 for the route's circuit breaker state, 0 otherwise", "state")
        self.healthy = gauge("anorag_route_healthy", "1 when the route is healthy (breaker, probe, throttling)")
        self.throttled = gauge(
            "anorag_throttled_until_timestamp_seconds", "When the route's Retry-After ends (Unix time; 0: none)"
        )
        self.probe = gauge("anorag_probe_duration_seconds", "Latency of the route's last active health probe")
        self.info = gauge(
            "anorag_route_info", "1 for each route, labelled with the model and kind it serves", "model", "kind"
        )
        self.serves = gauge("anorag_route_serves", "1 for each model name the route serves now", "model")
        self.limit = gauge("anorag_route_concurrency_limit", "Attempts the route is sent at once (admission control)")
        self.saturated = gauge("anorag_route_saturated", "1 while the route signals saturation (queueing, 429, 503)")
        self.saturations = counter(
            "anorag_route_saturation_events", "Saturation signals that lowered the route's concurrency limit"
        )
        self.prefix_sent = counter("anorag_prefix_blocks_sent", "prefix_aware: prompt blocks sent to the route")
        self.prefix_predicted = counter(
            "anorag_prefix_blocks_predicted", "prefix_aware: prompt blocks sent to the route its index predicted cached"
        )
        self.prefix_measured = gauge(
            "anorag_route_prefix_cache_hit_ratio", "The server's prefix-cache hit rate since it started (its /metrics)"
        )
        self.queue = GaugeMetricFamily(
            "anorag_queue_depth", "Calls waiting for a route with room, by priority", labels=("router", "priority")
        )
        self.shed = CounterMetricFamily(
            "anorag_shed",
            "Calls shed with FleetSaturatedError, by reason and priority",
            labels=("router", "reason", "priority"),
        )
        self.denied = CounterMetricFamily(
            "anorag_retries_denied", "Retries and failovers the retry budget refused", labels=("router",)
        )

    def all(self) -> list[Metric]:
        return [value for value in vars(self).values() if isinstance(value, Metric)]

    def add_calls(self, name: str, router: Router) -> None:
        routes = router.routes
        for (route, model, outcome), count in sorted(router.outcomes.snapshot().items()):
            if route and route not in routes:
                continue  # a route that left: its series went with it (a late call's outcome included)
            self.requests.add_metric([name, route, model, outcome], count)
        for priority, depth in sorted(router.admission.depth().items()):
            self.queue.add_metric([name, str(priority)], depth)
        for (why, priority), count in sorted(router.admission.shed.copy().items()):
            self.shed.add_metric([name, why, str(priority)], count)
        self.denied.add_metric([name], router.retry_budget.denied)

    def add_route(self, name: str, route: Route, now: float, wall: float, tally: tuple[int, int] | None) -> None:
        labels = [name, route.name]
        c = route.stats.counters()
        self.attempts.add_metric(labels, c.requests)
        for error_class, count in sorted(c.errors.items()):
            self.failures.add_metric([*labels, error_class], count)
        self.failovers.add_metric(labels, c.failovers)
        self.tokens.add_metric(labels, c.output_tokens)
        self.hedges.add_metric(labels, c.hedges)
        self.hedges_won.add_metric(labels, c.hedges_won)
        self.continuations.add_metric(labels, c.continuations)
        self.latency.add_metric(labels, list(_buckets(c.latency)), c.latency.sum)
        self.ttft.add_metric(labels, list(_buckets(c.ttft)), c.ttft.sum)
        self.in_flight.add_metric(labels, c.in_flight)
        state = route.breaker.state
        for known in BREAKER_STATES:
            self.breaker.add_metric([*labels, known], 1.0 if known == state else 0.0)
        throttled = route.not_before > now
        probe = route.probe_result
        healthy = state is not BreakerState.OPEN and probe.healthy is not False and not throttled
        self.healthy.add_metric(labels, 1.0 if healthy else 0.0)
        self.throttled.add_metric(labels, wall + route.not_before - now if throttled else 0.0)
        if probe.latency_ms is not None:
            self.probe.add_metric(labels, probe.latency_ms / 1000)
        self.info.add_metric([*labels, route.model, route.kind], 1.0)
        for model in sorted(route.served_names()):
            self.serves.add_metric([*labels, model], 1.0)
        limit = route.limit
        self.limit.add_metric(labels, limit.fixed if limit.fixed is not None else limit.limit)
        self.saturated.add_metric(labels, 1.0 if limit.saturated else 0.0)
        self.saturations.add_metric(labels, limit.saturations)
        if tally is not None:
            self.prefix_predicted.add_metric(labels, tally[0])
            self.prefix_sent.add_metric(labels, tally[1])
        if route.load is not None and (measured := route.load.prefix_hit_rate) is not None:
            self.prefix_measured.add_metric(labels, measured)


def _buckets(histogram: Histogram) -> Iterator[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
    total = 0
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        total += count
        yield ("+Inf" if bound == float("inf") else repr(bound)), total

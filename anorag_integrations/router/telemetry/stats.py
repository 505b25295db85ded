"""Per-route live statistics in bounded memory: counters plus sliding windows of recent samples.

Percentiles come from the last ``WINDOW`` samples of each series (a ``deque`` with ``maxlen``), so
memory stays flat however many requests pass, and the figures follow the route's recent behaviour.
Latency and TTFT are also counted into fixed cumulative buckets (``LATENCY_BUCKETS_S``,
``TTFT_BUCKETS_S``): one integer increment per sample, which a Prometheus scrape reads as a true
histogram (windowed percentiles cannot be summed across routes or replicas; bucket counts can).
A lock guards every update; updates never await, so the same object is safe from threads and tasks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any

from .. import forks

WINDOW = 2048
"""How many recent samples each percentile series keeps."""

REFRESH_EVERY = 16
"""Successes between two recomputations of a cached latency percentile (hedging's threshold)."""

EWMA_ALPHA = 0.2
"""Weight of the newest sample in the moving-average latency that ``least_latency`` uses."""

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds of the request-latency histogram (seconds; a last bucket takes everything above)."""
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the time-to-first-token histogram (seconds)."""


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no data."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Bucket counts (not cumulative; the last counts samples above every bound), their sum and bounds."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class Counters:
    """One consistent reading of a route's counters, for an exporter (no percentile is computed)."""

    requests: int
    successes: int
    failures: int
    in_flight: int
    output_tokens: int
    failovers: int
    hedges: int
    hedges_won: int
    continuations: int
    errors: dict[str, int]
    latency: Histogram
    ttft: Histogram


class RouteStats:
    """Counters and recent latency / TTFT / throughput samples of one route.

    ``requests``, ``successes``, ``failures`` and ``in_flight`` count attempts sent to this route;
    ``errors`` splits the failures by error class (``RouteError.error_class``); ``failovers`` counts
    requests that left this route for another after a transient failure; ``continuations`` streams
    cut elsewhere that this route continued.
    """

    def __init__(self, window: int = WINDOW) -> None:
        self._lock = forks.lock()
        self.requests = 0
        self.successes = 0
        self.failures = 0
        self.in_flight = 0
        self.output_tokens = 0
        self.ewma_latency_s: float | None = None
        self._latency: deque[float] = deque(maxlen=window)
        self._ttft: deque[float] = deque(maxlen=window)
        self._tps: deque[float] = deque(maxlen=window)
        self.last_error: str | None = None
        self.hedges = 0
        self.hedges_won = 0
        self.failovers = 0
        self.continuations = 0
        self.errors: dict[str, int] = {}
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum = 0.0
        self._ttft_counts = [0] * (len(TTFT_BUCKETS_S) + 1)
        self._ttft_sum = 0.0
        self._quantile: dict[float, tuple[int, float | None]] = {}

    def latency_quantile(self, q: float, min_samples: int = 1) -> float | None:
        """The q-th percentile (0-100) of recent latencies in seconds; None below ``min_samples``.

        Re-sorted only every ``REFRESH_EVERY`` successes, so asking per request stays cheap.
        """
        with self._lock:
            seen, value = self._quantile.get(q, (-REFRESH_EVERY, None))
            if self.successes - seen >= REFRESH_EVERY or (value is None and self.successes != seen):
                value = percentile(sorted(self._latency), q) if len(self._latency) >= min_samples else None
                self._quantile[q] = (self.successes, value)
            return value

    def hedged(self, won: bool) -> None:
        """A hedged copy of a request was sent here; ``won``: it answered first."""
        with self._lock:
            self.hedges += 1
            self.hedges_won += won

    def renew_after_fork(self) -> None:
        """In a forked child: the requests in flight are the parent's (the history is kept)."""
        self.in_flight = 0

    def started(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1

    def succeeded(self, latency_s: float, *, ttft_s: float | None = None, output_tokens: int | None = None) -> None:
        """Record a finished request; ``ttft_s`` for streams, tokens for throughput."""
        with self._lock:
            self.in_flight -= 1
            self.successes += 1
            self._latency.append(latency_s)
            self._latency_counts[bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
            self._latency_sum += latency_s
            if ttft_s is not None:
                self._ttft.append(ttft_s)
                self._ttft_counts[bisect_left(TTFT_BUCKETS_S, ttft_s)] += 1
                self._ttft_sum += ttft_s
            if output_tokens:
                self.output_tokens += output_tokens
                decode_s = latency_s - (ttft_s or 0.0)
                if decode_s > 0:
                    self._tps.append(output_tokens / decode_s)
            signal = ttft_s if ttft_s is not None else latency_s
            self.ewma_latency_s = (
                signal if self.ewma_latency_s is None else EWMA_ALPHA * signal + (1 - EWMA_ALPHA) * self.ewma_latency_s
            )

    def failed(self, error: str, error_class: str = "other") -> None:
        """Record a failed attempt: ``error`` is shown as ``last_error``, ``error_class`` is counted."""
        with self._lock:
            self.in_flight -= 1
            self.failures += 1
            self.last_error = error
            self.errors[error_class] = self.errors.get(error_class, 0) + 1

    def failed_over(self) -> None:
        """A request left this route for another after a transient failure here."""
        with self._lock:
            self.failovers += 1

    def continued(self) -> None:
        """A stream cut on another route was continued here."""
        with self._lock:
            self.continuations += 1

    def abandoned(self) -> None:
        """The caller stopped a stream early: neither a success nor a failure of the route."""
        with self._lock:
            self.in_flight -= 1

    def counters(self) -> Counters:
        """The counters and histogram buckets as one reading, cheaply (what a metrics scrape reads)."""
        with self._lock:
            return Counters(
                requests=self.requests,
                successes=self.successes,
                failures=self.failures,
                in_flight=self.in_flight,
                output_tokens=self.output_tokens,
                failovers=self.failovers,
                hedges=self.hedges,
                hedges_won=self.hedges_won,
                continuations=self.continuations,
                errors=dict(self.errors),
                latency=Histogram(LATENCY_BUCKETS_S, tuple(self._latency_counts), self._latency_sum),
                ttft=Histogram(TTFT_BUCKETS_S, tuple(self._ttft_counts), self._ttft_sum),
            )

    def snapshot(self) -> dict[str, Any]:
        """A plain dict of the current figures (milliseconds, tokens per second)."""
        with self._lock:
            lat = sorted(self._latency)
            ttft = sorted(self._ttft)
            tps = list(self._tps)
            out: dict[str, Any] = {
                "requests": self.requests,
                "successes": self.successes,
                "failures": self.failures,
                "in_flight": self.in_flight,
                "output_tokens": self.output_tokens,
                "hedges": self.hedges,
                "hedges_won": self.hedges_won,
                "failovers": self.failovers,
                "continuations": self.continuations,
                "errors": dict(self.errors),
                "last_error": self.last_error,
            }
        for name, values in (("latency", lat), ("ttft", ttft)):
            for q in (50, 95, 99):
                value = percentile(values, q)
                out[f"{name}_p{q}_ms"] = None if value is None else round(value * 1000, 2)
        out["tokens_per_s"] = round(sum(tps) / len(tps), 2) if tps else None
        return out


class CallOutcomes:
    """How the router's calls ended, by (route, model, outcome); one per router, thread-safe.

    The route is the one that served or ended the call (its last attempt), "" when no route was tried; the
    model is the one the call was served from (a configured or listed name, never a caller's free text:
    "" for a call refused before a model was known to be served).
    """

    def __init__(self) -> None:
        self._lock = forks.lock()
        self._counts: dict[tuple[str, str, str], int] = {}

    def add(self, route: str, model: str, outcome: str) -> None:
        key = (route, model, outcome)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def forget(self, route: str) -> None:
        """``route`` left the router: its counts go (and its series with them)."""
        with self._lock:
            self._counts = {key: n for key, n in self._counts.items() if key[0] != route}

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)

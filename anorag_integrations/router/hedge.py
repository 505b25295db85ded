"""Hedged requests: when to send a second copy of a slow non-streaming request, and how many.

A copy goes to another route once the first has not answered within the threshold: a fixed
``after_ms``, or a percentile (``after: p95``) of the first route's recent latencies, so only the
slowest few percent of requests are hedged. A token bucket bounds the extra load: every request
adds ``max_rate`` tokens (up to ``BURST``), a copy costs one, so over time at most ``max_rate`` of
requests are hedged however slow the fleet gets (Dean and Barroso, "The Tail at Scale").
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import HedgeConfig
    from .route import Route

BURST = 2.0
"""Most hedges the bucket allows back to back after a quiet spell."""


class Hedger:
    """Thresholds and the hedge budget of one router (thread-safe)."""

    def __init__(self, config: HedgeConfig) -> None:
        self.after_s = None if config.after_ms is None else config.after_ms / 1000
        self.quantile = None if config.after is None else float(config.after[1:])
        self.max_rate = config.max_rate
        self.min_samples = config.min_samples
        self._tokens = 1.0
        self._lock = threading.Lock()

    def delay(self, route: Route) -> float | None:
        """Seconds to wait for ``route`` before hedging; None: not enough history to know."""
        if self.after_s is not None:
            return self.after_s
        assert self.quantile is not None
        return route.stats.latency_quantile(self.quantile, self.min_samples)

    def earn(self) -> None:
        """A request that may be hedged has started: it adds ``max_rate`` to the budget."""
        with self._lock:
            self._tokens = min(BURST, self._tokens + self.max_rate)

    def spend(self) -> bool:
        """Take one hedge from the budget; False when it is spent."""
        with self._lock:
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    def refund(self) -> None:
        """A hedge that found no other route to go to gives its token back."""
        with self._lock:
            self._tokens = min(BURST, self._tokens + 1.0)

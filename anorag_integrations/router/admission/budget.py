"""The retry budget: retries and failovers together at most ``ratio`` of the calls started plus ``min_per_s``.

Counted over a sliding ``window`` of one-second buckets (Finagle's ``RetryBudget``, Envoy's retry
budgets): when failures dominate, the router stops multiplying the load it sends, and every call
beyond the budget ends with its first failure. With shared state the counts are the fleet's: each
replica adds its own to Redis in the background (``fleet_exchange``) and judges by the fleet's totals
plus what it has not reported yet, so spending never waits on Redis. Hedges have their own budget.
"""

from __future__ import annotations

import math
import time

from .. import forks


class RetryBudget:
    """Calls and retries per second over the last ``window`` seconds (thread-safe)."""

    def __init__(self, ratio: float, min_per_s: float, window: float) -> None:
        self.ratio, self.min_per_s = ratio, min_per_s
        self.size = max(1, math.ceil(window))
        self._lock = forks.lock()
        self._calls = [0] * self.size
        self._retries = [0] * self.size
        self._second = int(time.monotonic())
        self.denied = 0
        """Retries refused since the router started."""
        self._unsent = (0, 0)
        """(calls, retries) counted since the last exchange with the fleet."""
        self._fleet: tuple[float, float] | None = None
        """The fleet's (calls, retries) over the window at the last exchange (None: this replica's own count)."""

    def _roll(self) -> int:
        """The bucket of this second, emptying those of the seconds passed since (under the lock)."""
        now = int(time.monotonic())
        if now == self._second:
            return now % self.size
        for second in range(self._second + 1, min(now, self._second + self.size) + 1):
            self._calls[second % self.size] = self._retries[second % self.size] = 0
        self._second = max(self._second, now)
        return now % self.size

    def deposit(self) -> None:
        """A call started: it adds ``ratio`` retries to what the budget allows."""
        with self._lock:
            self._calls[self._roll()] += 1
            calls, retries = self._unsent
            self._unsent = (calls + 1, retries)

    def withdraw(self) -> bool:
        """A retry or failover is wanted: True (counted) while the budget allows it, else False."""
        with self._lock:
            bucket = self._roll()
            calls, retries = self._totals()
            if retries + 1 > self.ratio * calls + self.min_per_s * self.size:
                self.denied += 1
                return False
            self._retries[bucket] += 1
            unsent_calls, unsent_retries = self._unsent
            self._unsent = (unsent_calls, unsent_retries + 1)
            return True

    def _totals(self) -> tuple[float, float]:
        if self._fleet is None:
            return float(sum(self._calls)), float(sum(self._retries))
        calls, retries = self._fleet
        unsent_calls, unsent_retries = self._unsent
        return calls + unsent_calls, retries + unsent_retries

    def fleet_exchange(self) -> tuple[int, int]:
        """(calls, retries) counted since the last exchange: what this replica adds to the fleet's counts."""
        with self._lock:
            unsent, self._unsent = self._unsent, (0, 0)
            return unsent

    def fleet_totals(self, calls: float, retries: float) -> None:
        """The fleet's counts over the window, this replica's reported ones included: judge by them from now on."""
        with self._lock:
            self._fleet = (calls, retries)

    def fleet_lost(self) -> None:
        """The fleet's counts are out of reach: judge by this replica's own again."""
        with self._lock:
            self._fleet = None

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._roll()
            calls, retries = self._totals()
            return {
                "calls": int(calls),
                "retries": int(retries),
                "allowed": round(self.ratio * calls + self.min_per_s * self.size, 1),
                "denied_total": self.denied,
                "fleet_wide": self._fleet is not None,
            }

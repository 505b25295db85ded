"""A route's concurrency limit: how many attempts it is sent at once, learnt from how it behaves under load.

A saturated server is not a broken one: it answers, only later (queueing), or says so (429, 503), or
times out requests while it completes others. Each of those lowers the route's limit instead of
counting against its breaker; successes at the limit raise it again (additive increase, multiplicative
decrease, as TCP and Netflix's concurrency-limits do). An attempt is "slow" when it took more than
``tolerance`` times (and ``SLACK_S`` more than) the route's unloaded latency *for as many output tokens*
(latencies are kept per power-of-two bucket of tokens, so a long answer is never mistaken for queueing),
and answers run slow on average (one slow answer is noise). A route with
``max_concurrency`` in its config keeps that limit.

Counts live under the router's admission lock (``queue.py``); nothing here locks on its own.
"""

from __future__ import annotations

import math
import time
from collections import deque

BASELINE_WINDOW_S = 120.0
"""An unloaded latency is remembered this long (two rotating windows): a server that got slower for good is
learnt again within two windows instead of being judged against its best minute forever."""
MIN_SAMPLES = 3
"""Latencies a token bucket needs before slowness is judged against it."""
CUT_FLOOR = 0.5
"""The most one congestion signal cuts a limit by (a factor)."""
SATURATION_CUT = 0.7
"""What a 429, 503 or a timeout under load multiplies the limit by."""
SLACK_S = 0.05
"""An answer is slow only when it is also this much later than the unloaded one: jitter of a few milliseconds
on a fast route is not queueing."""
SMOOTHING = 0.2
"""Weight of the newest answer in the running ratio of latency to unloaded latency: one slow answer is noise,
a run of them is queueing."""
SATURATED_FOR_S = 5.0
"""How long after its last saturation signal a route is reported saturated."""


RATE_WINDOW_S = 2.0
"""Answers in this many seconds give the route's throughput (Little's law turns it into a limit when it queues)."""


def _bucket(tokens: int | None) -> int:
    """The latency bucket of an attempt that produced ``tokens`` output tokens (0: unknown or none)."""
    return 0 if not tokens or tokens < 1 else int(math.log2(tokens)) + 1


class ConcurrencyLimit:
    """The limit and in-flight count of one route (see the module docstring); read and changed under a lock."""

    __slots__ = (
        "_base",
        "_base_old",
        "_done",
        "_ratio",
        "_released",
        "_rotated",
        "_typical",
        "fixed",
        "in_flight",
        "last_cut",
        "last_success",
        "limit",
        "max_limit",
        "reserved",
        "saturated_at",
        "saturations",
        "slow_start",
        "tolerance",
    )

    def __init__(self, fixed: int | None, initial: int, max_limit: int, tolerance: float) -> None:
        self.fixed = fixed
        """``max_concurrency`` from the route's config: the limit is not learnt (None: it is)."""
        self.limit = float(fixed if fixed is not None else initial)
        self.max_limit = max(max_limit, fixed or 0)
        self.tolerance = tolerance
        self.in_flight = 0
        """Attempts running on the route (streams until they end)."""
        self.reserved = 0
        """Slots handed to queued calls that have not taken them yet."""
        self.slow_start = True
        """Until the first congestion signal the limit doubles per round trip rather than growing by one."""
        self.last_cut = -math.inf
        """When (perf_counter) the limit was last lowered: only attempts started after say anything new."""
        self.last_success = -math.inf
        """When the route last answered: a timeout after that is queueing, not a hung server."""
        self.saturated_at = -math.inf
        self.saturations = 0
        """Saturation signals counted (429/503 under load, timeouts under load, slow answers)."""
        self._base: dict[int, tuple[float, int]] = {}
        self._base_old: dict[int, tuple[float, int]] = {}
        self._rotated = time.monotonic()
        self._done: deque[float] = deque(maxlen=100_000)
        """When (perf_counter) the route answered lately: its throughput."""
        self._released: deque[float] = deque(maxlen=100_000)
        """When (monotonic) attempts here ended lately, however: the pace a queue for this route drains at."""
        self._ratio = 1.0
        """Running (exponentially smoothed) ratio of answers' latency to their unloaded latency."""
        self._typical: float | None = None
        """The unloaded latency of the route's last answer (for as many tokens)."""

    def room(self) -> bool:
        """Whether a new attempt may start here without waiting."""
        return self.in_flight + self.reserved < self.limit

    def released(self, now: float) -> None:
        """An attempt here ended (its slot is free)."""
        self.in_flight -= 1
        self._released.append(now)

    def drain_rate(self, now: float) -> float:
        """Slots freed per second lately (0 until ``MIN_SAMPLES`` were freed within ``RATE_WINDOW_S``): measured
        over the span the samples cover, so a first burst or one after a quiet spell is not diluted."""
        released = self._released
        while released and now - released[0] > RATE_WINDOW_S:
            released.popleft()
        if len(released) < MIN_SAMPLES:
            return 0.0
        return len(released) / max(now - released[0], RATE_WINDOW_S / 8)

    @property
    def saturated(self) -> bool:
        """Whether the route signalled saturation recently (``SATURATED_FOR_S``)."""
        return time.monotonic() - self.saturated_at < SATURATED_FOR_S

    def answered(self, t0: float, latency_s: float, tokens: int | None, at_limit: bool) -> None:
        """An attempt started at ``t0`` answered after ``latency_s`` with ``tokens`` output tokens; ``at_limit``:
        the route was at its limit when it started (only then does a fast answer say the limit may grow)."""
        self.last_success = now = time.perf_counter()
        self._done.append(now)
        key = _bucket(tokens)
        base = self._typical = self._baseline(key)
        if base is not None:
            self._ratio += SMOOTHING * (latency_s / base - self._ratio)
        if base is not None and latency_s > self.tolerance * base + SLACK_S and self._ratio > self.tolerance:
            self._cut(t0, max(CUT_FLOOR, self.tolerance * base / latency_s))
        elif at_limit and self.fixed is None and t0 > self.last_cut:
            self.limit = min(self.max_limit, self.limit + (1.0 if self.slow_start else 1.0 / self.limit))
        self._remember(key, latency_s)

    def saturation(self, t0: float) -> None:
        """A 429 or 503 while the route was loaded, or a timeout while it answered others: it is queueing."""
        self._cut(t0, SATURATION_CUT)

    def answered_since(self, t0: float) -> bool:
        """Whether the route answered some attempt after ``t0`` (perf_counter): it is alive, only busy."""
        return self.last_success > t0

    def _cut(self, t0: float, factor: float) -> None:
        """Lower the limit: to what the route's throughput sustains at an unloaded latency within tolerance
        (Little's law), when both are measured, never above ``factor`` times the limit it has."""
        self.saturated_at = time.monotonic()
        self.saturations += 1
        self.slow_start = False
        if self.fixed is not None or t0 <= self.last_cut:
            return  # sent before the last cut: the limit it saw is gone already
        now = time.perf_counter()
        limit = self.limit * factor
        done = self._done
        while done and now - done[0] > RATE_WINDOW_S:
            done.popleft()
        if self._typical is not None and len(done) >= MIN_SAMPLES:
            limit = min(limit, len(done) / RATE_WINDOW_S * self.tolerance * self._typical)
        self.limit = max(1.0, limit)
        self.last_cut = now

    def _baseline(self, key: int) -> float | None:
        """The route's unloaded latency for bucket ``key``: the least seen in the last two windows."""
        now, old = self._base.get(key), self._base_old.get(key)
        if now is None or old is None:
            best, count = now or old or (math.inf, 0)
        else:
            best, count = min(now[0], old[0]), now[1] + old[1]
        return best if count >= MIN_SAMPLES else None

    def _remember(self, key: int, latency_s: float) -> None:
        now = time.monotonic()
        if now - self._rotated > BASELINE_WINDOW_S:
            self._base_old, self._base, self._rotated = self._base, {}, now
        best, count = self._base.get(key, (math.inf, 0))
        self._base[key] = (min(best, latency_s), count + 1)

    def snapshot(self) -> dict[str, object]:
        """What ``stats()`` shows of the limit."""
        return {
            "concurrency_limit": self.fixed if self.fixed is not None else round(self.limit, 1),
            "limit_learnt": self.fixed is None,
            "saturated": self.saturated,
            "saturation_events": self.saturations,
        }

"""Hedged requests: when to send a second copy of a slow non-streaming request, and how many.

A copy goes to another route once the first has not answered within the threshold: a fixed
``after_ms``, or a percentile (``after: p95``) of the first route's recent latencies, so only the
slowest few percent of requests are hedged. A token bucket bounds the extra load: every request
adds ``max_rate`` tokens (up to ``BURST``), a copy costs one, so over time at most ``max_rate`` of
requests are hedged however slow the fleet gets (Dean and Barroso, "The Tail at Scale").

With shared state the bucket is the fleet's, kept in Redis: a replica's requests add to it, and a
replica holds at most one token of it at a time, taken in the background (``fleet_exchange``), so
spending never waits on Redis and the whole fleet hedges at most ``max_rate`` of its requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from openai.types.chat import ChatCompletion

from . import forks
from .call import Call
from .errors import PermanentRouteError
from .info import attach

if TYPE_CHECKING:
    from ..config import HedgeConfig
    from .endpoints.route import Route

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
        self._lock = forks.lock()
        self._fleet = False
        """Whether the budget is the fleet's (shared state, Redis reachable): earnings go to it."""
        self._earned = 0.0
        """Earned since the last exchange with the fleet's bucket."""

    def delay(self, route: Route) -> float | None:
        """Seconds to wait for ``route`` before hedging; None: not enough history to know."""
        if self.after_s is not None:
            return self.after_s
        assert self.quantile is not None
        return route.stats.latency_quantile(self.quantile, self.min_samples)

    @property
    def tokens(self) -> float:
        """Hedges this replica may send now (with shared state: the fleet's tokens it holds)."""
        with self._lock:
            return self._tokens

    def earn(self) -> None:
        """A request that may be hedged has started: it adds ``max_rate`` to the budget."""
        with self._lock:
            if self._fleet:
                self._earned += self.max_rate
            else:
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

    def fleet_exchange(self) -> tuple[float, bool]:
        """(earned since the last exchange, whether a token is wanted): what goes to the fleet's bucket.

        The first exchange makes the budget the fleet's: this replica's own tokens are dropped (the
        fleet's bucket starts with one token, as a replica's does), or N replicas would bring N bursts.
        """
        with self._lock:
            if not self._fleet:
                self._fleet = True
                self._tokens = 0.0
            earned, self._earned = self._earned, 0.0
            return earned, self._tokens < 1.0

    def fleet_granted(self, tokens: float) -> None:
        """The fleet's bucket gave this replica ``tokens`` (0 or 1)."""
        with self._lock:
            self._tokens = min(BURST, self._tokens + tokens)

    def fleet_lost(self) -> None:
        """The fleet's bucket is out of reach: the budget is this replica's own again (earnings kept)."""
        with self._lock:
            if self._fleet:
                self._fleet = False
                self._tokens = min(BURST, self._tokens + self._earned)
                self._earned = 0.0


async def race(call: Call, hedger: Hedger, achat: Callable[[Call], Awaitable[ChatCompletion]]) -> ChatCompletion:
    """Race ``call`` against a copy on another route sent after the threshold; cancel the loser.

    Both copies are cancelled whenever the race ends, the caller's cancellation included. When both
    fail, the original's error is raised.
    """
    hedger.earn()
    first: asyncio.Task[ChatCompletion] = asyncio.ensure_future(achat(call))
    tasks: dict[asyncio.Task[ChatCompletion], Call] = {first: call}
    twin: Call | None = None
    winner = first
    try:
        await asyncio.sleep(0)  # the task picks its route before its first await
        delay = hedger.delay(call.active) if call.active is not None else None
        if delay is not None:
            done, _ = await asyncio.wait({first}, timeout=delay)
            if not done and call.active is not None and hedger.spend():
                twin = call.hedge_copy(avoid=call.active)
                tasks[asyncio.ensure_future(achat(twin))] = twin
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            settled = [t for t in done if t.exception() is None or isinstance(t.exception(), PermanentRouteError)]
            if settled:
                winner = settled[0]
                break
    finally:
        unfinished = [task for task in tasks if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)  # let the losers release their routes
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # every copy's error is the race's to report: none is "never retrieved"
    if twin is None:
        return winner.result()
    return _result(hedger, winner, tasks[winner], call, twin)


def _result(hedger: Hedger, winner: asyncio.Task[ChatCompletion], by: Call, call: Call, twin: Call) -> ChatCompletion:
    """The winner's response (or error), its info telling both calls' attempts and the hedge route."""
    if twin.active is None:
        hedger.refund()  # the copy found no other route to go to
    else:
        twin.active.stats.hedged(won=by is twin and winner.exception() is None)
    by.info.attempts = call.info.attempts + twin.info.attempts
    by.info.hedge = twin.active.name if twin.active is not None else None
    return attach(winner.result(), by.info)

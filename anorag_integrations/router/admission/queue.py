"""Admission: every attempt takes a slot on its route; when every route of a call is full the call waits here.

Waiters are served by priority (lower first, as vLLM's ``priority``), then in arrival order; once the
oldest of a priority has waited ``lifo_after`` seconds the newest of that priority goes first
(adaptive LIFO: under sustained overload the calls that are answered stay fast, the hopeless ones are
shed early rather than all answered late). A freed slot is handed to the first waiter that may use its
route (no newcomer takes it first). A waiter's time is its deadline, else ``queue_timeout``, else its
attempt timeout; a call whose expected wait (its place in the queue over the fleet's drain rate) passes
that is shed at once with :class:`FleetSaturatedError`, and so is one pushed back past it later, or out
of a full queue by a higher priority. One lock guards the queue and every route's counts.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import forks
from ..errors import FleetSaturatedError, RouterClosed

if TYPE_CHECKING:
    from ...config import AdmissionConfig
    from ..balancing.server_load import LoadReport
    from ..call import Call
    from ..endpoints.route import Route

RATE_WINDOW_S = 2.0
"""Slots freed in this many seconds give the drain rate an expected wait is computed from."""
MAX_RATE_SAMPLES = 100_000
"""Most release times kept for the drain rate."""
RETRY_AFTER_BOUNDS = (0.1, 60.0)
"""The suggested ``retry_after`` of a shed call, in seconds, is kept within these."""


class Waiter:
    """One call waiting for a slot; ``granted`` is the route whose slot it was handed."""

    __slots__ = ("call", "expires", "future", "granted", "key", "names", "shed", "since", "wake")

    def __init__(self, call: Call, names: frozenset[str], expires: float, key: tuple[int, int]) -> None:
        self.call, self.names, self.expires, self.key = call, names, expires, key
        self.since = time.monotonic()
        self.granted: Route | None = None
        self.shed: str | None = None
        """Why the waiter was shed while it waited (pushed back past its time, pushed out by a priority)."""
        self.wake: Callable[[], None] = _nothing
        self.future: asyncio.Future[None] | None = None


class Admission:
    """The router's admission control: slots per route, the wait queue, what was shed (thread-safe)."""

    def __init__(self, config: AdmissionConfig, attempt_timeout: float) -> None:
        self.enabled = config.enabled
        self.max_queue = config.max_queue
        self.queue_timeout = config.queue_timeout
        self.attempt_timeout = attempt_timeout
        self.lifo_after = config.lifo_after
        self._lock = forks.lock()
        self._waiting: list[Waiter] = []
        """In the order they are served: by ``Waiter.key`` (priority, then arrival; LIFO entries negative)."""
        self._order = itertools.count(1)
        self._releases: deque[float] = deque(maxlen=MAX_RATE_SAMPLES)
        self.shed: Counter[tuple[str, int]] = Counter()
        """Calls shed, by (why, priority)."""
        self.queued = 0
        """Calls that waited for a slot."""
        self.waited_s = 0.0
        """Their total wait."""
        self.closed = False

    # --- slots ------------------------------------------------------------------------------------

    def take(self, route: Route, call: Call) -> bool | None:
        """A slot on ``route`` for an attempt of ``call``: its grant, or free room. None: the route is full;
        else whether the route was at its limit (only then does a quick answer let the limit grow)."""
        limit = route.limit
        with self._lock:
            if call.granted is route:
                call.granted = None
                limit.reserved -= 1
            elif self.enabled and not limit.room():
                return None
            limit.in_flight += 1
            return limit.in_flight + limit.reserved >= limit.limit

    def give_back(self, route: Route) -> None:
        """An attempt on ``route`` ended: its slot goes to the first waiter that may use it."""
        with self._lock:
            route.limit.in_flight -= 1
            self._releases.append(time.monotonic())
            if self._waiting:
                self._grant(route)

    def return_grant(self, call: Call) -> None:
        """``call`` was handed a slot it cannot use (its route's breaker opened meanwhile): the next waiter's."""
        with self._lock:
            route, call.granted = call.granted, None
            if route is not None:
                route.limit.reserved -= 1
                if self._waiting:
                    self._grant(route)

    def answered(self, route: Route, t0: float, latency_s: float, tokens: int | None, at_limit: bool) -> None:
        with self._lock:
            route.limit.answered(t0, latency_s, tokens, at_limit)

    def saturation(self, route: Route, t0: float) -> None:
        with self._lock:
            route.limit.saturation(t0)

    def scraped(self, route: Route, load: LoadReport | None) -> None:
        """A ``/metrics`` reading of ``route``'s server (when a policy reads them): requests waiting there while
        this router has attempts in flight mean it is sent more than it runs, whoever else sends it work."""
        if load is not None and load.waiting >= 1:
            with self._lock:
                if route.limit.in_flight > 0:
                    route.limit.saturation(time.perf_counter())

    def _grant(self, route: Route) -> None:
        """Hand ``route``'s free slots to waiters, first come (by priority) first served (under the lock)."""
        limit = route.limit
        i = 0
        while limit.room() and i < len(self._waiting):
            waiter = self._waiting[i]
            if route.name not in waiter.names:
                i += 1
                continue
            del self._waiting[i]
            waiter.granted = route
            limit.reserved += 1
            waiter.wake()

    # --- waiting ----------------------------------------------------------------------------------

    def wait(self, call: Call, names: frozenset[str]) -> None:
        """Wait (sync) until a slot on one of ``names`` is handed to ``call`` (``call.granted``); else raise
        :class:`FleetSaturatedError` (or ``RouterClosed``)."""
        event = threading.Event()
        waiter = self._enqueue(call, names, event.set)
        try:
            event.wait(max(0.0, waiter.expires - time.monotonic()))
        finally:
            self._settle(waiter)

    async def await_slot(self, call: Call, names: frozenset[str]) -> None:
        """Async twin of :meth:`wait`; a cancellation gives a slot handed meanwhile back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits there any more
                loop.call_soon_threadsafe(_resolve, future)

        waiter = self._enqueue(call, names, wake)
        timer = loop.call_later(max(0.0, waiter.expires - time.monotonic()), _resolve, future)
        call.ctl.awaiting = True
        try:
            await future
        except asyncio.CancelledError:
            self._forget(waiter)
            if call.ctl.uncancelled():
                raise RouterClosed("the router was closed while this call waited for a route") from None
            raise
        finally:
            call.ctl.awaiting = False
            timer.cancel()
        self._settle(waiter)

    def _enqueue(self, call: Call, names: frozenset[str], wake: Callable[[], None]) -> Waiter:
        """Queue ``call``, or shed it at once (queue full, or its expected wait past its time)."""
        now = time.monotonic()
        bound = self.queue_timeout or call.timeout or self.attempt_timeout
        expires = now + bound if call.deadline is None else min(now + bound, call.deadline)
        with self._lock:
            if self.closed:
                raise RouterClosed("the router was closed while this call waited for a route")
            key = (call.priority, self._key(call.priority, now))
            waiter = Waiter(call, names, expires, key)
            waiter.wake = wake
            if len(self._waiting) >= self.max_queue:
                worst = self._waiting[-1] if self._waiting else None
                if worst is None or worst.key[0] <= call.priority:
                    raise self._shed_error(call, "queue_full", 0.0)
                self._push_out(worst, "priority")
            place = bisect.bisect(self._waiting, key, key=lambda w: w.key)
            rate = self._rate(now)
            if rate > 0 and (place + 1) / rate > expires - now:
                raise self._shed_error(call, "wait", 0.0)
            self._waiting.insert(place, waiter)
            self.queued += 1
            if rate > 0:
                self._recheck(place + 1, rate, now, call.priority)
        return waiter

    def _key(self, priority: int, now: float) -> int:
        """The arrival part of a waiter's key: FIFO, or newest first once its priority's oldest waited too long."""
        n = next(self._order)
        oldest = min((w.since for w in self._waiting if w.key[0] == priority), default=now)
        return -n if now - oldest > self.lifo_after else n

    def _recheck(self, start: int, rate: float, now: float, priority: int) -> None:
        """Waiters pushed back by a newcomer: shed those whose wait now passes their time (under the lock)."""
        i = start
        while i < len(self._waiting):
            waiter = self._waiting[i]
            if (i + 1) / rate > waiter.expires - now:
                self._push_out(waiter, "priority" if priority < waiter.key[0] else "wait")
            else:
                i += 1

    def _push_out(self, waiter: Waiter, why: str) -> None:
        self._waiting.remove(waiter)
        waiter.shed = why
        waiter.wake()

    def _settle(self, waiter: Waiter) -> None:
        """After the wait: the slot handed over becomes the call's, or the call is shed."""
        call = waiter.call
        with self._lock:
            waited = time.monotonic() - waiter.since
            self.waited_s += waited
            if waiter.granted is not None:
                call.granted = waiter.granted
                call.info.queued_s += waited
                return
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            if self.closed:
                raise RouterClosed("the router was closed while this call waited for a route")
            raise self._shed_error(call, waiter.shed or "timeout", waited)

    def _forget(self, waiter: Waiter) -> None:
        """A cancelled waiter leaves the queue; a slot it was handed goes to the next one."""
        with self._lock:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            route = waiter.granted
            if route is not None:
                waiter.granted = None
                route.limit.reserved -= 1
                self._grant(route)

    def _rate(self, now: float) -> float:
        """Slots freed per second lately (0: none, or not measured yet)."""
        releases = self._releases
        while releases and now - releases[0] > RATE_WINDOW_S:
            releases.popleft()
        return len(releases) / RATE_WINDOW_S

    def _shed_error(self, call: Call, why: str, waited: float) -> FleetSaturatedError:
        """Count a shed call and build its error (under the lock)."""
        self.shed[(why, call.priority)] += 1
        rate = self._rate(time.monotonic())
        low, high = RETRY_AFTER_BOUNDS
        retry_after = 1.0 if rate <= 0 else min(high, max(low, (len(self._waiting) + 1) / rate))
        call.info.shed = why
        return FleetSaturatedError(
            call.info.attempts,
            why=why,
            retry_after=retry_after,
            priority=call.priority,
            waited_s=waited,
            queued=len(self._waiting),
        )

    # --- what it shows ----------------------------------------------------------------------------

    def depth(self) -> dict[int, int]:
        """Calls waiting now, by priority."""
        with self._lock:
            return dict(Counter(w.key[0] for w in self._waiting))

    def snapshot(self) -> dict[str, object]:
        """The queue and what was shed, for ``Router.overload()``."""
        with self._lock:
            now = time.monotonic()
            return {
                "enabled": self.enabled,
                "queue_depth": len(self._waiting),
                "queued_by_priority": dict(Counter(w.key[0] for w in self._waiting)),
                "oldest_wait_s": round(now - min((w.since for w in self._waiting), default=now), 3),
                "drain_rate_per_s": round(self._rate(now), 2),
                "queued_total": self.queued,
                "waited_s_total": round(self.waited_s, 3),
                "shed": {f"{why}/{priority}": n for (why, priority), n in sorted(self.shed.items())},
            }

    def renew_after_fork(self) -> None:
        """In a forked child: the parent's waiters are the parent's (the routes' counts are renewed with them)."""
        self._waiting = []
        self._releases.clear()

    def close(self) -> None:
        """The router closes: every waiter wakes to ``RouterClosed``."""
        with self._lock:
            self.closed = True
            waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.wake()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _nothing() -> None:
    return None

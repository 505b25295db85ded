"""Admission: every attempt takes a slot on its route; when every route of a call is full the call waits here.

Waiters are served by priority (lower first, as vLLM's ``priority``), then in arrival order; once the
oldest of a priority has waited ``lifo_after`` seconds the newest of that priority goes first
(adaptive LIFO: under sustained overload the calls that are answered stay fast, the hopeless ones are
shed early rather than all answered late). A freed slot is handed to the first waiter that may use its
route (no newcomer takes it first). A waiter's time is its deadline, else ``queue_timeout``,
else its attempt timeout; a call whose expected wait (its place among the waiters for the same routes,
over the pace those routes free slots at) passes that is shed at once with :class:`FleetSaturatedError`,
and so is one pushed back past it later, or out of a full queue by a higher priority. One lock guards the
queue and every route's counts.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .. import forks
from ..errors import FleetSaturatedError, RouterClosed
from .limit import ConcurrencyLimit

if TYPE_CHECKING:
    from ...config import AdmissionConfig
    from ..balancing.server_load import LoadReport
    from ..call import Call
    from ..endpoints.route import Route

RETRY_AFTER_BOUNDS = (0.1, 60.0)
"""The suggested ``retry_after`` of a shed call, in seconds, is kept within these."""


class Waiter:
    """One call waiting for a slot on one of ``routes``; ``granted`` is the route whose slot it was handed.

    Waiters for the same route names are one class: a waiter's expected wait counts the waiters of its class
    ahead of it over its routes' drain rate (waiters of other classes, which overlap rarely, are not counted).
    """

    __slots__ = ("call", "expires", "granted", "key", "names", "routes", "shed", "since", "wake")

    def __init__(self, call: Call, routes: tuple[Route, ...], expires: float, key: tuple[int, int]) -> None:
        self.call, self.routes, self.expires, self.key = call, routes, expires, key
        self.names = frozenset(route.name for route in routes)
        """A slot on any route of these names will do (a route replaced by a reload keeps its name)."""
        self.since = time.monotonic()
        self.granted: Route | None = None
        self.shed: str | None = None
        """Why the waiter was shed while it waited (pushed back past its time, pushed out by a priority)."""
        self.wake: Callable[[], bool] = _woken
        """Wakes the waiting call; False when it cannot be woken any more (its event loop is closed)."""

    def rate(self, now: float) -> float:
        """Slots its routes freed per second lately (0: not measured yet)."""
        return sum(route.limit.drain_rate(now) for route in self.routes)


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
            route.limit.released(time.monotonic())
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

    def offer(self, routes: Iterable[Route]) -> None:
        """Routes joined (added, or replaced by a reload): their room goes to the calls waiting for their names."""
        with self._lock:
            for route in routes:
                if self._waiting:
                    self._grant(route)

    def _grant(self, route: Route) -> None:
        """Hand ``route``'s free slots to waiters, first come (by priority) first served (under the lock)."""
        limit = route.limit
        if route.breaker.retired:
            return  # the route left: its slots are nobody's (the waiters for its name wait for its successor)
        i = 0
        while limit.room() and i < len(self._waiting):
            waiter = self._waiting[i]
            if route.name not in waiter.names:
                i += 1
                continue
            del self._waiting[i]
            waiter.granted = route
            limit.reserved += 1
            if not waiter.wake():  # nobody can take it (the waiter's loop is closed): the slot stays free
                waiter.granted = None
                limit.reserved -= 1

    # --- waiting ----------------------------------------------------------------------------------

    def wait(self, call: Call, routes: tuple[Route, ...]) -> None:
        """Wait (sync) until a slot on one of ``routes`` is handed to ``call`` (``call.granted``); else raise
        :class:`FleetSaturatedError` (or ``RouterClosed``)."""
        event = threading.Event()

        def wake() -> bool:
            event.set()
            return True

        waiter = self._enqueue(call, routes, wake)
        try:
            event.wait(max(0.0, waiter.expires - time.monotonic()))
        finally:
            self._settle(waiter)

    async def await_slot(self, call: Call, routes: tuple[Route, ...]) -> None:
        """Async twin of :meth:`wait`; a cancellation gives a slot handed meanwhile back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> bool:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the loop closed: nobody awaits there any more
                return False
            return True

        waiter = self._enqueue(call, routes, wake)
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

    def _enqueue(self, call: Call, routes: tuple[Route, ...], wake: Callable[[], bool]) -> Waiter:
        """Queue ``call``, or shed it at once (queue full, or its expected wait past its time)."""
        now = time.monotonic()
        bound = self.queue_timeout or call.timeout or self.attempt_timeout
        expires = now + bound if call.deadline is None else min(now + bound, call.deadline)
        with self._lock:
            if self.closed:
                raise RouterClosed("the router was closed while this call waited for a route")
            key = call.queue_key or (call.priority, self._key(call.priority, now))
            call.queue_key = key  # a call that waits again (its grant could not be used) keeps its place
            waiter = Waiter(call, routes, expires, key)
            waiter.wake = wake
            worst = self._waiting[-1] if len(self._waiting) >= self.max_queue and self._waiting else None
            if len(self._waiting) >= self.max_queue and (worst is None or worst.key[0] <= call.priority):
                raise self._shed_error(call, "queue_full", 0.0)
            place = bisect.bisect(self._waiting, waiter.key, key=lambda w: w.key)
            ahead = sum(1 for w in self._waiting[:place] if w.names == waiter.names)
            rate = waiter.rate(now)
            if rate > 0 and (ahead + 1) / rate > expires - now:
                raise self._shed_error(call, "wait", 0.0, ahead, rate)
            if worst is not None:
                self._push_out(worst, "priority")
            self._waiting.insert(place, waiter)
            self.queued += 1
            if rate > 0:
                self._recheck(waiter, place, ahead + 1, rate, now)
            for route in routes:  # a slot freed after the call found its routes full: served in queue order now
                if route.limit.room():
                    self._grant(route)
        return waiter

    def _key(self, priority: int, now: float) -> int:
        """The arrival part of a waiter's key: FIFO, or newest first once its priority's oldest waited too long."""
        n = next(self._order)
        oldest = min((w.since for w in self._waiting if w.key[0] == priority), default=now)
        return -n if now - oldest > self.lifo_after else n

    def _recheck(self, newcomer: Waiter, place: int, position: int, rate: float, now: float) -> None:
        """Waiters of the newcomer's class it pushed back: shed those whose wait now passes their time (under the
        lock). ``position`` is the newcomer's place in its class, counting from 1."""
        i = place + 1
        while i < len(self._waiting):
            waiter = self._waiting[i]
            if waiter.names != newcomer.names:
                i += 1
                continue
            position += 1
            if position / rate > waiter.expires - now:
                self._push_out(waiter, "priority" if newcomer.key[0] < waiter.key[0] else "wait")
                position -= 1
            else:
                i += 1

    def _push_out(self, waiter: Waiter, why: str) -> None:
        self._waiting.remove(waiter)
        waiter.shed = why
        waiter.wake()  # a waiter that cannot be woken any more is simply gone

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
            raise self._shed_error(call, waiter.shed or "timeout", waited, rate=waiter.rate(time.monotonic()))

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
        """Slots the fleet freed per second lately (0: not measured yet)."""
        return sum(limit.drain_rate(now) for limit in self._limits())

    def _limits(self) -> list[ConcurrencyLimit]:
        """The limits of the routes the queue's waiters wait for."""
        return list({id(r.limit): r.limit for w in self._waiting for r in w.routes}.values())

    def _shed_error(
        self, call: Call, why: str, waited: float, ahead: int | None = None, rate: float | None = None
    ) -> FleetSaturatedError:
        """Count a shed call and build its error (under the lock). ``ahead``: the waiters before it (default all),
        ``rate``: how fast they drain (default the queue's): its ``retry_after`` is the time they take."""
        self.shed[(why, call.priority)] += 1
        rate = self._rate(time.monotonic()) if rate is None else rate
        low, high = RETRY_AFTER_BOUNDS
        ahead = len(self._waiting) if ahead is None else ahead
        retry_after = 1.0 if rate <= 0 else min(high, max(low, (ahead + 1) / rate))
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


def _woken() -> bool:
    return True

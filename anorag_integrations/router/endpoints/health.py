"""Route health: a passive circuit breaker per route and an active background prober.

Breaker states::

    closed ──(failure_threshold consecutive transient failures)──► open
    open ──(cooldown elapsed)──► half_open: one trial request is let through
    half_open ──trial succeeds──► closed        half_open ──trial fails──► open (cool-down again)

The prober calls ``GET /health`` (``GET /v1/models`` when that is 404) on every route every
``probe_interval`` seconds and records latency and served models. A failed probe opens the breaker at
once, so a dead server leaves the rotation before a user request finds it; a good probe ends an open
breaker's cool-down, so a restarted server gets its trial request without waiting out ``cooldown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from .. import forks

if TYPE_CHECKING:
    from .route import Route

log = logging.getLogger("anorag_integrations.router")


ADOPT_SLACK_S = 0.001
"""Transitions of other replicas closer than this to the local one are taken as the same moment."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerListener(Protocol):
    """What shares a breaker's transitions with other replicas (``state.py``); both calls touch local memory only."""

    def breaker_changed(self, route: str) -> None:
        """The breaker of ``route`` opened, or closed after being open."""
        ...

    def may_trial(self, route: str, epoch: int) -> bool:
        """Whether this replica may send the half-open trial of ``route``'s breaker in generation ``epoch``."""
        ...


class Ticket:
    """Permission to send one request, from :meth:`CircuitBreaker.acquire`; hand it back exactly once.

    ``epoch`` is the breaker's generation when it was issued: an outcome from a request admitted
    before the breaker last opened is stale and cannot close it or hold its trial slot.
    """

    __slots__ = ("epoch", "held", "trial")

    def __init__(self, epoch: int, trial: bool) -> None:
        self.epoch = epoch
        self.trial = trial
        self.held = True
        """Not handed back yet: the breaker counts it among its tickets out (a removed route drains on them)."""


class CircuitBreaker:
    """Counts consecutive failures of one route and stops traffic to it while it is open.

    Half-open admits exactly one trial (the ticket with ``trial=True``); only that trial's outcome
    closes or re-opens the breaker, and its slot is freed by every outcome (success, failure, release).
    """

    def __init__(
        self, failure_threshold: int = 3, cooldown_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = forks.lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._epoch = 0
        self._trial_in_flight = False
        self._out = 0
        self._on_idle: Callable[[], None] | None = None
        self.retired = False
        """The route left the router: no new ticket; ``on_idle`` runs once the last one out is handed back."""
        self.name = ""
        """The route's name, as the listener knows it."""
        self.listener: BreakerListener | None = None
        """Shared state told of every transition, and asked before a half-open trial (None: this process alone)."""

    @property
    def epoch(self) -> int:
        """The breaker's generation: it grows every time the breaker opens (or adopts another replica's close), so a
        change means the route was down in between."""
        with self._lock:
            return self._epoch

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._peek()

    def renew_after_fork(self) -> None:
        """In a forked child: the requests in flight are the parent's (their tickets never come back here), and so
        is a half-open trial in flight: the child's calls may send one."""
        self._trial_in_flight = False
        self._out = 0

    @property
    def trial_in_flight(self) -> bool:
        """Whether a half-open trial request holds the slot now."""
        with self._lock:
            return self._trial_in_flight

    def _peek(self) -> BreakerState:
        """The state as a caller sees it now. With shared state, half-open only in the replica that holds the
        fleet's trial: asked when the cool-down ends, and again whenever the trial slot is free (a trial given
        back does not keep a grant that may have passed to another replica meanwhile)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN if self._may_trial() else BreakerState.OPEN
        if self._state is BreakerState.HALF_OPEN and not self._trial_in_flight and not self._may_trial():
            return BreakerState.OPEN
        return self._state

    def _may_trial(self) -> bool:
        return self.listener is None or self.listener.may_trial(self.name, self._epoch)

    def wants_trial(self) -> bool:
        """Open with its cool-down over: a trial is due, if this replica may send it (see ``may_trial``)."""
        with self._lock:
            return self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s

    def reading(self) -> tuple[bool, float, int]:
        """(open, monotonic time it opened, epoch): what another replica needs to adopt this breaker's state."""
        with self._lock:
            return self._state is not BreakerState.CLOSED, self._opened_at, self._epoch

    def available(self) -> bool:
        """Whether a request may be sent now, without claiming the half-open trial."""
        with self._lock:
            if self.retired:
                return False
            state = self._peek()
            return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial_in_flight)

    def acquire(self) -> Ticket | None:
        """Claim permission to send one request; in half-open only one caller at a time gets it."""
        with self._lock:
            if self.retired:
                return None
            state = self._peek()
            if state is BreakerState.CLOSED:
                self._out += 1
                return Ticket(self._epoch, False)
            if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
                self._state = BreakerState.HALF_OPEN
                self._trial_in_flight = True
                self._out += 1
                return Ticket(self._epoch, True)
            return None

    @property
    def tickets_out(self) -> int:
        """Tickets issued and not handed back yet: the route's requests in flight, streams included."""
        with self._lock:
            return self._out

    def retire(self, on_idle: Callable[[], None]) -> None:
        """The route leaves the router: refuse every new ticket and run ``on_idle`` (once, outside the lock) as
        soon as no ticket is out (at once when none is)."""
        with self._lock:
            self.retired = True
            self._on_idle = on_idle
            idle = self._idle()
        if idle is not None:
            idle()

    def _hand_back(self, ticket: Ticket) -> Callable[[], None] | None:
        """Count ``ticket`` back in (once, whatever the outcome calls); the idle callback when it was the last."""
        if ticket.held:
            ticket.held = False
            self._out -= 1
        return self._idle()

    def _idle(self) -> Callable[[], None] | None:
        """The retired breaker's ``on_idle``, taken (so it runs once), when no ticket is out; else None."""
        if not self.retired or self._out > 0 or self._on_idle is None:
            return None
        idle, self._on_idle = self._on_idle, None
        return idle

    def record_success(self, ticket: Ticket) -> None:
        with self._lock:
            idle = self._hand_back(ticket)
            self._succeeded(ticket)
        if idle is not None:
            idle()

    def _succeeded(self, ticket: Ticket) -> None:
        """A success: closes a half-open breaker when it is the trial's (under the lock)."""
        if ticket.epoch != self._epoch:
            return  # admitted before the breaker opened: says nothing about the server now
        if ticket.trial or self._state is BreakerState.CLOSED:
            reopened = self._state is not BreakerState.CLOSED
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._trial_in_flight = False
            if reopened and self.listener is not None:
                self.listener.breaker_changed(self.name)

    def record_failure(self, ticket: Ticket) -> bool:
        """Count a transient failure; True when this one opened the breaker."""
        with self._lock:
            idle = self._hand_back(ticket)
            opened = self._failed(ticket)
        if idle is not None:
            idle()
        return opened

    def _failed(self, ticket: Ticket) -> bool:
        """A transient failure counted (under the lock); True when it opened the breaker."""
        if ticket.epoch != self._epoch:
            return False
        if ticket.trial:
            self._open()
            return True
        if self._state is not BreakerState.CLOSED:
            return False
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()
            return True
        return False

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose request ended neither way (cancelled, a permanent 400)."""
        with self._lock:
            idle = self._hand_back(ticket)
            if ticket.trial and ticket.epoch == self._epoch:
                self._trial_in_flight = False
        if idle is not None:
            idle()

    def probe_succeeded(self) -> None:
        """An active probe found the server up: end the cool-down so one trial request goes through.

        The breaker closes only when real traffic succeeds: a server whose ``/health`` answers but
        whose completions fail gets one trial per probe, not a stream of failing requests.
        """
        with self._lock:
            if self._state is BreakerState.OPEN:
                self._opened_at = self._clock() - self.cooldown_s

    def force_open(self) -> None:
        """Open at once: an active probe found the server down."""
        with self._lock:
            self._open()

    def adopt_open(self, opened_at: float) -> bool:
        """Another replica opened this route's breaker at ``opened_at`` (monotonic, this process's clock).

        A closed breaker opens as of then; an open one whose cool-down started earlier restarts it
        from then. The listener is not told (the change came from the fleet). True when it changed.
        """
        with self._lock:
            if self._state is BreakerState.CLOSED:
                self._open(notify=False)
                self._opened_at = min(opened_at, self._opened_at)
                return True
            if opened_at > self._opened_at + ADOPT_SLACK_S:
                self._opened_at = opened_at
                return True
            return False

    def adopt_closed(self, closed_at: float) -> bool:
        """Another replica's trial closed this route's breaker at ``closed_at`` (monotonic): close, unless
        this breaker opened after that. Outcomes of requests admitted before are stale from now on."""
        with self._lock:
            if self._state is BreakerState.CLOSED or self._opened_at > closed_at + ADOPT_SLACK_S:
                return False
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._trial_in_flight = False
            self._epoch += 1
            return True

    def _open(self, notify: bool = True) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._epoch += 1
        self._trial_in_flight = False
        self._failures = 0
        if notify and self.listener is not None:
            self.listener.breaker_changed(self.name)


class Poller:
    """Runs a check on every route every ``interval_s``: in a daemon thread, or as a task on a loop."""

    def __init__(
        self,
        routes: Iterable[Route],
        interval_s: float,
        check: Callable[[Route], object],
        acheck: Callable[[Route], Awaitable[object]],
        name: str,
    ) -> None:
        self.routes = list(routes)
        self.interval_s = interval_s
        self._check, self._acheck, self._name = check, acheck, name
        self.gate: Callable[[Route], bool] | None = None
        """Which routes this replica checks now (None: all); shared state lets one replica probe each route."""
        self._stop = forks.event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()) or (
            self._task is not None and not self._task.done()
        )

    def start(self) -> None:
        """Start the thread (no-op when already running)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def astart(self) -> None:
        """Start as a task on the running event loop (no-op when already running)."""
        if self.running:
            return
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._arun(), name=self._name)

    def renew_after_fork(self) -> None:
        """In a forked child: a thread that ran in the parent runs again; a task (of the parent's loop) is forgotten."""
        ran = self._thread is not None and not self._stop.is_set()
        self._thread = self._task = None
        if ran:
            self.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for route in self.routes:
                if self._stop.is_set():
                    return
                if self.gate is not None and not self.gate(route):
                    continue  # another replica leads this route's checks and shares their results
                try:
                    self._check(route)
                except Exception:  # one route's surprise must not stop the checks of every route
                    log.exception("%s: checking route %r failed", self._name, route.name)
            self._stop.wait(self.interval_s)

    async def _arun(self) -> None:
        while not self._stop.is_set():
            routes = [route for route in self.routes if self.gate is None or self.gate(route)]
            results = await asyncio.gather(*(self._acheck(route) for route in routes), return_exceptions=True)
            for route, result in zip(routes, results, strict=True):
                if isinstance(result, Exception):
                    log.error("%s: checking route %r failed: %r", self._name, route.name, result)
            await asyncio.sleep(self.interval_s)

    def halt(self) -> None:
        """Ask the thread to stop, without waiting for it (safe from a finaliser)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def astop(self) -> None:
        """Stop and wait for the task to end."""
        task = self._task
        self.stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task


class Prober(Poller):
    """The active health prober: ``Route.probe`` on every route every ``interval_s``."""

    def __init__(self, routes: Iterable[Route], interval_s: float) -> None:
        super().__init__(routes, interval_s, lambda r: r.probe(), lambda r: r.aprobe(), "anorag-health-prober")

"""One attempt of one call on one route, from claim to release: the only owner of its bookkeeping.

A :class:`Lease` takes the route's breaker ticket (the half-open trial slot included) and its
in-flight count, bounds the attempt in time (a loop :class:`Timer` for async, a :class:`Watch` for
sync), classifies *every* way the attempt can end and gives everything back exactly once::

    succeeded()      statistics, breaker success, CallInfo
    failed(exc)      the caller's own cancellation  -> abandoned, re-raised as it came
                     Router.close() cut it short    -> abandoned, RouterClosed
                     anything else                  -> a route failure (typed, counted, breaker);
                                                       permanent ones raised, transient ones returned
    abandoned()      nothing counted against the route; the trial slot is freed

Sync, async, streams, hedged copies, stream continuations and embedding batches all go through it. It also owns the
attempt's trace span (started with the lease, ended by whichever outcome comes first) and counts a
failover when this attempt follows a transient failure of the same request on another route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .bounds import WATCHDOG, Timer, Watch
from .call import Call
from .classify import REFUSED, classify, refused, trips_breaker
from .endpoints.health import Ticket
from .errors import (
    Attempt,
    EndpointNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    PermanentRouteError,
    RouteError,
    RouterClosed,
    TransientRouteError,
)
from .telemetry import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .endpoints.route import Route

log = logging.getLogger("anorag_integrations.router")
_T = TypeVar("_T")

_CALLERS_OWN = (GeneratorExit, KeyboardInterrupt, SystemExit, asyncio.CancelledError)
"""How a caller ends a call on purpose (besides cancelling its task): never the route's fault."""


class Lease:
    """Route ``route`` claimed for one attempt of ``call`` (see the module docstring)."""

    __slots__ = (
        "at_limit",
        "call",
        "cut_reason",
        "ended",
        "headers",
        "route",
        "span",
        "t0",
        "ticket",
        "timeout",
        "timer",
        "watch",
    )

    def __init__(self, call: Call, route: Route, ticket: Ticket, *, at_limit: bool = False) -> None:
        """Takes over ``ticket`` and a slot of the route's concurrency (``Admission.take``, done by the caller)."""
        self.call, self.route, self.ticket = call, route, ticket
        self.at_limit = at_limit
        """The route was at its concurrency limit when the attempt started (a quick answer lets the limit grow)."""
        self.ended = False
        self.cut_reason: str | None = None
        """Why :meth:`cut` ended the attempt early (its server went away), if it did."""
        self.watch: Watch | None = None
        self.timer: Timer | None = None
        try:
            self.timeout = call.attempt_timeout(route)
        except BaseException:
            route.breaker.release(ticket)  # the deadline ran out between the pick and the send
            call.router.admission.give_back(route)
            raise
        route.stats.started()
        route.leases.add(self)
        self.t0 = time.perf_counter()
        call.active, call.ctl.lease = route, self
        call.round_attempts += 1
        if call.failed_on is not None:
            if call.failed_on is not route:
                call.failed_on.stats.failed_over()
            call.failed_on = None
        self.span: Span | None = None
        self.headers: dict[str, str] | None = None
        """What carries the attempt's trace context to the server (``traceparent``); None: not traced."""
        if call.span is not None:
            self.span = tracing.start_attempt(self, call.span)
            if self.span is not None:
                self.headers = tracing.carrier(self.span, route.propagate)

    # --- sending ----------------------------------------------------------------------------------

    def bound(self) -> float:
        """Monotonic time by which the next piece (answer, first chunk, next chunk) must arrive."""
        if self.cut_reason is not None:
            return time.monotonic()  # cut while the caller held a chunk: the next read ends it
        at = time.monotonic() + self.timeout
        return at if self.call.deadline is None else min(at, self.call.deadline)

    def send(self, send: Callable[[Route, float], _T]) -> _T:
        """Run a sync attempt under its time bound (its socket is cut when the bound passes or on close)."""
        if self.call.ctl.aborted:
            raise RouterClosed("the router was closed before this attempt was sent")
        watch = self.watch = Watch(self.bound())
        WATCHDOG.arm(watch)
        try:
            with watch:
                if self.span is None:
                    return send(self.route, self.timeout)
                token = tracing.attach(self.span)
                try:
                    return send(self.route, self.timeout)
                finally:
                    tracing.detach(token)
        finally:
            if not self.call.stream:
                watch.end()  # the connection may be back in the pool already: never cut it now

    def rearm(self) -> None:
        """A sync stream reads its next chunk: a fresh bound (within the deadline)."""
        if self.watch is not None:
            WATCHDOG.move(self.watch, self.bound())

    def pause(self) -> None:
        """The caller holds a chunk: only the deadline runs (its own pace is not the route's fault)."""
        if self.watch is not None:
            self.watch.at = self.call.deadline if self.call.deadline is not None else float("inf")

    def unwatch(self) -> None:
        """Stop watching before the stream's connection goes back to the pool."""
        if self.watch is not None:
            self.watch.end()

    async def asend(self, send: Callable[[Route, float], Awaitable[_T]]) -> _T:
        """Run an async attempt under its time bound."""
        with self:
            if self.span is None:
                return await send(self.route, self.timeout)
            token = tracing.attach(self.span)
            try:
                return await send(self.route, self.timeout)
            finally:
                tracing.detach(token)

    def __enter__(self) -> Lease:
        """Around one await of the router's own (the answer, a stream's next chunk): a fresh bound."""
        ctl = self.call.ctl
        ctl.task = asyncio.current_task()  # a stream may be read from another task than the one that opened it
        if self.timer is None:
            self.timer = Timer(ctl)
        self.timer.start(self.bound())
        ctl.awaiting = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.call.ctl.awaiting = False
        if kind is asyncio.CancelledError and self.timer is not None and self.timer.taken():
            raise TimeoutError(f"no answer within the attempt's bound ({self.timeout:g}s)") from None

    def cut(self, reason: str) -> None:
        """End the attempt now, as if its bound had passed (from any thread): its server went away, so the call
        fails over, or its stream continues, instead of waiting out the timeout on a connection nobody serves."""
        if self.ended or self.cut_reason is not None:
            return
        self.cut_reason = reason
        if self.watch is not None:
            self.watch.fire(reason)
        timer = self.timer
        if timer is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing awaits there any more
                timer.loop.call_soon_threadsafe(self._expire)

    def _expire(self) -> None:
        """On the attempt's loop: cancel the await of this attempt, if it is the one the call awaits now."""
        ctl = self.call.ctl
        if not self.ended and ctl.lease is self and ctl.awaiting and self.timer is not None:
            self.timer.expire()

    # --- outcomes ---------------------------------------------------------------------------------

    def opened(self) -> None:
        """A stream's first content arrived: the caller learns which route (and model) serves it."""
        info = self.call.info
        info.route, info.model = self.route.name, self.call.sent_model(self.route)

    def succeeded(self, *, output_tokens: int | None, ttft_s: float | None = None) -> None:
        if self._end():
            return
        route, info = self.route, self.call.info
        latency = time.perf_counter() - self.t0
        route.stats.succeeded(latency, ttft_s=ttft_s, output_tokens=output_tokens)
        self.call.router.admission.answered(route, self.t0, latency, output_tokens, self.at_limit)
        route.breaker.record_success(self.ticket)
        self.call.router._served(route)
        info.route, info.latency_s, info.ttft_s = route.name, latency, ttft_s
        info.model = self.call.sent_model(route)
        if self.span is not None:
            tracing.end_attempt(self, "success")

    def abandoned(self, why: str = "cancelled", error: RouteError | None = None) -> None:
        """The attempt ended neither way (cancelled, cut by close, lost a hedge race); ``why`` goes on its span."""
        if self._end():
            return
        self.route.stats.abandoned()
        self.route.breaker.release(self.ticket)
        if self.span is not None:
            tracing.end_attempt(self, why, error)

    def failed(self, exc: BaseException) -> RouteError:
        """Classify how the attempt ended with ``exc``; return a transient error to fail over on.

        Raises instead when the request must end: the caller's own cancellation (as it came),
        ``RouterClosed``, or a permanent error (400, 401, 404, ...).
        """
        call = self.call
        if isinstance(exc, asyncio.CancelledError) and call.ctl.uncancelled():
            self.abandoned("closed")
            raise RouterClosed("the router was closed while this call was in flight") from exc
        if isinstance(exc, _CALLERS_OWN):
            self.abandoned()
            raise exc
        if call.ctl.aborted or call.router.closed:
            self.abandoned("closed")
            raise RouterClosed("the router was closed while this call was in flight") from exc
        if isinstance(exc, TypeError | ValueError | RecursionError) and (problem := call.unsendable()) is not None:
            self.abandoned("invalid")  # the request could not even be built: the caller's mistake, no route's
            raise InvalidRequestError(f"the request cannot be sent: {problem}") from exc
        if self.ended:  # already settled (e.g. a stream's consumer raised after the end): nothing to count
            return classify(exc, route=self.route.name, url=self.route.base_url, model="", timeout=None)
        error = self._classify(exc)
        if self._deadline_passed(exc, error):  # the request ran out of time: not this route's fault
            self.abandoned("deadline", error)
            call.info.attempts.append(Attempt(self.route.name, error, time.perf_counter() - self.t0, call.info.rounds))
            raise call.exhausted("deadline exceeded") from exc
        self._end()
        dropped = isinstance(error, ModelNotFoundError) and self._drop_model()
        self._count(error, trips=not dropped)
        call.info.attempts.append(Attempt(self.route.name, error, time.perf_counter() - self.t0, call.info.rounds))
        if self.span is not None:
            tracing.end_attempt(self, "failure", error)
        if isinstance(error, PermanentRouteError) and not self._elsewhere(error, dropped):
            raise error from exc
        if error.error_class == "connect_error" and refused(exc):
            self.route.cut_in_flight(REFUSED)
        call.failed_on = self.route
        log.info("failing over: %s", error)
        return error

    def _timed_out(self, exc: BaseException) -> bool:
        """Whether the attempt's own time bound ended it (its timer, or the watch cut the socket)."""
        if isinstance(exc, PermanentRouteError):
            return False
        return (isinstance(exc, TimeoutError) and not isinstance(exc, RouteError)) or (
            self.watch is not None and self.watch.fired
        )

    def _deadline_passed(self, exc: BaseException, error: RouteError) -> bool:
        """The request's deadline, not the route, ended the attempt (it failed transiently as time ran out)."""
        deadline = self.call.deadline
        if deadline is None or time.monotonic() < deadline - 0.005:
            return False
        return self._timed_out(exc) or isinstance(error, TransientRouteError)

    def _classify(self, exc: BaseException) -> RouteError:
        route, call = self.route, self.call
        if self.cut_reason is not None and self._timed_out(exc):
            return TransientRouteError(
                f"cut short: {self.cut_reason}",
                route=route.name,
                url=route.base_url,
                hint="the server went away mid-request (a restart, a rolling update); retried elsewhere",
                error_class="server_gone",
            )
        if self._timed_out(exc):
            past_deadline = call.deadline is not None and time.monotonic() >= call.deadline - 0.005
            what = "the request deadline passed" if past_deadline else f"after {self.timeout:g}s"
            return TransientRouteError(
                f"timed out {what} (no complete answer)",
                route=route.name,
                url=route.base_url,
                hint="the server may be overloaded, hung or trickling its answer; raise this route's `timeout` "
                "(or params.timeout, or the call's deadline) if long generations are expected",
                error_class="timeout",
            )
        return classify(exc, route=route.name, url=route.base_url, model=call.sent_model(route), timeout=self.timeout)

    def _elsewhere(self, error: RouteError, dropped: bool) -> bool:
        """Whether a permanent error is this route's alone, with another route to try: a 404 for the model (the
        route left its group) or a route without the endpoint (its base_url lacks /v1), when others serve it."""
        call = self.call
        if dropped:
            return call.router.models.serves(call.kind, call.model)
        if isinstance(error, EndpointNotFoundError) and call.pinned is None:
            return len(call.router.models.candidates(call.kind, call.model)) > 1
        return False

    def _drop_model(self) -> bool:
        """A 404 from a route thought to serve the call's model: the route leaves that model's group (until its
        ``/v1/models`` lists it again) and the call fails over within the group; the breaker is not touched."""
        call = self.call
        if call.pinned is not None:
            return False
        name = call.sent_model(self.route)
        if not self.route.drop_model(name):
            return False
        log.warning(
            "route %r (%s) answered 404 for model %r: out of that model's group until its /v1/models lists it",
            self.route.name,
            self.route.base_url,
            name,
        )
        return True

    def _count(self, error: RouteError, *, trips: bool = True) -> None:
        route, call = self.route, self.call
        hint = f" (hint: {error.hint})" if error.hint else ""
        route.stats.failed(f"{type(error).__name__}: {error.message}{hint}", error.error_class)
        if trips and self._saturated(error):
            route.breaker.release(self.ticket)  # saturated is not broken: the route is sent less, not shut out
            call.router.admission.saturation(route, self.t0)
        elif trips and trips_breaker(error):
            if route.breaker.record_failure(self.ticket):
                log.warning("route %r: circuit breaker opened after: %s", route.name, error)
        else:
            route.breaker.release(self.ticket)
        if error.retry_after is not None:
            wait = min(error.retry_after, call.router.config.params.max_retry_after)
            route.throttle(wait)
            call.retry_after = max(call.retry_after, wait)

    def _saturated(self, error: RouteError) -> bool:
        """Whether the route failed the attempt because it is busy, not broken: a 429 or 503, or a timeout, while
        it had other attempts in flight and answered one lately (since one attempt timeout before this one
        began). A server that answers nothing for longer is hung, loaded or not: its breaker counts it."""
        if error.error_class not in ("429", "503", "timeout"):
            return False
        limit = self.route.limit
        return limit.answered_since(self.t0 - self.timeout) and (limit.in_flight > 0 or limit.answered_since(self.t0))

    def _end(self) -> bool:
        """Mark the lease ended; True when it already was (every outcome is taken once)."""
        if self.ended:
            return True
        self.ended = True
        self.route.leases.discard(self)
        self.call.router.admission.give_back(self.route)
        if self.watch is not None:
            self.watch.end()
        if self.timer is not None:
            self.timer.stop()
        if self.call.ctl.lease is self:
            self.call.ctl.lease = None
        return False

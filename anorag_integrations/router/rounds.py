"""Rounds of one request: pick a route, lease it, fail over, back off, until it is served or out of time.

A round offers each usable route once (the policy picks, ``fallback_route`` last); a transient
failure moves on to the next pick, a permanent one ends the request. Between rounds the request
waits tenacity's random exponential backoff, at least any ``Retry-After`` (capped by
``params.max_retry_after``), never past its ``deadline``: a wait that would pass it ends the request
at once, saying why. Every attempt is a :class:`~.lease.Lease`, the only owner of its bookkeeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tenacity import wait_random_exponential

from .call import Call, wall_clock
from .errors import AllRoutesFailed, RouterClosed
from .lease import Lease

if TYPE_CHECKING:
    from .core import Router
    from .route import Route

BACKOFF_INITIAL_S = 0.25
"""Scale of the first wait between rounds (tenacity's random exponential)."""
BACKOFF_MAX_S = 8.0
"""Longest wait between two rounds, unless a ``Retry-After`` asks for more."""

_T = TypeVar("_T")
_BACKOFF = wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)


@dataclass(slots=True)
class _Round:
    """What tenacity's backoff reads of a retry state: the number of the attempt that failed."""

    attempt_number: int


def claim(router: Router, call: Call, tried: set[str]) -> Lease | None:
    """Lease the next route to try in this round; None when the round is exhausted."""
    if call.pinned is not None:
        if call.pinned.name in tried or (ticket := call.pinned.breaker.acquire()) is None:
            return None
        return Lease(call, call.pinned, ticket)
    now = time.monotonic()
    lost: set[str] = set()  # half-open trials a concurrent request took first

    def usable(route: Route) -> bool:
        return (
            route.name not in tried
            and route.name not in lost
            and route.available(now)
            and (route.continue_streams or not call.continuing)
        )

    while (route := router.policy.pick(router._primary, usable, call)) is not None:
        if (ticket := route.breaker.acquire()) is not None:
            return Lease(call, route, ticket)
        lost.add(route.name)
    fb = router._fallback
    if fb is not None and usable(fb) and (ticket := fb.breaker.acquire()) is not None:
        return Lease(call, fb, ticket)
    return None


def one_round(router: Router, call: Call, send: Callable[[Route, float], _T]) -> tuple[Lease, _T]:
    """One round, sync: the first route that answers, with its (still open) lease."""
    call.start_round()
    tried = set(call.avoid)
    while (lease := claim(router, call, tried)) is not None:
        tried.add(lease.route.name)
        try:
            return lease, lease.send(send)
        except BaseException as exc:
            lease.failed(exc)
    raise call.exhausted()


async def aone_round(router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Lease, _T]:
    """Async twin of :func:`one_round`."""
    call.start_round()
    tried = set(call.avoid)
    while (lease := claim(router, call, tried)) is not None:
        tried.add(lease.route.name)
        try:
            return lease, await lease.asend(send)
        except BaseException as exc:
            lease.failed(exc)
    raise call.exhausted()


def rounds(router: Router, call: Call, send: Callable[[Route, float], _T]) -> tuple[Lease, _T]:
    """Every round of one request until a route answers (sync)."""
    while True:
        try:
            return one_round(router, call, send)
        except AllRoutesFailed as failed:
            wait = next_wait(call, failed)
        if router._closing.wait(wait):
            raise RouterClosed("the router was closed while this call waited to retry")


async def arounds(router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Lease, _T]:
    """Async twin of :func:`rounds`."""
    while True:
        try:
            return await aone_round(router, call, send)
        except AllRoutesFailed as failed:
            wait = next_wait(call, failed)
        call.ctl.awaiting = True
        try:
            await asyncio.sleep(wait)
        except asyncio.CancelledError:
            if call.ctl.uncancelled():
                raise RouterClosed("the router was closed while this call waited to retry") from None
            raise
        finally:
            call.ctl.awaiting = False
        if router.closed:
            raise RouterClosed("the router was closed while this call waited to retry")


def next_wait(call: Call, failed: AllRoutesFailed) -> float:
    """Seconds to wait before the next round; raises (``failed`` or a clearer error) when there is none."""
    done = call.info.rounds
    if done > call.max_retries:
        raise failed
    wait = max(_BACKOFF(_Round(done)), call.retry_after)  # type: ignore[arg-type]
    left = call.left()
    if left is not None and wait >= left:
        if 0 < left <= call.retry_after:
            until = wall_clock(time.monotonic() + call.retry_after)
            raise AllRoutesFailed(
                call.info.attempts,
                f"routes throttled by Retry-After until {until}, after the request deadline",
            ) from failed
        raise failed
    return wait

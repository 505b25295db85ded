"""Rounds of one request: pick a route, lease it, fail over, back off, until it is served or out of time.

A round offers each usable route of the call's kind once (its pool's policy picks, the pool's
fallback route last); a transient failure moves on to the next pick, a permanent one ends the
request. Between rounds the request
waits tenacity's random exponential backoff, at least any ``Retry-After`` (capped by
``params.max_retry_after``), never past its ``deadline``: a wait that would pass it ends the request
at once, saying why. Every attempt is a :class:`~.lease.Lease`, the only owner of its bookkeeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from tenacity import wait_random_exponential

from .balancing.policies import Policy, make_policy
from .balancing.prefix_index import Sessions
from .call import Call, wall_clock
from .errors import (
    AllRoutesFailed,
    ContextOverflowError,
    FleetSaturatedError,
    ModelNotFoundError,
    RetryBudgetExhausted,
    RouterClosed,
)
from .lease import Lease

if TYPE_CHECKING:
    from ..config import Config
    from .core import Router
    from .endpoints.route import Route
    from .models import Group

BACKOFF_INITIAL_S = 0.25
"""Scale of the first wait between rounds (tenacity's random exponential)."""
BACKOFF_MAX_S = 8.0
"""Longest wait between two rounds, unless a ``Retry-After`` asks for more."""
MAX_SESSIONS = 100_000
"""Conversations (``session_id``) whose route a pool remembers; the least recently used are forgotten."""

_T = TypeVar("_T")
FALL_BACK_AFTER = (AllRoutesFailed, ContextOverflowError, ModelNotFoundError)
"""What ends a model's rounds and sends the call on to a fallback model, when it has one."""
_BACKOFF = wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)


@dataclass(slots=True)
class _Round:
    """What tenacity's backoff reads of a retry state: the number of the attempt that failed."""

    attempt_number: int


@dataclass(slots=True)
class Pool:
    """The routes of one kind (chat or embedding): those its policy picks from, and the one tried last.

    Each kind has a policy of its own, so a policy's per-list caches (a hash ring, weights) and its
    rotation are not disturbed by calls of the other kind.
    """

    primary: list[Route]
    fallback: Route | None
    policy: Policy
    sessions: Sessions = field(default_factory=lambda: Sessions(MAX_SESSIONS))
    """``session_id`` -> the primary route that took the conversation's last request."""
    on_fallback: bool = False
    """Whether the last call of this kind was served by the fallback route (logged once per switch)."""


def make_pools(config: Config, routes: Mapping[str, Route]) -> dict[str, Pool]:
    """One pool per route kind, each with its own instance of the configured policy."""
    from ..config import ROUTE_KINDS  # the config module imports the router: not at import time

    pools: dict[str, Pool] = {}
    for kind in ROUTE_KINDS:
        fallback_name = config.fallback_route_of(kind)
        fallback = routes[fallback_name] if fallback_name else None
        primary = [routes[name] for name in config.route_names(kind) if routes[name] is not fallback]
        pools[kind] = Pool(primary, fallback, make_policy(config.lb_policy, **config.policy_options()))
    return pools


def update_pools(pools: Mapping[str, Pool], config: Config, routes: Mapping[str, Route]) -> None:
    """The routes changed live: each pool takes its kind's new routes and keeps its policy (and what it learnt)."""
    for kind, pool in pools.items():
        fallback_name = config.fallback_route_of(kind)
        pool.fallback = routes[fallback_name] if fallback_name else None
        pool.primary = [routes[name] for name in config.route_names(kind) if routes[name] is not pool.fallback]


def claim(router: Router, call: Call, tried: set[str], full: set[str]) -> Lease | None:
    """Lease the next route of the call's kind to try in this round; None when the round is exhausted.

    Routes skipped only because they are at their concurrency limit are added to ``full``: the call may wait
    for one of them (``admission/``) rather than fail.
    """
    if call.granted is not None and (lease := _granted(router, call, tried)) is not None:
        return lease
    if call.pinned is not None:
        if call.pinned.name in tried:
            return None
        return _lease(router, call, call.pinned, full)
    now = time.monotonic()
    lost: set[str] = set()  # half-open trials a concurrent request took first, or slots taken meanwhile

    def usable(route: Route) -> bool:
        if (
            route.name in tried
            or route.name in lost
            or not route.available(now)
            or not (route.continue_streams or not call.continuing)
        ):
            return False
        if admission.enabled and not route.limit.room():
            full.add(route.name)
            return False
        return True

    admission = router.admission
    pool = router.pools[call.kind]
    group = router.models.group(call.kind, call.model)
    session = call.session_id
    if session is not None and (lease := _session_lease(router, call, pool, group, session, usable, full)) is not None:
        return lease
    while (route := pool.policy.pick(group, usable, call)) is not None:
        if (lease := _lease(router, call, route, full)) is not None:
            if session is not None:
                pool.sessions.set(session, route.name)
            return lease
        lost.add(route.name)
    fb = router.models.fallback_for(call.kind, call.model)
    if call.continuing and fb is not None and call.sent_model(fb) != call.continues_model:
        fb = None  # a cut stream is never continued by another model: two models' text in one answer
    if fb is not None and usable(fb):
        return _lease(router, call, fb, full)
    return None


def _lease(router: Router, call: Call, route: Route, full: set[str]) -> Lease | None:
    """An attempt on ``route``: its breaker's ticket and a slot, paid by the retry budget when it follows a
    failure; None (nothing held) when the breaker refuses or the route is full (then added to ``full``)."""
    _pay_retry(router, call)
    if (ticket := route.breaker.acquire()) is None:
        return None
    slot = router.admission.take(route, call)
    if slot is None:
        route.breaker.release(ticket)
        full.add(route.name)
        return None
    return Lease(call, route, ticket, at_limit=slot)


def _pay_retry(router: Router, call: Call) -> None:
    """An attempt after a failure is a retry or failover: the retry budget pays for it, or the call ends."""
    if len(call.info.attempts) > call.retries:
        if not router.retry_budget.withdraw():
            raise RetryBudgetExhausted(
                call.info.attempts, "retries and failovers are over the retry budget (retry_budget: in the config)"
            )
        call.retries = len(call.info.attempts)


def _granted(router: Router, call: Call, tried: set[str]) -> Lease | None:
    """The attempt on the route whose slot was handed to the call while it waited; None (the slot handed on)
    when that route cannot take it now (its breaker opened meanwhile)."""
    route = call.granted
    assert route is not None
    if route.name in tried or router.routes.get(route.name) is not route:
        router.admission.return_grant(call)
        return None
    try:
        _pay_retry(router, call)
    except BaseException:
        router.admission.return_grant(call)
        raise
    if (ticket := route.breaker.acquire()) is None:
        router.admission.return_grant(call)
        return None
    slot = router.admission.take(route, call)
    assert slot is not None  # the grant is the call's own slot
    return Lease(call, route, ticket, at_limit=slot)


def _session_lease(
    router: Router,
    call: Call,
    pool: Pool,
    group: Group,
    session: str,
    usable: Callable[[Route], bool],
    full: set[str],
) -> Lease | None:
    """The route of the call's conversation, leased, while it is a usable primary route of its model; else None."""
    name = pool.sessions.get(session)
    route = router.routes.get(name) if name is not None else None
    if route is None or route.name not in group.members or not usable(route):
        return None
    lease = _lease(router, call, route, full)
    if lease is None:
        return None
    if (note := getattr(pool.policy, "note", None)) is not None:
        try:
            note(route, call)  # a prefix-aware policy records the prompt where the conversation went
        except BaseException:
            lease.abandoned()  # never keep a (half-open trial) slot for a request not sent
            raise
    return lease


def one_round(router: Router, call: Call, send: Callable[[Route, float], _T]) -> tuple[Lease, _T]:
    """One round, sync: the first route that answers, with its (still open) lease. When every route left is
    only full, the call waits for a slot (``admission/queue.py``) instead of ending the round."""
    call.start_round()
    tried = set(call.avoid)
    while True:
        full: set[str] = set()
        lease = claim(router, call, tried, full)
        if lease is None:
            if not _waits(call, full, tried):
                raise call.exhausted()
            router.admission.wait(call, _full_routes(router, full))
            continue
        tried.add(lease.route.name)
        try:
            return lease, lease.send(send)
        except BaseException as exc:
            lease.failed(exc)


async def aone_round(router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Lease, _T]:
    """Async twin of :func:`one_round`."""
    call.start_round()
    tried = set(call.avoid)
    while True:
        full: set[str] = set()
        lease = claim(router, call, tried, full)
        if lease is None:
            if not _waits(call, full, tried):
                raise call.exhausted()
            await router.admission.await_slot(call, _full_routes(router, full))
            continue
        tried.add(lease.route.name)
        try:
            return lease, await lease.asend(send)
        except BaseException as exc:
            lease.failed(exc)


def _full_routes(router: Router, full: set[str]) -> tuple[Route, ...]:
    """The routes named in ``full`` (those that left meanwhile are not waited for)."""
    return tuple(route for name in sorted(full) if (route := router.routes.get(name)) is not None)


def _waits(call: Call, full: set[str], tried: set[str]) -> bool:
    """Whether a call that found no route may wait for a slot: some untried route was only full, and the call is
    not a hedged copy (a hedge is extra load: it never queues)."""
    full -= tried
    return bool(full) and call.role != "hedge"


def rounds(router: Router, call: Call, send: Callable[[Route, float], _T]) -> tuple[Lease, _T]:
    """Every round of one request until a route answers (sync), going on to fallback models when its own fail."""
    while True:
        try:
            call.resolve()
            if (overflow := call.overflow()) is not None:
                raise overflow
            return _rounds(router, call, send)
        except FALL_BACK_AFTER as failed:
            if isinstance(failed, RetryBudgetExhausted) or not call.fall_back(failed):
                raise


async def arounds(router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Lease, _T]:
    """Async twin of :func:`rounds`."""
    while True:
        try:
            await call.aresolve()
            if (overflow := call.overflow()) is not None:
                raise overflow
            return await _arounds(router, call, send)
        except FALL_BACK_AFTER as failed:
            if isinstance(failed, RetryBudgetExhausted) or not call.fall_back(failed):
                raise


def _rounds(router: Router, call: Call, send: Callable[[Route, float], _T]) -> tuple[Lease, _T]:
    """Every round of one request on its current model until a route answers (sync)."""
    while True:
        try:
            return one_round(router, call, send)
        except (FleetSaturatedError, RetryBudgetExhausted):
            raise  # shed, or over budget: another round would only add load
        except AllRoutesFailed as failed:
            wait = next_wait(call, failed)
        if router._closing.wait(wait):
            raise RouterClosed("the router was closed while this call waited to retry")


async def _arounds(router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Lease, _T]:
    """Async twin of :func:`_rounds`."""
    while True:
        try:
            return await aone_round(router, call, send)
        except (FleetSaturatedError, RetryBudgetExhausted):
            raise  # shed, or over budget: another round would only add load
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


def serve(router: Router, call: Call, send: Callable[[Route, float], _T], tokens: Callable[[_T], int | None]) -> _T:
    """One request from start to answer (sync): open to ``Router.close()``, rounds, its lease settled.

    ``tokens`` reads the answer's output tokens for the route's statistics.
    """
    call.enter()
    try:
        lease, response = rounds(router, call, send)
        lease.succeeded(output_tokens=tokens(response))
    finally:
        call.exit()
    return response


async def aserve(
    router: Router, call: Call, send: Callable[[Route, float], Awaitable[_T]], tokens: Callable[[_T], int | None]
) -> _T:
    """Async twin of :func:`serve`."""
    call.enter()
    try:
        lease, response = await arounds(router, call, send)
        lease.succeeded(output_tokens=tokens(response))
    finally:
        call.exit()
    return response


def next_wait(call: Call, failed: AllRoutesFailed) -> float:
    """Seconds to wait before the next round; raises (``failed`` or a clearer error) when there is none."""
    done = call.info.rounds - call.first_round
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

"""What ``Router.health()`` and ``Router.stats()`` show per route, read from the routes' own records."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..call import wall_clock
from ..endpoints.health import BreakerState

if TYPE_CHECKING:
    from ..core import Router
    from ..endpoints.route import Route


def stats(router: Router) -> dict[str, dict[str, Any]]:
    """``Router.stats()``: the router's routes, then those still draining under a name now unused."""
    ended = router.outcomes.snapshot()
    predicted: dict[str, float | None] = {}
    fleet: dict[str, float | None] = {}
    for pool in router.pools.values():
        if (rates := getattr(pool.policy, "hit_rates", None)) is not None:
            predicted.update(rates())
        if (rates := getattr(pool.policy, "fleet_hit_rates", None)) is not None:
            fleet.update(rates())
    return {
        name: {"url": r.base_url, "model": r.model, "serves": sorted(r.served_names()),
               "state": "draining" if r.breaker.retired else str(r.breaker.state), **r.stats.snapshot(),
               "outcomes": _by_outcome(ended, name), "models": _by_model(ended, name),
               "prefix_hit_rate_predicted": predicted.get(name),
               "prefix_hit_rate_predicted_fleet": fleet.get(name),
               "prefix_hit_rate_measured": r.load.prefix_hit_rate if r.load is not None else None,
               **r.limit.snapshot()}
        for name, r in listed(router)
    }  # fmt: skip


def overload(router: Router) -> dict[str, Any]:
    """``Router.overload()``: the admission queue, what was shed, the retry budget, each route's limit."""
    routes = {name: {"in_flight": r.limit.in_flight, **r.limit.snapshot()} for name, r in listed(router)}
    return {**router.admission.snapshot(), "retry_budget": router.retry_budget.snapshot(), "routes": routes}


def listed(router: Router) -> list[tuple[str, Route]]:
    """The routes ``stats()`` shows: the router's, then those still draining under a name now unused."""
    routes = router.routes
    return [*routes.items(), *((r.name, r) for r in list(router.draining) if r.name not in routes)]


def health_row(route: Route) -> dict[str, Any]:
    """``Router.health()``'s row of one route: healthy, breaker state, probe latency, served models."""
    probe = route.probe_result
    state = route.breaker.state
    throttled = route.not_before > time.monotonic()
    error = probe.error or route.stats.last_error
    if throttled:
        error = f"throttled by the server (Retry-After) until {wall_clock(route.not_before)}"
    return {
        "url": route.base_url,
        "model": route.model,
        "healthy": state is not BreakerState.OPEN and probe.healthy is not False and not throttled,
        "state": "throttled" if throttled and state is BreakerState.CLOSED else str(state),
        "throttled_until": time.time() + route.not_before - time.monotonic() if throttled else None,
        "latency_ms": probe.latency_ms,
        "kind": route.kind,
        "serves": sorted(route.served_names()),
        "aliases": sorted(route.aliases),
        "adapters": dict(route.parents),
        "dropped": sorted(route.dropped),
        "models": list(probe.models),
        "max_model_len": probe.max_model_len,
        "error": error,
        "checked_at": probe.checked_at,
    }


def _by_outcome(ended: dict[tuple[str, str, str], int], route: str) -> dict[str, int]:
    """The calls that ended on ``route``, by outcome (all models)."""
    counts: dict[str, int] = {}
    for (name, _, outcome), n in ended.items():
        if name == route:
            counts[outcome] = counts.get(outcome, 0) + n
    return counts


def _by_model(ended: dict[tuple[str, str, str], int], route: str) -> dict[str, dict[str, int]]:
    """The calls that ended on ``route``, by model, then outcome."""
    counts: dict[str, dict[str, int]] = {}
    for (name, model, outcome), n in ended.items():
        if name == route:
            counts.setdefault(model, {})[outcome] = n
    return counts

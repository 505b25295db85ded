"""The retry budget is the fleet's with shared state: retries one replica spent are spent for all.

Each replica adds its calls and retries to per-second buckets in Redis at every sync
(``ns:budget:<second>``) and judges a retry by the fleet's totals over the window, so N replicas
together retry no more than one would. With Redis gone each replica judges by its own counts again.

The routes are ``bad`` (HTTP 500 on every request) and ``good``; with ``round_robin`` over two routes
each call's first attempt goes to ``bad``, so every call that is served was a failover (one retry).
``health.failure_threshold`` is high enough that ``bad`` stays in rotation throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from anorag_integrations import Router, call_info
from anorag_integrations.config import config_from_dict
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import MODEL, USER, connected, state_document, wait_for

ALLOWED = 2
"""Retries the budget below allows per window, fleet-wide: ``min_per_s x window`` (no share of calls)."""
BUDGET = {"ratio": 0, "min_per_s": 0.1, "window": 20}
"""2 retries per 20 s: the window outlasts each test, so nothing spent leaves it while the test runs."""
MAX_CALLS = 10
"""Calls one replica makes at most while looking for the outcome a test waits for."""
SYNC_BOUND_S = 5.0
"""Time a replica's sync gets to carry the fleet's counts to it (it runs every 50 ms in these tests)."""


@contextmanager
def bad_and_good() -> Iterator[dict[str, FaultServer]]:
    """Two servers: ``bad`` answers HTTP 500 (a transient failure: the router fails over), ``good`` answers."""
    with FaultServer(MODEL, reply="from bad") as bad, FaultServer(MODEL, reply="from good") as good:
        bad.set_fault(Fault.STATUS, status=500)
        yield {"bad": bad, "good": good}


def document(servers: dict[str, FaultServer], url: str, namespace: str) -> dict[str, Any]:
    """Shared state in ``namespace``, the budget above, ``bad`` tried first on every call."""
    return state_document(
        servers,
        url,
        namespace,
        lb_policy="round_robin",
        retry_budget=BUDGET,
        health={"failure_threshold": 1000},
    )


def local(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with each replica on its own state (the control)."""
    document["llm"]["state"] = {"backend": "local"}
    return document


def router_of(document: dict[str, Any]) -> Router:
    return Router(config_from_dict(document, env={}), start_prober=False)


def attempt(router: Router) -> str:
    """One call: "failover" (``bad`` failed, ``good`` served: a retry the budget paid for) or "denied" (the
    budget refused the failover, so the call ended with ``bad``'s failure)."""
    try:
        info = call_info(router.chat(USER))
    except AllRoutesFailed as exc:
        refused = str(exc)
    else:
        assert info is not None and info.route == "good", info
        assert [a.route for a in info.attempts] == ["bad"], info.attempts
        return "failover"
    assert "retry budget" in refused, refused
    return "denied"


def spend(router: Router) -> list[str]:
    """Calls until the budget denies one: the outcomes, the denial last."""
    outcomes: list[str] = []
    while not outcomes or outcomes[-1] != "denied":
        assert len(outcomes) < MAX_CALLS, f"never denied: {outcomes}"
        outcomes.append(attempt(router))
    return outcomes


def sees_fleet_retries(router: Router, retries: int) -> bool:
    """Whether ``router`` judges by the fleet's counts and they hold ``retries`` retries at least."""
    seen = router.retry_budget.snapshot()
    return bool(seen["fleet_wide"]) and int(str(seen["retries"])) >= retries


def close(*routers: Router) -> None:
    for router in routers:
        router.close()


def test_retries_one_replica_spent_are_spent_for_the_whole_fleet(redis_server: RedisServer, namespace: str) -> None:
    """A spends the fleet's 2 retries; B's first failover is then denied, though B has retried nothing itself.
    The control, C, has the same config on local state: its first failover is allowed."""
    with bad_and_good() as servers:
        doc = document(servers, redis_server.url, namespace)
        a, b, c = router_of(doc), router_of(doc), router_of(local(document(servers, redis_server.url, namespace)))
        try:
            connected(a, b)
            assert spend(a) == ["failover"] * ALLOWED + ["denied"]
            assert a.retry_budget.snapshot()["denied_total"] == 1
            wait_for(lambda: sees_fleet_retries(b, ALLOWED), SYNC_BOUND_S, "B's sync reads A's retries from Redis")

            assert b.retry_budget.snapshot()["retries"] == ALLOWED  # the fleet's, none of them B's own
            assert attempt(b) == "denied"
            assert b.retry_budget.snapshot()["denied_total"] == 1
            assert servers["good"].hits == ALLOWED  # only A's two failovers reached the healthy route

            assert not c.retry_budget.snapshot()["fleet_wide"]
            assert attempt(c) == "failover"  # alone, B would have been allowed its failover too
            assert c.retry_budget.snapshot()["denied_total"] == 0
        finally:
            close(a, b, c)


def test_redis_gone_the_budget_is_each_replicas_own_again_and_calls_still_work(namespace: str) -> None:
    """With Redis killed, B stops judging by the fleet's counts (A's retries) and goes back to its own: its
    failovers are allowed and served again, while A, whose own counts hold the retries it spent, is denied."""
    with bad_and_good() as servers, RedisServer() as redis:
        doc = document(servers, redis.url, namespace)
        a, b = router_of(doc), router_of(doc)
        try:
            connected(a, b)
            assert spend(a) == ["failover"] * ALLOWED + ["denied"]
            wait_for(lambda: sees_fleet_retries(b, ALLOWED), SYNC_BOUND_S, "B's sync reads A's retries from Redis")
            assert attempt(b) == "denied"  # the fleet's budget, while Redis answers

            redis.kill()
            wait_for(lambda: not b.retry_budget.snapshot()["fleet_wide"], SYNC_BOUND_S, "B back on its own counts")
            wait_for(lambda: not a.retry_budget.snapshot()["fleet_wide"], SYNC_BOUND_S, "A back on its own counts")
            assert not b.state.status()["connected"]
            seen = b.retry_budget.snapshot()
            assert seen["retries"] == 0 and seen["calls"] == 1, seen  # B's own: one call, no retry

            assert [attempt(b) for _ in range(ALLOWED)] == ["failover"] * ALLOWED
            assert attempt(b) == "denied"  # its own budget, spent now
            assert attempt(a) == "denied"  # A's own counts still hold its two retries
        finally:
            close(a, b)

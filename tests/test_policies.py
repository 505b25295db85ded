"""Load-balancing policies, on routes whose statistics the tests set directly."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest

from anorag_integrations import Router
from anorag_integrations.router.policies import (
    POLICIES,
    LeastLatency,
    LeastOutstanding,
    RoundRobin,
    make_policy,
    register,
)
from anorag_integrations.router.route import Route

from .conftest import make_config


@pytest.fixture
def routes() -> Iterator[list[Route]]:
    config = make_config(
        {n: f"http://127.0.0.1:1/{n}/v1" for n in ("a", "b", "c")}, route_overrides={"c": {"weight": 2}}
    )
    router = Router(config, start_prober=False)
    yield list(router.routes.values())
    router.close()


def picks(policy: object, candidates: list[Route], n: int) -> list[str]:
    return [policy.pick(candidates).name for _ in range(n)]  # type: ignore[attr-defined]


def test_round_robin_rotates_and_respects_weight(routes: list[Route]) -> None:
    seq = picks(RoundRobin(), routes, 8)
    assert Counter(seq) == {"a": 2, "b": 2, "c": 4}
    assert all(x != y or x == "c" for x, y in itertools.pairwise(seq))  # smooth: no a,a or b,b bursts
    equal = picks(RoundRobin(), routes[:2], 6)
    assert equal == ["a", "b", "a", "b", "a", "b"]


def test_round_robin_keeps_rotating_when_a_route_drops_out(routes: list[Route]) -> None:
    policy = RoundRobin()
    first = picks(policy, routes[:2], 3)
    later = picks(policy, routes[1:2], 2)  # 'a' unavailable for a while
    back = picks(policy, routes[:2], 4)
    assert first == ["a", "b", "a"] and later == ["b", "b"]
    assert Counter(back) == {"a": 2, "b": 2}


def test_least_latency_prefers_fast_and_explores_slow(routes: list[Route]) -> None:
    a, b, _ = routes
    a.stats.succeeded(0.8)
    b.stats.succeeded(0.1)
    seq = picks(LeastLatency(explore_every=10), [a, b], 40)
    assert seq.count("a") == 4, seq  # only the exploration picks
    assert seq.count("b") == 36


def test_least_latency_tries_unmeasured_routes_first(routes: list[Route]) -> None:
    a, b, c = routes
    a.stats.succeeded(0.1)
    b.stats.succeeded(0.2)
    assert LeastLatency().pick([a, b, c]).name == "c"


def test_least_latency_follows_a_route_that_got_faster(routes: list[Route]) -> None:
    a, b, _ = routes
    a.stats.succeeded(2.0)
    b.stats.succeeded(0.5)
    for _ in range(20):
        a.stats.succeeded(0.1)  # a recovered: its moving average falls below b's
    assert LeastLatency().pick([a, b]).name == "a"


def test_least_outstanding_picks_idle_route_and_spreads_ties(routes: list[Route]) -> None:
    a, b, c = routes
    for _ in range(3):
        a.stats.started()
    b.stats.started()
    assert LeastOutstanding().pick([a, b]).name == "b"
    # c has weight 2: 2 in flight on c counts as 1, a tie with b; ties rotate.
    c.stats.started()
    c.stats.started()
    assert Counter(picks(LeastOutstanding(), [a, b, c], 10)) == {"b": 5, "c": 5}
    idle = Counter(picks(LeastOutstanding(), _idle_routes(), 30))
    assert idle == {"x": 10, "y": 10, "z": 10}


def _idle_routes() -> list[Route]:
    config = make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in ("x", "y", "z")})
    return list(Router(config, start_prober=False).routes.values())


def test_a_new_policy_is_a_registered_class() -> None:
    @register
    class AlwaysLast:
        name = "always_last"

        def pick(self, candidates: list[Route]) -> Route:
            return candidates[-1]

    try:
        config = make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in ("a", "b")}, lb_policy="always_last")
        router = Router(config, start_prober=False)
        assert router.policy.pick(list(router.routes.values())).name == "b"
        router.close()
    finally:
        del POLICIES["always_last"]
    with pytest.raises(ValueError, match="unknown lb_policy 'always_last'"):
        make_policy("always_last")

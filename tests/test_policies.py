"""Load-balancing policies, on routes whose statistics the tests set directly."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest

from anorag_integrations import Router
from anorag_integrations.router.balancing.policies import (
    POLICIES,
    LeastLatency,
    LeastOutstanding,
    RoundRobin,
    make_policy,
    register,
)
from anorag_integrations.router.endpoints.route import Route

from .conftest import make_config


@pytest.fixture
def routes() -> Iterator[list[Route]]:
    config = make_config(
        {n: f"http://127.0.0.1:1/{n}/v1" for n in ("a", "b", "c")}, route_overrides={"c": {"weight": 2}}
    )
    router = Router(config, start_prober=False)
    yield list(router.routes.values())
    router.close()


def picks(policy: object, candidates: list[Route], n: int, usable: object = lambda route: True) -> list[str]:
    return [policy.pick(candidates, usable).name for _ in range(n)]  # type: ignore[attr-defined]


def test_round_robin_rotates_and_respects_weight(routes: list[Route]) -> None:
    seq = picks(RoundRobin(), routes, 8)
    assert Counter(seq) == {"a": 2, "b": 2, "c": 4}
    assert all(x != y or x == "c" for x, y in itertools.pairwise(seq))  # smooth: no a,a or b,b bursts
    equal = picks(RoundRobin(), routes[:2], 6)
    assert equal == ["a", "b", "a", "b", "a", "b"]


def test_round_robin_keeps_rotating_when_a_route_drops_out(routes: list[Route]) -> None:
    policy, pair = RoundRobin(), routes[:2]
    first = picks(policy, pair, 3)
    later = picks(policy, pair, 2, usable=lambda route: route.name != "a")  # 'a' unavailable for a while
    back = picks(policy, pair, 4)
    assert first == ["a", "b", "a"] and later == ["b", "b"]
    assert Counter(back) == {"a": 2, "b": 2}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_latency_prefers_fast_and_re_measures_the_slow_one_on_a_timer(routes: list[Route]) -> None:
    a, b, _ = routes
    a.stats.succeeded(0.8)
    b.stats.succeeded(0.1)
    clock = Clock()
    policy = LeastLatency(explore_after_s=1.0, clock=clock)
    seq = []
    for _ in range(40):  # 40 picks over 4 seconds
        seq += picks(policy, [a, b], 1)
        clock.now += 0.1
    assert seq.count("a") == 3, seq  # about once per second, not a share of the traffic
    assert seq.count("b") == 37
    assert seq[:10] == ["b"] * 10  # the timer starts when the policy first sees a route


def test_least_latency_sends_one_request_to_an_unmeasured_route_then_waits(routes: list[Route]) -> None:
    a, b, _ = routes
    a.stats.succeeded(0.1)
    policy = LeastLatency()
    assert picks(policy, [a, b], 1) == ["b"]
    b.stats.started()  # its first answer is pending
    assert picks(policy, [a, b], 5) == ["a"] * 5


def test_least_latency_tries_unmeasured_routes_first(routes: list[Route]) -> None:
    a, b, c = routes
    a.stats.succeeded(0.1)
    b.stats.succeeded(0.2)
    assert LeastLatency().pick([a, b, c], lambda route: True).name == "c"


def test_least_latency_follows_a_route_that_got_faster(routes: list[Route]) -> None:
    a, b, _ = routes
    a.stats.succeeded(2.0)
    b.stats.succeeded(0.5)
    for _ in range(20):
        a.stats.succeeded(0.1)  # a recovered: its moving average falls below b's
    assert LeastLatency().pick([a, b], lambda route: True).name == "a"


def test_least_outstanding_picks_idle_route_and_spreads_ties(routes: list[Route]) -> None:
    a, b, c = routes
    for _ in range(3):
        a.stats.started()
    b.stats.started()
    assert LeastOutstanding().pick([a, b], lambda route: True).name == "b"
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

        def pick(self, routes: list[Route], usable: object, request: object = None) -> Route:
            return routes[-1]

    try:
        config = make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in ("a", "b")}, lb_policy="always_last")
        router = Router(config, start_prober=False)
        assert router.policy.pick(list(router.routes.values()), lambda route: True).name == "b"
        router.close()
    finally:
        del POLICIES["always_last"]
    with pytest.raises(ValueError, match="unknown lb_policy 'always_last'"):
        make_policy("always_last")


def _fleet(n: int) -> list[Route]:
    config = make_config({f"r{i}": f"http://127.0.0.1:1/{i}/v1" for i in range(n)})
    return list(Router(config, start_prober=False).routes.values())


@pytest.mark.parametrize("policy", [RoundRobin, LeastLatency, LeastOutstanding])
def test_large_fleets_only_pick_usable_routes(policy: type) -> None:
    fleet = _fleet(200)
    allowed = {route.name for route in fleet[::7]}
    chosen = Counter(picks(policy(), fleet, 600, usable=lambda route: route.name in allowed))
    assert set(chosen) <= allowed and len(chosen) > len(allowed) // 2  # spread, never outside
    assert policy().pick(fleet, lambda route: False) is None


def test_large_fleet_least_outstanding_avoids_loaded_routes() -> None:
    fleet = _fleet(100)
    for route in fleet[:90]:
        for _ in range(5):
            route.stats.started()
    chosen = picks(LeastOutstanding(), fleet, 400)
    idle = {route.name for route in fleet[90:]}
    # two random choices: a loaded route wins only when both draws are loaded (0.9^2 = 81%), and
    # then it is the less loaded of the two; an idle route is chosen whenever one is drawn
    assert sum(name in idle for name in chosen) > 40

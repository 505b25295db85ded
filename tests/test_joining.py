"""Replicas that join a fleet (issue 27): a new router knows the fleet's state before its first request.

A router with ``state: {backend: redis}`` syncs once before its constructor returns (bounded by
``state.timeout``), so a breaker, Retry-After or probe result another replica learned reaches a
newcomer before it serves; a Redis that is down or hung leaves it on its own state, as before. The
route set changing while serving (``add_route``, ``remove_route``) reaches the fleet state too.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import pytest
import redis

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import free_port
from anorag_integrations.config import config_from_dict
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import USER, connected, state_document, wait_for

NEWCOMERS = 3
"""Routers built after the fleet learned that a route is down."""
FIRST_CALLS = 3
"""Calls each newcomer makes at once: round robin would send one of the first two to the bad route."""
ROUTE_TIMEOUT_S = 4.0
"""Per-attempt timeout of the routes: what a newcomer's first call would wait on a hung route."""


def _document(servers: dict[str, FaultServer], url: str, namespace: str, **llm: Any) -> dict[str, Any]:
    """``state_document`` with the routes' timeout at ``ROUTE_TIMEOUT_S``."""
    document = state_document(servers, url, namespace, **llm)
    for route in document["llm"]["routes"].values():
        route["timeout"] = ROUTE_TIMEOUT_S
    return document


def _open_in_redis(client: redis.Redis, namespace: str, route: str, bound: float) -> None:
    """Wait until the fleet's breaker record of ``route`` in Redis says open."""

    def is_open() -> bool:
        raw = client.hget(f"{namespace}:breakers", route)
        return raw is not None and json.loads(raw)["open"] is True

    wait_for(is_open, bound, f"{route}'s open breaker in Redis")


def _open_breaker(router: Router, route: str) -> None:
    """Fail calls pinned to ``route`` until its breaker opens (``failure_threshold`` is 3)."""
    for _ in range(3):
        with pytest.raises(AllRoutesFailed):
            router.chat(USER, route=route)
    assert router.routes[route].breaker.state is BreakerState.OPEN


def _first_calls(router: Router) -> list[tuple[str, float]]:
    """The routes that served the new router's first calls, and how long each call took."""
    served = []
    for _ in range(FIRST_CALLS):
        started = time.perf_counter()
        info = call_info(router.chat(USER))
        served.append((info.route if info is not None and info.route else "?", time.perf_counter() - started))
    return served


def test_replicas_that_join_after_a_breaker_opened_never_try_the_dead_route(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    document = _document({"dead": two["s0"], "live": two["s1"]}, redis_server.url, namespace)
    document["llm"]["routes"]["dead"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens
    config = config_from_dict(document, env={})
    client = redis.Redis.from_url(redis_server.url)
    a = Router(config, start_prober=False)
    made = [a]
    try:
        connected(a)
        _open_breaker(a, "dead")
        _open_in_redis(client, namespace, "dead", config.state.staleness_bound_s)
        for _ in range(NEWCOMERS):
            newcomer = Router(config, start_prober=False)
            made.append(newcomer)
            served = _first_calls(newcomer)
            assert [name for name, _ in served] == ["live"] * FIRST_CALLS
            assert newcomer.stats()["dead"]["requests"] == 0, "a newcomer tried the route the fleet knew was dead"
            assert newcomer.routes["dead"].breaker.state is BreakerState.OPEN
    finally:
        for router in made:
            router.close()
        client.close()


def test_replicas_that_join_after_a_route_hung_never_wait_on_it(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = config_from_dict(_document(two, redis_server.url, namespace), env={})
    client = redis.Redis.from_url(redis_server.url)
    a = Router(config, start_prober=False)
    made = [a]
    try:
        connected(a)
        two["s0"].set_fault(Fault.STATUS, status=503)
        _open_breaker(a, "s0")
        _open_in_redis(client, namespace, "s0", config.state.staleness_bound_s)
        two["s0"].set_fault(Fault.HANG)  # from here s0 answers nobody: a newcomer's attempt waits its timeout
        hits = two["s0"].hits
        for _ in range(NEWCOMERS):
            newcomer = Router(config, start_prober=False)
            made.append(newcomer)
            served = _first_calls(newcomer)
            assert [name for name, _ in served] == ["s1"] * FIRST_CALLS
            assert all(took < ROUTE_TIMEOUT_S / 4 for _, took in served), served  # no call waited on s0
            assert newcomer.stats()["s0"]["requests"] == 0
        assert two["s0"].hits == hits
    finally:
        two["s0"].set_fault(None)
        for router in made:
            router.close()
        client.close()


def test_a_replica_that_joins_honours_the_fleets_retry_after_from_its_first_call(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = config_from_dict(_document(two, redis_server.url, namespace), env={})
    client = redis.Redis.from_url(redis_server.url)
    two["s0"].set_fault(Fault.STATUS, status=429, retry_after=30, times=1)
    a = Router(config, start_prober=False)
    made = [a]
    try:
        connected(a)
        assert call_info(a.chat(USER)).route == "s1"  # type: ignore[union-attr]  # s0 said 429: a failed over
        wait_for(lambda: client.hget(f"{namespace}:throttle", "s0") is not None, 2, "the Retry-After in Redis")
        for _ in range(NEWCOMERS):
            newcomer = Router(config, start_prober=False)
            made.append(newcomer)
            assert [name for name, _ in _first_calls(newcomer)] == ["s1"] * FIRST_CALLS
            assert newcomer.stats()["s0"]["requests"] == 0
        assert two["s0"].hits == 1
    finally:
        for router in made:
            router.close()
        client.close()


def test_with_redis_unreachable_a_router_starts_on_its_own_state_having_tried_once(
    namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="anorag_integrations.router")
    url = f"redis://127.0.0.1:{free_port()}/0"  # a closed port: refused at once
    router = Router(config_from_dict(_document(two, url, namespace), env={}), start_prober=False)
    try:
        warnings = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unreachable" in r.getMessage()
        ]
        assert len(warnings) == 1, "the first sync was not tried before the router was returned"
        assert router.state.status()["connected"] is False
        assert all(router.state.leads(route) for route in router.routes.values())  # it probes for itself
        assert {call_info(router.chat(USER)).route for _ in range(4)} == {"s0", "s1"}  # type: ignore[union-attr]
    finally:
        router.close()


def test_with_redis_hung_the_constructor_waits_no_longer_than_the_redis_timeout(
    namespace: str, two: dict[str, FaultServer]
) -> None:
    timeout = 1.0
    with RedisServer() as server:
        config = config_from_dict(_document(two, server.url, namespace, state={"timeout": timeout}), env={})
        server.pause()  # connections open, nothing answers
        try:
            started = time.perf_counter()
            router = Router(config, start_prober=False)
            took = time.perf_counter() - started
        finally:
            server.resume()
        try:
            assert took < timeout + 1.0, f"the constructor waited {took:.2f} s on a hung Redis"
            assert call_info(router.chat(USER)) is not None
            wait_for(lambda: router.state.status()["connected"], 8, "the sync thread connects once Redis answers")
        finally:
            router.close()


def test_a_route_added_while_serving_adopts_the_fleets_breaker(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].set_fault(Fault.STATUS, status=503)
    full = config_from_dict(_document(two, redis_server.url, namespace), env={})
    only_s1 = config_from_dict(_document({"s1": two["s1"]}, redis_server.url, namespace), env={})
    client = redis.Redis.from_url(redis_server.url)
    a, b = Router(full, start_prober=False), Router(only_s1, start_prober=False)
    try:
        connected(a, b)
        _open_breaker(a, "s0")
        _open_in_redis(client, namespace, "s0", full.state.staleness_bound_s)
        b.add_route("s0", {"base_url": two["s0"].base_url, "model": "m", "timeout": ROUTE_TIMEOUT_S})
        wait_for(
            lambda: b.routes["s0"].breaker.state is BreakerState.OPEN,
            full.state.staleness_bound_s,
            "b's new route adopts a's open breaker",
        )
        hits = two["s0"].hits
        assert {call_info(b.chat(USER)).route for _ in range(4)} == {"s1"}  # type: ignore[union-attr]
        assert two["s0"].hits == hits
    finally:
        for router in (a, b):
            router.close()
        client.close()


def test_a_route_removed_while_serving_is_no_longer_reported_or_led(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = config_from_dict(_document(two, redis_server.url, namespace), env={})
    client = redis.Redis.from_url(redis_server.url)
    a, b = Router(config, start_prober=False), Router(config, start_prober=False)

    def hold() -> None:
        with contextlib.suppress(AllRoutesFailed):  # lifting the fault answers the held request with a 503
            b.chat(USER, route="s0")

    holding = threading.Thread(target=hold, daemon=True)
    try:
        connected(a, b)
        b.state.probing_started()  # b runs for leader of every route (a never does)
        bound = config.state.staleness_bound_s
        wait_for(
            lambda: client.get(f"{namespace}:leader:s0") == b.state.status()["replica"].encode(), bound, "b leads s0"
        )
        two["s0"].set_fault(Fault.HANG)
        holding.start()  # one request of b's in flight on s0 until the fault is lifted
        wait_for(lambda: a.routes["s0"].elsewhere.in_flight == 1, bound, "a sees b's request in flight on s0")
        b.remove_route("s0")  # the request goes on (draining); b no longer has the route
        wait_for(lambda: a.routes["s0"].elsewhere.in_flight == 0, bound, "b stops reporting load for s0")
        load = client.hgetall(f"{namespace}:load:{b.state.status()['replica']}")
        assert b"s0" not in load and b"s1" in load
        wait_for(lambda: client.get(f"{namespace}:leader:s0") is None, bound, "b gives back s0's leader lock")
        assert "s0" not in b.state.status()["leads"]
        assert client.get(f"{namespace}:leader:s1") == b.state.status()["replica"].encode()
    finally:
        two["s0"].set_fault(None)
        holding.join(5)
        for router in (a, b):
            router.close()
        client.close()

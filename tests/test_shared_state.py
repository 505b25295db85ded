"""Shared state through a real redis-server: each shared item reaches the other replicas within the bound.

Replicas here are routers in this process, each with its own state connection (they share nothing
but Redis); ``test_shared_state_fleet.py`` runs replicas in processes of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.fleet.redis_scripts import SOURCES
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import MODEL, USER, connected, shared_config, wait_for


def routers(n: int, config: object, **kwargs: object) -> list[Router]:
    made = [Router(config, start_prober=False, **kwargs) for _ in range(n)]  # type: ignore[arg-type]
    connected(*made)
    return made


def close(*made: Router) -> None:
    for router in made:
        router.close()


def test_an_open_breaker_reaches_the_other_replica_within_the_staleness_bound(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].set_fault(Fault.STATUS, status=503)
    config = shared_config(two, redis_server.url, namespace)
    a, b = routers(2, config)
    try:
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                a.chat(USER, route="s0")
        assert a.routes["s0"].breaker.state is BreakerState.OPEN
        took = wait_for(
            lambda: b.routes["s0"].breaker.state is BreakerState.OPEN,
            config.state.staleness_bound_s,
            "b sees a's open breaker",
        )
        hits = two["s0"].hits
        served = {call_info(b.chat(USER)).route for _ in range(6)}  # type: ignore[union-attr]
        assert served == {"s1"} and two["s0"].hits == hits  # b never paid for a's discovery
        assert took <= config.state.staleness_bound_s
    finally:
        close(a, b)


def test_one_replica_in_the_fleet_sends_the_half_open_trial_and_its_success_closes_every_breaker(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].set_fault(Fault.STATUS, status=503)
    config = shared_config(two, redis_server.url, namespace, health={"cooldown": 0.3})
    a, b = routers(2, config)
    stop = threading.Event()

    def traffic(router: Router) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                router.chat(USER)

    threads = []
    try:
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                a.chat(USER, route="s0")
        wait_for(lambda: b.routes["s0"].breaker.state is not BreakerState.CLOSED, 2, "b adopts the open breaker")
        two["s0"].set_fault(Fault.HANG)  # the trial hangs: any second trial would show up as a second hit
        hits = two["s0"].hits
        threads = [threading.Thread(target=traffic, args=(r,), daemon=True) for r in (a, b, a, b)]
        for thread in threads:
            thread.start()
        wait_for(lambda: two["s0"].hits > hits, 3, "a trial after the cool-down")
        trial_start = time.monotonic()
        wait_for(lambda: time.monotonic() - trial_start > 1.0 or two["s0"].hits > hits + 1, 2, "window")
        assert two["s0"].hits == hits + 1, "a second replica sent a trial while the first was in flight"
        owners = [r for r in (a, b) if r.routes["s0"].breaker.state is BreakerState.HALF_OPEN]
        assert len(owners) == 1
        two["s0"].set_fault(None)  # the hung trial answers: its replica closes the breaker, for everyone
        wait_for(
            lambda: all(r.routes["s0"].breaker.state is BreakerState.CLOSED for r in (a, b)),
            2 + config.state.staleness_bound_s,
            "both breakers closed after the trial's success",
        )
    finally:
        stop.set()
        two["s0"].set_fault(None)
        for thread in threads:
            thread.join(5)
        close(a, b)


def test_a_retry_after_one_replica_got_keeps_every_replica_off_the_route(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].set_fault(Fault.STATUS, status=429, retry_after=5, times=1)
    config = shared_config(two, redis_server.url, namespace)
    a, b = routers(2, config)
    try:
        assert call_info(a.chat(USER)).route == "s1"  # type: ignore[union-attr]  # s0 said 429, a failed over
        assert two["s0"].hits == 1
        wait_for(
            lambda: b.routes["s0"].not_before > time.monotonic() + 3,
            config.state.staleness_bound_s,
            "b learns of the Retry-After",
        )
        served = {call_info(b.chat(USER)).route for _ in range(6)}  # type: ignore[union-attr]
        assert served == {"s1"} and two["s0"].hits == 1
        assert b.health(probe=False)["s0"]["state"] == "throttled"
    finally:
        close(a, b)


def test_one_replica_probes_each_route_and_every_replica_reads_its_results(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = shared_config(two, redis_server.url, namespace, health={"probe_interval": 0.05})
    made = [Router(config) for _ in range(3)]
    probes: dict[tuple[int, str], int] = {}
    try:
        connected(*made)
        wait_for(
            lambda: all(sum(r.state.leads(route) for r in made) == 1 for route in made[0].routes.values()),
            2,
            "one leader per route",
        )
        for i, router in enumerate(made):
            for name, route in router.routes.items():
                original = route.probe

                def counted(original: object = original, key: tuple[int, str] = (i, name)) -> object:
                    probes[key] = probes.get(key, 0) + 1
                    return original()  # type: ignore[operator]

                route.probe = counted  # type: ignore[method-assign]
        wait_for(lambda: sum(probes.values()) >= 20, 5, "20 probes")
        for name in ("s0", "s1"):
            probers = {i for (i, route), n in probes.items() if route == name and n}
            assert len(probers) == 1, f"route {name} probed by replicas {probers}, not one"
        for router in made:  # every replica has the results, whoever probed
            assert all(route.probe_result.healthy for route in router.routes.values())
        two["s1"].set_fault(Fault.REFUSE)  # the leader's failed probe opens every replica's breaker
        wait_for(
            lambda: all(r.routes["s1"].breaker.state is BreakerState.OPEN for r in made),
            0.05 + 2 + config.state.staleness_bound_s,
            "every replica's breaker opened by the leader's probe",
        )
        wait_for(  # the breaker news rides pub/sub (milliseconds); the probe record comes with the next read
            lambda: all(r.routes["s1"].probe_result.healthy is False for r in made),
            config.state.staleness_bound_s,
            "every replica has the leader's failed probe",
        )
    finally:
        two["s1"].set_fault(None)
        close(*made)


def test_least_outstanding_counts_the_requests_other_replicas_have_in_flight(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].set_fault(Fault.HANG)
    config = shared_config(two, redis_server.url, namespace, lb_policy="least_outstanding")
    a, b = routers(2, config)
    threads = [threading.Thread(target=_quiet_chat, args=(a, "s0"), daemon=True) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: b.routes["s0"].elsewhere.in_flight == 2, 2 + config.state.staleness_bound_s, "b sees 2")
        pool = b.pools["chat"]
        picks = [pool.policy.pick(pool.primary, lambda r: True) for _ in range(6)]  # type: ignore[misc]
        assert {route.name for route in picks if route is not None} == {"s1"}  # local counts tie and rotate
        two["s0"].set_fault(None)
        wait_for(lambda: b.routes["s0"].elsewhere.in_flight == 0, 2 + config.state.staleness_bound_s, "back to 0")
    finally:
        two["s0"].set_fault(None)
        for thread in threads:
            thread.join(5)
        close(a, b)


def _quiet_chat(router: Router, route: str | None = None) -> None:
    with contextlib.suppress(Exception):
        router.chat(USER, **({"route": route} if route else {}))


def test_least_latency_ranks_routes_this_replica_never_measured_by_the_fleets_estimate(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    two["s0"].latency = 0.2
    config = shared_config(two, redis_server.url, namespace, lb_policy="least_latency")
    a, b = routers(2, config)
    try:
        for name in ("s0", "s1", "s0", "s1"):
            a.chat(USER, route=name)
        wait_for(
            lambda: all(r.elsewhere.latency_n == 1 for r in b.routes.values()),
            config.state.staleness_bound_s,
            "b reads a's latency estimates",
        )
        assert b.routes["s0"].latency_estimate() > b.routes["s1"].latency_estimate()  # type: ignore[operator]
        served = [call_info(b.chat(USER)).route for _ in range(3)]  # type: ignore[union-attr]
        assert served == ["s1", "s1", "s1"]  # alone, b would first try the unmeasured s0
    finally:
        close(a, b)


def test_the_hedge_budget_is_the_fleets(redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]) -> None:
    two["s0"].latency = 0.4
    config = shared_config(two, redis_server.url, namespace, hedge={"after_ms": 50, "max_rate": 0.01})
    made = routers(3, config)
    try:
        hedgers = [r.hedger for r in made]
        wait_for(
            lambda: sum(h.tokens for h in hedgers if h is not None) >= 1, config.state.staleness_bound_s, "a token"
        )
        for router in made:  # round robin's first pick is s0, slow: each request wants a hedge
            router.chat(USER)
        hedges = sum(r.stats()["s1"]["hedges"] for r in made)
        assert hedges == 1, f"{hedges} hedges: alone, each of the 3 replicas would spend its own first token"
    finally:
        close(*made)


def test_redis_down_then_back_one_warning_each_and_requests_never_wait(
    namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="anorag_integrations.router")
    with RedisServer() as redis:
        config = shared_config(two, redis.url, namespace)
        (router,) = routers(1, config)
        try:
            redis.kill()
            _fast_requests(router, 30)
            wait_for(lambda: not router.state.status()["connected"], 2, "the outage noticed")
            assert all(router.state.leads(route) for route in router.routes.values())  # probing is local again
            _fast_requests(router, 30)
            redis.start()
            wait_for(lambda: router.state.status()["connected"], 8, "reconnected with backoff")
            _fast_requests(router, 10)
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert len([w for w in warnings if "unreachable" in w]) == 1, warnings
            assert len([w for w in warnings if "is back" in w]) == 1, warnings
        finally:
            close(router)


def test_a_hung_redis_never_slows_a_request(namespace: str, two: dict[str, FaultServer]) -> None:
    with RedisServer() as redis:
        # A Redis timeout far above a loopback answer, so a request that waited on Redis cannot pass for load.
        config = shared_config(two, redis.url, namespace, state={"timeout": HUNG_REDIS_TIMEOUT_S})
        (router,) = routers(1, config)
        try:
            redis.pause()  # connections stay open, nothing answers: every Redis call waits for its timeout
            _fast_requests(router, 40)
            wait_for(lambda: not router.state.status()["connected"], 3 * HUNG_REDIS_TIMEOUT_S, "the hang noticed")
            _fast_requests(router, 40)
            redis.resume()
            wait_for(lambda: router.state.status()["connected"], 8, "reconnected")
        finally:
            redis.resume()
            close(router)


HUNG_REDIS_TIMEOUT_S = 2.0
"""``state.timeout`` of the hung-Redis test: what a request would wait if it waited on Redis."""


def _fast_requests(router: Router, n: int) -> None:
    """``n`` chats, none failing, none waiting on Redis: each well under the Redis timeout.

    Half the timeout is a generous bound on wall-clock time (a loopback answer takes milliseconds; 0.4 s was
    seen with the machine busy), so it fails only where a request waited for Redis.
    """
    for _ in range(n):
        started = time.perf_counter()
        router.chat(USER)
        assert time.perf_counter() - started < HUNG_REDIS_TIMEOUT_S / 2


def test_the_redis_password_is_never_shown(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_server.password
    caplog.set_level("DEBUG", logger="anorag_integrations.router")
    config = shared_config(two, redis_server.url, namespace)
    wrong = redis_server.url.replace(redis_server.password, "wrong-pw-123456")
    bad = shared_config(two, wrong, namespace)
    (router,) = routers(1, config)
    refused = Router(bad, start_prober=False)
    try:
        wait_for(lambda: any("unreachable" in r.getMessage() for r in caplog.records), 3, "auth failure logged")
        shown = " ".join(
            [
                repr(router.state),
                str(router.state.status()),
                str(router.health(probe=False)),
                str(router.stats()),
                repr(router.config),
                str(router.config.model_dump()),
                repr(refused.state),
                *(r.getMessage() for r in caplog.records),
            ]
        )
        assert redis_server.password not in shown and "wrong-pw-123456" not in shown
        assert "***@" in router.state.status()["url"]
    finally:
        close(router, refused)


def test_state_is_local_unless_configured(two: dict[str, FaultServer]) -> None:
    from .conftest import make_config

    with Router(make_config(two), start_prober=False) as router:
        assert router.state.status() == {"backend": "local"}
        assert router.routes["s0"].breaker.listener is None and router.routes["s0"].listener is None


@pytest.mark.parametrize(
    ("state", "complaint"),
    [
        ({"backend": "redis"}, "needs url"),
        ({"backend": "redis", "url": "http://:hunter2-secret@host:6379/0"}, "not a Redis URL"),
        ({"backend": "redis", "url": "redis://:hunter2-secret@host:notaport/0"}, "bad port"),
        ({"backend": "redis", "url": "redis://h:6379", "refresh_interval": 1, "leader_ttl": 1.5}, "leader_ttl"),
        ({"backend": "memcached"}, "backend"),
    ],
)
def test_bad_state_config_is_refused_without_echoing_the_password(
    two: dict[str, FaultServer], state: dict[str, object], complaint: str
) -> None:
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.router import ConfigError

    routes = {"s0": {"base_url": two["s0"].base_url, "model": MODEL}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"llm": {"routes": routes, "state": state}}, env={})
    assert complaint in str(caught.value) and "llm.state" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


def test_rediss_urls_are_accepted(two: dict[str, FaultServer]) -> None:
    config = shared_config(two, "rediss://:pw-123456@cache.example:6380/2", "ns")
    assert config.state.url is not None and "pw-123456" not in repr(config)


def test_a_malformed_record_is_skipped_and_sharing_goes_on(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage under the namespace (a hand edit, an older or newer replica) costs that record, not the fleet."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{namespace}:breakers", "s0", "not json")
    client.hset(f"{namespace}:throttle", "s0", "soon")
    probed_at = time.time()
    client.hset(f"{namespace}:probes", "s0", json.dumps({"by": "x", "healthy": True, "checked_at": probed_at, "v2": 1}))
    client.hset(f"{namespace}:probes", "s1", '{"by": "x", "healthy": false, "checked_at": 1e18}')  # outranks all
    client.hset(f"{namespace}:hedge", "x", "1")  # a key of the wrong type
    two["s1"].set_fault(Fault.STATUS, status=503)
    config = shared_config(two, redis_server.url, namespace)
    a, b = routers(2, config)
    try:
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                a.chat(USER, route="s1")
        wait_for(lambda: b.routes["s1"].breaker.state is BreakerState.OPEN, config.state.staleness_bound_s, "b hears")
        assert a.state.status()["connected"] and b.state.status()["connected"]
        assert b.routes["s0"].probe_result.checked_at == probed_at  # the unknown field was left out, the rest adopted
        assert b.routes["s1"].probe_result.checked_at is None  # a probe from the future would outrank every real one
        assert "ignoring a malformed breakers record for route 's0'" in caplog.text
    finally:
        close(a, b)
        client.close()


def test_a_retry_after_in_redis_is_bounded_like_ones_own(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{namespace}:throttle", "s0", "1e18")
    client.hset(f"{namespace}:throttle", "s1", "inf")
    config = shared_config(two, redis_server.url, namespace, params={"max_retry_after": 30})
    (a,) = routers(1, config)
    try:
        wait_for(lambda: a.routes["s0"].not_before > time.monotonic(), config.state.staleness_bound_s, "adopted")
        assert a.routes["s0"].not_before - time.monotonic() <= 30
        assert a.routes["s1"].not_before <= time.monotonic()  # not a time at all: ignored
    finally:
        close(a)
        client.close()


def test_a_router_that_does_not_probe_is_never_the_fleets_prober(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = shared_config(two, redis_server.url, namespace, health={"probe_interval": 0.1})
    quiet = Router(config, start_prober=False)  # e.g. `anorag-llm healthcheck` pointed at the production config
    connected(quiet)
    prober = Router(config)
    try:
        wait_for(lambda: prober.state.status()["leads"] == ["s0", "s1"], 5, "the probing router leads")
        assert quiet.state.status()["leads"] == []
    finally:
        close(quiet, prober)


def test_a_password_in_the_query_string_is_never_shown(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    config = shared_config(two, "redis://127.0.0.1:9/0?password=Zq9sekrit", namespace)
    router = Router(config, start_prober=False)
    try:
        wait_for(lambda: "unreachable" in caplog.text, 5, "the outage warning")
        shown = f"{router.state!r} {router.state.status()} {caplog.text} {router.health()} {router.stats()}"
        assert "Zq9sekrit" not in shown and "password=***" in shown
    finally:
        close(router)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_router_built_before_fork_shares_state_afresh_in_the_child(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    """gunicorn --preload: the child gets its own replica name, connection and threads, and may send trials."""
    config = shared_config(two, redis_server.url, namespace)
    (parent,) = routers(1, config)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without running the parent's cleanup
        status = 1
        try:
            connected(parent)
            seen = {"replica": parent.state.status()["replica"], "threads": threading.active_count()}
            os.write(write, json.dumps(seen).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            seen = json.loads(pipe.read() or "{}")
        _, status = os.waitpid(pid, 0)
        assert status == 0, "the child never reconnected to Redis"
        assert seen["replica"] != parent.state.status()["replica"]
        assert seen["replica"].split(":")[1] == str(pid)
    finally:
        close(parent)


def test_a_redis_that_forgot_the_scripts_gets_them_again_and_a_sync_never_asks_whether_they_exist(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """After SCRIPT FLUSH (or a failover) the next sync loads the scripts again: no outage, leadership kept.

    Syncs call the scripts by SHA, never redis-py's SCRIPT EXISTS first (one round trip per sync, not two).
    """
    import redis

    client = redis.Redis.from_url(redis_server.url)
    config = shared_config(two, redis_server.url, namespace, health={"probe_interval": 0.1})
    prober = Router(config)
    try:
        wait_for(lambda: prober.state.status()["leads"] == ["s0", "s1"], 5, "the router leads")
        client.config_resetstat()
        client.script_flush()

        def calls(prefix: str) -> int:
            stats = client.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k.startswith(f"cmdstat_{prefix}"))

        wait_for(lambda: calls("evalsha") >= 40, 10, "syncs go on after the flush")
        assert prober.state.status()["connected"] and prober.state.status()["leads"] == ["s0", "s1"]
        assert "unreachable" not in caplog.text
        n = len(SOURCES)  # the flush, then the scripts loaded again (by each connection that found them gone,
        assert 1 + n <= calls("script") <= 1 + 2 * n  # at most two): never a check per sync (40 syncs and more)
    finally:
        close(prober)
        client.close()


def test_keys_of_another_type_under_the_namespace_are_taken_over_and_sharing_goes_on(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A lock, the replicas set or the hedge bucket holding the wrong type (a hand edit) never leaves a route
    without a prober or turns sharing off: the scripts take such keys over."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{namespace}:leader:s0", "by", "someone")
    client.set(f"{namespace}:leader:s1", "a replica long gone")  # no TTL: no replica's lock looks like this
    client.set(f"{namespace}:replicas", "not a sorted set")
    client.rpush(f"{namespace}:hedge", "not a number")
    config = shared_config(
        two, redis_server.url, namespace, health={"probe_interval": 0.1}, hedge={"after_ms": 50, "max_rate": 0.01}
    )
    prober = Router(config)
    (quiet,) = routers(1, config)
    try:
        wait_for(lambda: prober.state.status()["leads"] == ["s0", "s1"], 5, "the prober leads both routes")
        wait_for(lambda: client.zcard(f"{namespace}:replicas") == 2, 5, "both replicas listed again")
        assert client.type(f"{namespace}:hedge") == b"string"
        assert prober.state.status()["connected"] and quiet.state.status()["connected"]
        assert "unreachable" not in caplog.text
    finally:
        close(prober, quiet)
        client.close()


def test_a_redis_that_refuses_the_scripts_is_an_outage_not_a_fleet_without_probers(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answering the claims with an error (an ACL without EVALSHA, a read-only replica, OOM) would grant
    no replica a route's probing or half-open trial; each replica runs on its own state instead, as in an outage."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    user = f"u{namespace}"
    refused = ["+@all", "-evalsha"]
    client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=refused)
    config = shared_config(two, f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0", namespace)
    router = Router(config, start_prober=False)
    try:
        wait_for(lambda: "unreachable" in caplog.text, 5, "the refusal reported as an outage")
        assert not router.state.status()["connected"]
        assert all(router.state.leads(route) for route in router.routes.values())  # probes for itself again
        assert "NOPERM" in caplog.text or "NoPermission" in caplog.text
    finally:
        close(router)
        client.acl_deluser(user)
        client.close()


def test_deeply_nested_json_and_fleet_hashes_of_another_type_never_turn_sharing_off(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """JSON nested past Python's recursion limit is a malformed record like any other; oversized loads and
    replicas from the future are not read; a fleet hash that is a string is replaced, so a replica that
    joins later still reads the breakers."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.zadd(f"{namespace}:replicas", {"deep": time.time(), "huge": time.time()})
    client.set(f"{namespace}:load:deep", "[" * 200_000)
    client.set(f"{namespace}:load:huge", json.dumps({"s0": [100, 0.1], "pad": "x" * 100_000}))  # not a load record
    client.zadd(f"{namespace}:replicas", {f"future{i}": time.time() + 3600 + i for i in range(5000)})  # never expire
    client.hset(f"{namespace}:probes", "s0", "[" * 200_000)
    client.set(f"{namespace}:breakers", "not a hash")
    two["s1"].set_fault(Fault.STATUS, status=503)
    config = shared_config(two, redis_server.url, namespace)
    (a,) = routers(1, config)
    try:
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                a.chat(USER, route="s1")
        wait_for(lambda: client.type(f"{namespace}:breakers") == b"hash", 5, "the breakers hash replaced")
        assert a.routes["s0"].elsewhere.in_flight == 0  # the oversized record was not read
        wait_for(lambda: client.zcard(f"{namespace}:replicas") <= 2, 5, "replicas from the future dropped")
        (late,) = routers(1, config)  # joins after the news was published: reads it from the hash
        try:
            wait_for(lambda: late.routes["s1"].breaker.state is BreakerState.OPEN, 5, "the late replica reads it")
        finally:
            close(late)
        assert a.state.status()["connected"] and "unreachable" not in caplog.text
        assert "ignoring a malformed probes record for route 's0'" in caplog.text
    finally:
        close(a)
        client.close()

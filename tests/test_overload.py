"""Overload control (``router/admission/``): saturation is not failure, calls wait for room or are shed fast with
``FleetSaturatedError``, priorities order the wait, retries stay within their budget, every count comes back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from anorag_integrations import (
    AllRoutesFailed,
    FleetSaturatedError,
    RetryBudgetExhausted,
    Router,
    RouterClosed,
    RouterError,
    call_info,
)
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, make_config
from .fleet import wait_for


def ask(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def until(check: Callable[[], object], what: str) -> None:
    """Poll ``check`` until it holds (bounded): the synchronisation of these tests, never a bare sleep."""
    wait_for(check, 10.0, what)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(MODEL) as started:
        yield started


def one_slot(server: FaultServer, **llm: Any) -> Router:
    """A router over ``server`` alone, sending it one attempt at a time (``max_concurrency: 1``)."""
    overrides = {"a": {"max_concurrency": 1, **llm.pop("route", {})}}
    return Router(make_config({"a": server}, route_overrides=overrides, **llm))


def in_flight(router: Router, route: str = "a") -> int:
    return int(router.overload()["routes"][route]["in_flight"])


def depth(router: Router) -> int:
    return int(router.overload()["queue_depth"])


# --- saturated is not broken ----------------------------------------------------------------------


def test_timeouts_of_a_queueing_server_lower_its_limit_and_leave_its_breaker_closed() -> None:
    with FaultServer(MODEL, max_running=1) as server:
        server.latency = 0.3
        config = make_config(
            {"a": server},
            route_overrides={"a": {"timeout": 1.0}},
            admission={"initial_limit": 8},
            health={"failure_threshold": 2},
        )
        with Router(config) as router, ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda _: _outcome(router), range(6)))
            row = router.stats()["a"]
            assert outcomes.count("ok") >= 2, outcomes
            assert outcomes.count("AllRoutesFailed") >= 2, outcomes  # queued past the timeout at the server
            assert router.routes["a"].breaker.state is BreakerState.CLOSED
            assert row["saturation_events"] >= 2
            assert row["concurrency_limit"] < 8


def _outcome(router: Router) -> str:
    try:
        router.chat(ask())
    except RouterError as exc:
        return type(exc).__name__
    return "ok"


def test_a_hung_server_still_opens_its_breaker(server: FaultServer) -> None:
    server.set_fault(Fault.HANG)
    config = make_config({"a": server}, route_overrides={"a": {"timeout": 0.3}}, health={"failure_threshold": 2})
    with Router(config) as router:
        for _ in range(2):
            with pytest.raises(AllRoutesFailed):
                router.chat(ask())
        assert router.routes["a"].breaker.state is BreakerState.OPEN
        assert router.stats()["a"]["saturation_events"] == 0


def test_503s_while_the_server_is_busy_are_saturation_and_503s_alone_are_failures(server: FaultServer) -> None:
    config = make_config({"a": server}, health={"failure_threshold": 3})
    with Router(config) as router, ThreadPoolExecutor(1) as pool:
        router.chat(ask())  # the server answers: it is alive
        server.set_fault(Fault.DELAY, delay=1.0, times=1)
        busy = pool.submit(router.chat, ask("long"))
        until(lambda: server.running == 1, "the long request to run")
        server.set_fault(Fault.STATUS, status=503)
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                router.chat(ask())
        assert router.routes["a"].breaker.state is BreakerState.CLOSED  # busy, not broken
        assert router.stats()["a"]["saturation_events"] == 3
        server.set_fault(None)
        busy.result(timeout=10)
        server.set_fault(Fault.STATUS, status=503)
        for _ in range(3):  # nothing else in flight, nothing answered since: the server itself fails
            with pytest.raises(AllRoutesFailed):
                router.chat(ask())
        assert router.routes["a"].breaker.state is BreakerState.OPEN


# --- the queue: wait for room, or fail fast ----------------------------------------------------------


def hold(router: Router, server: FaultServer, pool: ThreadPoolExecutor, delay: float = 1.0) -> Future[Any]:
    """One call that keeps the route's only slot for ``delay`` seconds; returns once it runs."""
    server.set_fault(Fault.DELAY, delay=delay, times=1)
    held = pool.submit(router.chat, ask("held"))
    until(lambda: in_flight(router) == 1 and server.running == 1, "the held call to run")
    return held


def test_a_call_that_cannot_be_served_within_its_deadline_is_shed_without_being_sent(server: FaultServer) -> None:
    with one_slot(server) as router, ThreadPoolExecutor(1) as pool:
        held = hold(router, server, pool)
        with pytest.raises(FleetSaturatedError) as shed:
            router.chat(ask(), deadline=0.1)
        assert shed.value.why in ("timeout", "wait")
        assert shed.value.retry_after > 0
        assert shed.value.waited_s < 1.0  # it gave up within its own time, not the held call's
        assert isinstance(shed.value, AllRoutesFailed)  # callers handling AllRoutesFailed keep working
        held.result(timeout=10)
        assert server.hits == 1  # the shed call never reached the server
        assert router.overload()["shed"] == {f"{shed.value.why}/0": 1}


def test_a_call_with_time_to_wait_is_served_when_the_slot_frees(server: FaultServer) -> None:
    with FaultServer(MODEL) as other:
        pass  # a server that is gone: only "a" can serve
    with one_slot(server) as router, ThreadPoolExecutor(1) as pool:
        held = hold(router, server, pool, delay=0.3)
        response = router.chat(ask("queued"))
        info = call_info(response)
        assert info is not None and info.queued_s > 0 and not info.attempts
        assert held.result(timeout=10).choices[0].message.content
        assert server.most_running == 1
        assert router.overload()["queued_total"] == 1
    del other


def test_a_full_queue_sheds_at_once(server: FaultServer) -> None:
    with one_slot(server, admission={"max_queue": 0}) as router, ThreadPoolExecutor(1) as pool:
        held = hold(router, server, pool)
        with pytest.raises(FleetSaturatedError) as shed:
            router.chat(ask())
        assert shed.value.why == "queue_full" and shed.value.waited_s == 0
        held.result(timeout=10)


@pytest.mark.asyncio
async def test_close_wakes_waiting_calls_with_router_closed(server: FaultServer) -> None:
    router = one_slot(server)
    with ThreadPoolExecutor(2) as pool:
        held = hold(router, server, pool, delay=0.5)
        waiting_sync = pool.submit(router.chat, ask("sync"))
        waiting_async = asyncio.ensure_future(router.achat(ask("async")))
        await asyncio.to_thread(until, lambda: depth(router) == 2, "both calls to wait")
        await router.aclose()
        with pytest.raises(RouterClosed):
            waiting_sync.result(timeout=10)
        with pytest.raises(RouterClosed):
            await waiting_async
        with pytest.raises(RouterClosed):
            held.result(timeout=10)
    assert depth(router) == 0


def test_a_burst_after_a_quiet_spell_waits_instead_of_being_shed_on_a_rate_not_yet_measured(
    server: FaultServer,
) -> None:
    server.latency = 0.05
    with one_slot(server, admission={"queue_timeout": 10}) as router, ThreadPoolExecutor(20) as pool:
        for _ in range(2):  # a fresh router, then the same burst again after its rate aged out
            ended = list(pool.map(lambda i: _outcome_of(router.chat, ask(str(i))), range(20)))
            assert ended == ["ok"] * 20
            until(lambda: router.routes["a"].limit.drain_rate(time.monotonic()) == 0, "the drain rate to age out")
        assert router.overload()["shed"] == {}


def _outcome_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    try:
        call(*args, **kwargs)
    except RouterError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_waiters_for_one_route_do_not_shed_a_call_for_another(servers: dict[str, FaultServer]) -> None:
    servers["a"].latency = 0.2
    overrides = {"a": {"max_concurrency": 1}, "b": {"max_concurrency": 1}}
    config = make_config({"a": servers["a"], "b": servers["b"]}, route_overrides=overrides)
    with Router(config) as router, ThreadPoolExecutor(12) as pool:
        for _ in range(6):  # a's drain rate is measured: a few calls through it
            router.chat(ask(), route="a")
        waiting = [pool.submit(router.chat, ask(), route="a") for _ in range(10)]
        until(lambda: depth(router) >= 8, "calls to wait for a")
        assert _outcome_of(router.chat, ask(), route="b", deadline=1.0) == "ok"  # b is free: no wait at all
        for future in waiting:
            _outcome_of(future.result)


def test_a_route_replaced_by_a_reload_serves_the_calls_waiting_for_its_name(server: FaultServer) -> None:
    with FaultServer(MODEL) as new, one_slot(server) as router, ThreadPoolExecutor(2) as pool:
        held = hold(router, server, pool, delay=30)
        waiting = pool.submit(router.chat, ask("waiting"))
        until(lambda: depth(router) == 1, "the call to wait")
        document = {"routes": {"a": {"base_url": new.base_url, "model": MODEL, "max_concurrency": 1}}}
        router.reload({"llm": {**document, "params": {"max_retries": 0}}})
        assert waiting.result(timeout=10).choices[0].message.content
        assert new.hits == 1
        server.set_fault(None)  # the held call on the old server ends
        _outcome_of(held.result)


def test_waiters_for_a_replaced_route_keep_their_order_and_are_not_bounced_by_its_last_release(
    server: FaultServer,
) -> None:
    with FaultServer(MODEL) as new, one_slot(server, admission={"lifo_after": 60}) as router:
        new.latency = 0.5
        with ThreadPoolExecutor(4) as pool:
            held = hold(router, server, pool, delay=1.5)
            document = {"routes": {"a": {"base_url": new.base_url, "model": MODEL, "max_concurrency": 1}}}
            router.reload({"llm": {**document, "params": {"max_retries": 0}, "admission": {"lifo_after": 60}}})
            hold(router, new, pool, delay=2.0)  # the new route busy too: the next calls wait for it
            waiting = []
            for n in range(1, 4):
                waiting.append(pool.submit(router.chat, ask(f"waiter {n}")))
                until(lambda n=n: depth(router) == n, f"{n} calls to wait")  # type: ignore[misc]
            for future in waiting:
                future.result(timeout=20)
            _outcome_of(held.result)  # the old server's call ends while waiter 3 still waits
        served = [body["messages"][0]["content"] for body in new.requests]
        assert served == ["held", "waiter 1", "waiter 2", "waiter 3"]
        assert router.overload()["queued_total"] == 3  # each waited once: no grant of the old route bounced


def test_a_slot_freed_between_finding_the_routes_full_and_queueing_is_not_lost(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anorag_integrations.router import rounds

    full_routes = rounds._full_routes

    def preempted(router: Router, full: set[str]) -> Any:  # the thread loses the CPU just before it queues
        found = full_routes(router, full)
        until(lambda: in_flight(router) == 0, "the held call to end")
        return found

    monkeypatch.setattr(rounds, "_full_routes", preempted)
    with one_slot(server, admission={"queue_timeout": 3}) as router, ThreadPoolExecutor(1) as pool:
        held = hold(router, server, pool, delay=0.2)
        assert _outcome_of(router.chat, ask("late")) == "ok"  # no release will come: it must not wait for one
        held.result(timeout=10)


# --- priorities ------------------------------------------------------------------------------------


def test_interactive_calls_go_before_batch_calls_that_waited_longer(server: FaultServer) -> None:
    with one_slot(server, admission={"lifo_after": 60}) as router, ThreadPoolExecutor(4) as pool:
        held = hold(router, server, pool, delay=0.3)
        waiting = []
        for n, (text, priority) in enumerate([("batch 1", 5), ("batch 2", 5), ("interactive", 0)], start=1):
            waiting.append(pool.submit(router.chat, ask(text), priority=priority))
            until(lambda n=n: depth(router) == n, f"{n} calls to wait")  # type: ignore[misc]
        for future in [held, *waiting]:
            future.result(timeout=10)
        order = [body["messages"][0]["content"] for body in server.requests]
        assert order == ["held", "interactive", "batch 1", "batch 2"]


def test_a_higher_priority_pushes_the_lowest_out_of_a_full_queue(server: FaultServer) -> None:
    with one_slot(server, admission={"max_queue": 1}) as router, ThreadPoolExecutor(3) as pool:
        held = hold(router, server, pool, delay=0.3)
        batch = pool.submit(router.chat, ask("batch"), priority=9)
        until(lambda: depth(router) == 1, "the batch call to wait")
        interactive = pool.submit(router.chat, ask("interactive"), priority=0)
        with pytest.raises(FleetSaturatedError) as shed:
            batch.result(timeout=10)
        assert shed.value.why == "priority" and shed.value.priority == 9
        assert interactive.result(timeout=10).choices[0].message.content
        held.result(timeout=10)
        assert router.overload()["shed"] == {"priority/9": 1}


def test_priority_goes_to_servers_that_schedule_by_it_only() -> None:
    with FaultServer(MODEL, scheduling="priority") as server:
        config = make_config({"a": server, "b": server.base_url}, route_overrides={"b": {"send_priority": True}})
        _priorities_sent(server, config)


def _priorities_sent(server: FaultServer, config: Any) -> None:
    with Router(config) as router:
        router.chat(ask(), route="a", priority=3)
        router.chat(ask(), route="b", priority=3)
        router.chat(ask(), route="b")  # priority 0 is vLLM's default: not sent
        assert [body.get("priority") for body in server.requests] == [None, 3, None]
        with pytest.raises(RouterError, match="priority must be a whole number"):
            router.chat(ask(), priority="high")


def test_adapters_pass_their_priority() -> None:
    pytest.importorskip("langchain_core")
    from anorag_integrations import ChatVLLMRouted

    with FaultServer(MODEL, scheduling="priority") as server:
        config = make_config({"a": server}, route_overrides={"a": {"send_priority": True}})
        with Router(config) as router:
            ChatVLLMRouted(router=router, priority=7).invoke("hi")
            assert server.requests[-1]["priority"] == 7


# --- the retry budget ------------------------------------------------------------------------------


def test_failovers_past_the_budget_end_the_call_at_its_first_failure(servers: dict[str, FaultServer]) -> None:
    for name in ("a", "b"):
        servers[name].set_fault(Fault.STATUS, status=500)
    config = make_config(
        {"a": servers["a"], "b": servers["b"]},
        retry_budget={"ratio": 0, "min_per_s": 0.1, "window": 10},  # one retry in ten seconds
        health={"failure_threshold": 1000},
    )
    with Router(config) as router:
        with pytest.raises(AllRoutesFailed) as first:
            router.chat(ask())
        assert len(first.value.attempts) == 2  # the failover was in the budget
        with pytest.raises(AllRoutesFailed, match="retry budget") as second:
            router.chat(ask())
        assert len(second.value.attempts) == 1
        assert servers["a"].hits + servers["b"].hits == 3
        assert router.overload()["retry_budget"]["denied_total"] == 1


def test_a_call_over_the_budget_tries_no_other_round(servers: dict[str, FaultServer]) -> None:
    servers["a"].set_fault(Fault.STATUS, status=500)
    config = make_config(
        {"a": servers["a"], "b": servers["b"]},
        retry_budget={"ratio": 0, "min_per_s": 0},
        params={"max_retries": 3},
        health={"failure_threshold": 1000},
    )
    with Router(config) as router:
        with pytest.raises(RetryBudgetExhausted) as over:
            router.chat(ask(), route="a")  # pinned: only rounds could retry it
        assert len(over.value.attempts) == 1 and servers["a"].hits == 1
        assert router.overload()["retry_budget"]["denied_total"] == 1


def test_the_default_budget_lets_occasional_failovers_through(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    servers["a"].set_fault(Fault.STATUS, status=500, every=4)  # one request in four fails
    router = router_for("a", "b", health={"failure_threshold": 1000})
    infos = [call_info(router.chat(ask())) for _ in range(40)]
    failed_over = sum(1 for info in infos if info is not None and info.attempts)
    assert failed_over >= 3  # every failure was failed over: none was denied
    assert router.overload()["retry_budget"]["denied_total"] == 0


# --- visible: stats, overload(), Prometheus -----------------------------------------------------------


def test_queue_shedding_and_limits_are_exported(server: FaultServer) -> None:
    registry = CollectorRegistry()
    with one_slot(server, admission={"max_queue": 0}) as router, ThreadPoolExecutor(1) as pool:
        router.register_metrics(registry)
        held = hold(router, server, pool)
        with pytest.raises(FleetSaturatedError):
            router.chat(ask(), priority=4)
        held.result(timeout=10)
        text = generate_latest(registry).decode()
    assert 'anorag_shed_total{priority="4",reason="queue_full",router="' in text
    assert 'anorag_route_concurrency_limit{route="a",router="' in text and "} 1.0" in text
    assert "anorag_retries_denied_total" in text


def test_below_capacity_nothing_waits_and_nothing_is_shed(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    for name in ("a", "b"):
        servers[name].latency = 0.3  # servers without a queue: every call is answered in 0.3 s however many run
    router = router_for("a", "b")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: router.chat(ask()), range(48)))
    overload = router.overload()
    assert overload["queued_total"] == 0 and overload["shed"] == {}


# --- invariant: every call ends, every count comes back --------------------------------------------------


@pytest.fixture(scope="module")
def quick_server() -> Iterator[FaultServer]:
    with FaultServer(MODEL) as started:
        started.latency = 0.02
        yield started


CALLS = st.lists(
    st.tuples(
        st.integers(0, 3),  # priority
        st.one_of(st.none(), st.floats(0.01, 0.3)),  # deadline
        st.one_of(st.none(), st.floats(0.0, 0.1)),  # cancel after
        st.booleans(),  # stream
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=CALLS, limit=st.integers(1, 2), max_queue=st.integers(0, 4))
def test_every_call_ends_and_every_count_comes_back_to_zero(
    quick_server: FaultServer, calls: list[tuple[int, float | None, float | None, bool]], limit: int, max_queue: int
) -> None:
    config = make_config(
        {"a": quick_server}, route_overrides={"a": {"max_concurrency": limit}}, admission={"max_queue": max_queue}
    )

    async def run() -> list[str]:
        async with Router(config) as router:

            async def one(priority: int, deadline: float | None, stream: bool) -> str:
                if stream:
                    async for _ in router.astream(ask(), priority=priority, deadline=deadline):
                        pass
                else:
                    await router.achat(ask(), priority=priority, deadline=deadline)
                return "ok"

            tasks = [asyncio.ensure_future(one(p, d, s)) for p, d, _, s in calls]
            for task, (_, _, cancel, _) in zip(tasks, calls, strict=True):
                if cancel is not None:
                    asyncio.get_running_loop().call_later(cancel, task.cancel)
            ended = []
            for task in tasks:
                try:
                    ended.append(await task)
                except asyncio.CancelledError:
                    ended.append("cancelled")
                except RouterError as exc:  # a typed error: shed, out of time
                    ended.append(type(exc).__name__)
            route = router.routes["a"]
            assert depth(router) == 0
            assert route.limit.in_flight == 0 and route.limit.reserved == 0
            assert route.breaker.tickets_out == 0
            assert route.stats.in_flight == 0
            return ended

    ended = asyncio.run(run())
    assert len(ended) == len(calls)
    assert set(ended) <= {"ok", "cancelled", "FleetSaturatedError", "AllRoutesFailed"}


def test_threads_sharing_one_slot_all_end(server: FaultServer) -> None:
    """Sync callers racing for one slot: each is served or shed, and the slot count comes back."""
    server.latency = 0.01
    with one_slot(server, admission={"max_queue": 3}) as router:
        barrier = threading.Barrier(8)

        def one(i: int) -> str:
            barrier.wait()
            try:
                router.chat(ask(str(i)), priority=i % 3)
            except FleetSaturatedError:
                return "shed"
            return "ok"

        with ThreadPoolExecutor(8) as pool:
            ended = list(pool.map(one, range(8)))
        assert "ok" in ended
        assert in_flight(router) == 0 and depth(router) == 0 and router.routes["a"].limit.reserved == 0
        assert server.most_running == 1


def test_a_server_reporting_requests_waiting_lowers_the_limit() -> None:
    """Under a policy that reads ``/metrics`` (least_queue), requests waiting at the server are saturation."""
    with FaultServer(MODEL, max_running=1) as server:
        server.latency = 0.5
        config = make_config(
            {"a": server}, lb_policy="least_queue", least_queue={"interval": 0.05}, admission={"initial_limit": 8}
        )
        with Router(config) as router, ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(router.chat, ask()) for _ in range(2)]
            until(lambda: router.stats()["a"]["saturation_events"] >= 1, "a scrape to find a request waiting")
            assert router.stats()["a"]["concurrency_limit"] < 8
            for call in calls:
                call.result(timeout=10)
            assert router.routes["a"].breaker.state is BreakerState.CLOSED

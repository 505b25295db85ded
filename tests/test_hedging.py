"""Hedged requests: a copy to another route after the threshold, first answer wins, loser cancelled."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from anorag_integrations import AllRoutesFailed, Router, call_info
from anorag_integrations.config import ConfigError, config_from_dict
from anorag_integrations.testing import Fault, FaultServer

ASK = [{"role": "user", "content": "hi"}]


def hedge_router(router_for: Callable[..., Router], **hedge: object) -> Router:
    return router_for("a", "b", hedge=hedge or {"after_ms": 50})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stalled_request_is_answered_by_the_copy(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str
) -> None:
    router = hedge_router(router_for)
    servers["a"].set_fault(Fault.DELAY, delay=5.0, times=1)  # round robin sends the first request to a
    response = router.chat(ASK) if mode == "sync" else asyncio.run(router.achat(ASK))
    info = call_info(response)
    assert response.choices[0].message.content == "from b"
    assert info is not None and info.route == "b" and info.hedge == "b" and info.attempts == []
    a, b = router.stats()["a"], router.stats()["b"]
    assert (a["requests"], a["successes"], a["failures"], a["in_flight"]) == (1, 0, 0, 0)  # cancelled, not failed
    assert (b["hedges"], b["hedges_won"], b["successes"]) == (1, 1, 1)
    if mode == "sync":
        assert any(t.name == "anorag-router-loop" for t in threading.enumerate())
        router.close()
        assert not any(t.name == "anorag-router-loop" for t in threading.enumerate())


def test_a_fast_answer_is_not_hedged(router_for: Callable[..., Router], servers: dict[str, FaultServer]) -> None:
    router = hedge_router(router_for, after_ms=5000)
    infos = [call_info(router.chat(ASK)) for _ in range(4)]
    assert all(i is not None and i.hedge is None for i in infos)
    assert servers["a"].hits + servers["b"].hits == 4


def test_the_original_wins_when_the_copy_is_slower(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = hedge_router(router_for)
    servers["a"].set_fault(Fault.DELAY, delay=0.3, times=1)
    servers["b"].set_fault(Fault.DELAY, delay=5.0, times=1)
    response = asyncio.run(router.achat(ASK))
    info = call_info(response)
    assert response.choices[0].message.content == "from a"
    assert info is not None and info.route == "a" and info.hedge == "b"
    b = router.stats()["b"]
    assert (b["hedges"], b["hedges_won"], b["in_flight"], b["failures"]) == (1, 0, 0, 0)


def test_hedge_budget_bounds_extra_requests(router_for: Callable[..., Router], servers: dict[str, FaultServer]) -> None:
    router = hedge_router(router_for, after_ms=20, max_rate=0.05)
    servers["a"].set_fault(Fault.DELAY, delay=0.1)  # every request to a is slow enough to hedge
    infos = [call_info(router.chat(ASK)) for _ in range(20)]
    hedged = sum(1 for i in infos if i is not None and i.hedge is not None)
    # The bucket starts with one token and earns 0.05 per request: at most 1 + 20 * 0.05 = 2 hedges.
    assert 1 <= hedged <= 2
    # Every request reached a server, and at most one copy per hedge on top: a copy can lose the race before
    # it reaches b (its primary answered first and it was cancelled), which a busy machine makes happen.
    assert 20 <= servers["a"].hits + servers["b"].hits <= 20 + hedged


def test_percentile_threshold_needs_history(router_for: Callable[..., Router], servers: dict[str, FaultServer]) -> None:
    router = router_for("a", "b", hedge={"after": "p95", "min_samples": 5})
    servers["a"].set_fault(Fault.DELAY, delay=0.5, times=1)
    first = call_info(router.chat(ASK))  # a has no latency history yet: no threshold, no hedge
    assert first is not None and first.route == "a" and first.hedge is None
    for _ in range(6):
        router.chat(ASK, route="a")  # pinned requests build a's history (and are never hedged)
    servers["a"].set_fault(Fault.DELAY, delay=5.0, times=1)
    router.chat(ASK)  # round robin: this one goes to b
    slow = call_info(router.chat(ASK))  # to a, slower than its p95 (a few ms): hedged to b
    assert slow is not None and slow.route == "b" and slow.hedge == "b"


def test_both_failing_raises_with_both_attempts(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = hedge_router(router_for)
    servers["a"].set_fault(Fault.HANG)
    servers["b"].set_fault(Fault.STATUS, status=503)
    try:
        with pytest.raises(AllRoutesFailed) as caught:
            router.chat(ASK, timeout=0.5)
    finally:
        servers["a"].set_fault(None)
    assert sorted(a.route for a in caught.value.attempts) == ["a", "b"]


def test_cancelling_the_caller_cancels_both(router_for: Callable[..., Router], servers: dict[str, FaultServer]) -> None:
    router = hedge_router(router_for)
    servers["a"].set_fault(Fault.DELAY, delay=5.0)
    servers["b"].set_fault(Fault.DELAY, delay=5.0)

    async def main() -> None:
        task = asyncio.ensure_future(router.achat(ASK))
        while servers["b"].hits == 0:  # wait until the copy has been sent
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert all(row["in_flight"] == 0 and row["failures"] == 0 for row in router.stats().values())


def test_hedge_config_needs_exactly_one_threshold() -> None:
    routes = {"a": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}
    with pytest.raises(ConfigError, match=r"llm\.hedge.*exactly one of after_ms"):
        config_from_dict({"llm": {"routes": routes, "hedge": {"max_rate": 0.1}}}, env={})
    with pytest.raises(ConfigError, match=r"llm\.hedge\.after"):
        config_from_dict({"llm": {"routes": routes, "hedge": {"after": "p42"}}}, env={})

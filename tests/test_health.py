"""Active probing: /health with the /v1/models fallback, served models, breakers, the prober."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from anorag_integrations import Router
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until true or ``timeout``; for state another thread changes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_health_reports_models_length_and_latency(router_for: Callable[..., Router]) -> None:
    rows = router_for("a", "b").health()
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["healthy"] is True and row["state"] == "closed"
        assert row["models"] == [MODEL] and row["max_model_len"] == 4096
        assert row["latency_ms"] > 0


def test_probe_falls_back_to_models_when_health_is_404() -> None:
    with FaultServer(MODEL, health_endpoint=False) as old:
        router = Router(make_config({"old": old}))
        row = router.health()["old"]
        router.close()
    assert row["healthy"] is True and row["models"] == [MODEL]


def test_down_route_is_unhealthy_with_a_hint_and_leaves_rotation(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(Fault.REFUSE)
    row = router.health()["a"]
    assert row["healthy"] is False and row["state"] == "open"
    assert "cannot connect" in row["error"] and "is the server started" in row["error"]
    assert {router.chat(USER).choices[0].message.content for _ in range(4)} == {"from b"}
    servers["a"].set_fault(None)
    row = router.health()["a"]
    assert row["healthy"] is True and row["state"] == "half_open"  # a good probe ends the cool-down
    assert "from a" in {router.chat(USER).choices[0].message.content for _ in range(4)}
    assert router.routes["a"].breaker.state is BreakerState.CLOSED  # the trial request closed it


def test_probe_of_a_server_whose_completions_fail_allows_one_trial_only(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", "b", health={"failure_threshold": 1})
    servers["a"].set_fault(Fault.STATUS, status=500)  # /health still answers 200
    router.chat(USER)
    assert router.routes["a"].breaker.state is BreakerState.OPEN
    router.health()
    for _ in range(5):
        assert router.chat(USER).choices[0].message.content == "from b"
    assert servers["a"].hits == 2  # the first failure and one trial after the probe


def test_wrong_model_name_is_reported_as_misconfiguration(servers: dict[str, FaultServer]) -> None:
    config = make_config({"a": servers["a"]}, route_overrides={"a": {"model": "llama-3-70b"}})
    with Router(config) as router:
        row = router.health()["a"]
    assert row["healthy"] is False
    assert "serves ['m'], not 'llama-3-70b'" in row["error"] and "--served-model-name" in row["error"]


def test_async_health_matches_sync(router_for: Callable[..., Router]) -> None:
    router = router_for("a", "b")
    rows = asyncio.run(router.ahealth())
    assert {name: row["healthy"] for name, row in rows.items()} == {"a": True, "b": True}


def test_background_prober_takes_a_dead_route_out_and_brings_it_back(servers: dict[str, FaultServer]) -> None:
    config = make_config({"a": servers["a"], "b": servers["b"]}, health={"probe_interval": 0.05, "cooldown": 60})
    with Router(config) as router:
        assert router.prober.running
        breaker = router.routes["a"].breaker
        servers["a"].set_fault(Fault.REFUSE)
        assert wait_for(lambda: breaker.state is BreakerState.OPEN), "prober did not notice the dead route"
        assert servers["a"].hits == 0  # no user request was needed to find out
        servers["a"].set_fault(None)
        assert wait_for(breaker.available), "prober did not end the cool-down of the recovered route"
        assert "from a" in {router.chat(USER).choices[0].message.content for _ in range(2)}
        assert breaker.state is BreakerState.CLOSED
    assert not router.prober.running


def test_async_prober_task(servers: dict[str, FaultServer]) -> None:
    config = make_config({"a": servers["a"]}, health={"probe_interval": 0.05})

    async def scenario() -> BreakerState:
        async with Router(config, start_prober=False) as router:
            await router.astart_prober()
            servers["a"].set_fault(Fault.REFUSE)
            for _ in range(500):
                if router.routes["a"].breaker.state is BreakerState.OPEN:
                    break
                await asyncio.sleep(0.01)
            return router.routes["a"].breaker.state

    assert asyncio.run(scenario()) is BreakerState.OPEN


def test_router_shared_across_event_loops(router_for: Callable[..., Router]) -> None:
    router = router_for("a")
    for _ in range(3):  # each asyncio.run is a new loop; pooled connections must not leak across
        assert asyncio.run(router.achat(USER)).choices[0].message.content == "from a"

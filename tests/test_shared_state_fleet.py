"""App replicas in processes of their own (``tests/fleet.py``), each with its own Router, sharing state in Redis."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anorag_integrations import Router
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import MODEL, USER, connected, replicas, shared_config, state_document, wait_for


@pytest.fixture
def three() -> Iterator[dict[str, FaultServer]]:
    with FaultServer(MODEL) as s0, FaultServer(MODEL) as s1, FaultServer(MODEL) as s2:
        yield {"s0": s0, "s1": s1, "s2": s2}


def test_a_dead_leader_is_replaced_within_one_ttl(
    redis_server: RedisServer, namespace: str, three: dict[str, FaultServer]
) -> None:
    document = state_document(three, redis_server.url, namespace, health={"probe_interval": 0.1})
    state = document["llm"]["state"]
    with replicas(document, 3) as fleet:

        def leaders() -> dict[str, list[int]]:
            led: dict[str, list[int]] = {name: [] for name in three}
            for i, replica in enumerate(fleet):
                if replica.proc.poll() is None:
                    status = replica.ask("status")
                    for name in status["leads"] if status["connected"] else ():
                        led[name].append(i)
            return led

        wait_for(lambda: all(len(who) == 1 for who in leaders().values()), 20, "one leader per route")
        victim = leaders()["s0"][0]
        fleet[victim].kill()
        took = wait_for(lambda: len(leaders()["s0"]) == 1, 5, "a new leader for s0")
        bound = state["leader_ttl"] + state["refresh_interval"] + 0.5  # 0.5: asking two processes on 2 busy cores
        assert took <= bound, f"s0 had no leader for {took:.2f} s after its leader died"
        assert victim not in leaders()["s0"]


def test_a_crashed_replicas_in_flight_counts_expire(
    redis_server: RedisServer, namespace: str, three: dict[str, FaultServer]
) -> None:
    three["s0"].set_fault(Fault.HANG)
    document = state_document(three, redis_server.url, namespace)
    config = shared_config(three, redis_server.url, namespace)
    watcher = Router(config, start_prober=False)
    try:
        connected(watcher)
        with replicas(document, 2) as fleet:
            assert fleet[0].ask("hold s0 3") == {"in_flight": 3}
            assert fleet[1].ask("hold s0 2") == {"in_flight": 2}
            bound = config.state.staleness_bound_s
            wait_for(lambda: watcher.routes["s0"].elsewhere.in_flight == 5, bound, "5 in flight elsewhere")
            fleet[0].kill()  # its 3 requests die with it; nobody decrements them
            took = wait_for(lambda: watcher.routes["s0"].elsewhere.in_flight == 2, 5, "the dead replica's 3 expire")
            assert took <= config.state.load_ttl + bound
    finally:
        three["s0"].set_fault(None)
        watcher.close()


def test_a_breaker_one_process_opens_keeps_every_process_off_the_route(
    redis_server: RedisServer, namespace: str, three: dict[str, FaultServer]
) -> None:
    three["s0"].set_fault(Fault.REFUSE)
    document = state_document(three, redis_server.url, namespace)
    with replicas(document, 4) as fleet:
        for replica in fleet:
            wait_for(lambda r=replica: r.ask("status")["connected"], 10, "connected")  # type: ignore[misc]
        first = fleet[0].ask("chat 12")  # round robin: s0 is tried until its breaker opens
        assert first["failed"] == 0
        wait_for(
            lambda: all(r.ask("status")["breakers"]["s0"] == "open" for r in fleet),
            document["llm"]["state"]["refresh_interval"] + 4 * document["llm"]["state"]["timeout"] + 0.5,
            "every replica's breaker open",
        )
        for replica in fleet[1:]:
            answer = replica.ask("chat 12")
            assert answer["failed"] == 0 and "s0" not in answer["served"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deadlines=st.lists(st.one_of(st.none(), st.floats(0.3, 0.8)), max_size=4), fail=st.booleans())
def test_in_flight_counts_seen_by_the_fleet_come_back_to_zero(
    redis_server: RedisServer, deadlines: list[float | None], fail: bool
) -> None:
    """Requests held on a hanging server, some ending by their deadline, the rest released as answers or 503s:
    the other replica sees this one's count while they run and zero once they all ended."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    deadlines = [*deadlines, None]  # one request outlives every deadline: b has something to see
    with FaultServer(MODEL) as s0, FaultServer(MODEL) as s1:
        servers = {"s0": s0, "s1": s1}
        config = shared_config(servers, redis_server.url, namespace)
        a, b = Router(config, start_prober=False), Router(config, start_prober=False)
        bound = config.state.staleness_bound_s
        try:
            connected(a, b)
            s0.set_fault(Fault.HANG)
            threads = [threading.Thread(target=_chat, args=(a, deadline), daemon=True) for deadline in deadlines]
            for thread in threads:
                thread.start()
            wait_for(lambda: a.routes["s0"].stats.in_flight == len(deadlines), 5, "requests started")
            wait_for(lambda: b.routes["s0"].elsewhere.in_flight > 0, bound, "b sees a's requests")
            seen = b.routes["s0"].elsewhere
            assert 0 < seen.in_flight <= len(deadlines)
            s0.set_fault(Fault.STATUS, status=503) if fail else s0.set_fault(None)
            for thread in threads:
                thread.join(5)
            assert a.routes["s0"].stats.in_flight == 0
            wait_for(lambda: b.routes["s0"].elsewhere.in_flight == 0, bound, "b's view back to zero")
        finally:
            s0.set_fault(None)
            a.close()
            b.close()


def _chat(router: Router, deadline: float | None) -> None:
    with contextlib.suppress(Exception):
        router.chat(USER, route="s0", **({"deadline": deadline} if deadline else {}))

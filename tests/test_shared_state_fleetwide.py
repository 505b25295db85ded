"""What holds fleet-wide with shared state: a fleet is its routes, and a route has one half-open trial at a time.

Two apps on one Redis with no ``state.namespace`` each derive their own from their routes, so one
app's failing ``gpu1`` never opens another app's healthy ``gpu1``; replicas of one config derive the
same namespace in every process. The trial lock is renewed while its holder holds the grant, idle or
not, and a holder that stops renewing (crashed, or its sync thread stalled) sends no trial once its
lock could have expired: at no moment do two replicas' breakers admit a trial of the same route.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anorag_integrations import Router, call_info
from anorag_integrations.config import StateConfig, config_from_dict
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.fleet.state import NAMESPACE_PREFIX, fleet_namespace
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import MODEL, ROOT, USER, connected, state_document, wait_for

TTL_S = 1.0
"""The trial lock's TTL (``leader_ttl``) in these tests: long enough that a busy machine's sync keeps it."""
IDLE_S = 2.5 * TTL_S
"""How long a grant's holder stays idle: past its lock's TTL twice, time enough for every replica to take it."""
TRIAL_WINDOW_S = 1.0
"""How long the trial's hang is watched for a second trial."""


def derived(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with no ``state.namespace``: the router derives it from the routes."""
    del document["llm"]["state"]["namespace"]
    return document


def router_of(document: dict[str, Any]) -> Router:
    return Router(config_from_dict(document, env={}), start_prober=False)


# --- 4. the default namespace is the fleet's -------------------------------------------------------


def test_two_apps_on_one_redis_never_share_a_breaker_by_accident(redis_server: RedisServer) -> None:
    """App Y's failing gpu1 stays Y's: app X's gpu1 (another server) keeps serving, and X's replicas still share."""
    with (
        FaultServer(MODEL, reply="x") as x1,
        FaultServer(MODEL, reply="x2") as x2,
        FaultServer(MODEL) as y1,
    ):
        y1.set_fault(Fault.STATUS, status=503)
        x_doc = derived(state_document({"gpu1": x1, "gpu2": x2}, redis_server.url, "unused"))
        y_doc = derived(state_document({"gpu1": y1}, redis_server.url, "unused"))
        x, x_peer, y = router_of(x_doc), router_of(x_doc), router_of(y_doc)
        try:
            connected(x, x_peer, y)
            for _ in range(3):
                with pytest.raises(AllRoutesFailed):
                    y.chat(USER, route="gpu1")
            assert y.routes["gpu1"].breaker.state is BreakerState.OPEN
            y_ns = y.state.status()["namespace"]
            client = redis_client(redis_server)
            wait_for(lambda: client.hget(f"{y_ns}:breakers", "gpu1") is not None, 5, "Y's breaker record in Redis")
            # A marker after Y's news: once x has adopted it, x has read everything Y had written before it.
            x_peer.routes["gpu2"].breaker.force_open()
            bound = x.config.state.staleness_bound_s
            wait_for(lambda: x.routes["gpu2"].breaker.state is not BreakerState.CLOSED, bound, "x adopts its peer's")
            served = [call_info(x.chat(USER, route="gpu1")).route for _ in range(5)]  # type: ignore[union-attr]
            assert served == ["gpu1"] * 5 and x.routes["gpu1"].breaker.state is BreakerState.CLOSED
            x_status, y_status = x.state.status(), y.state.status()
            assert x_status["namespace"] == x_peer.state.status()["namespace"] != y_status["namespace"]
            assert x_status["namespace"].startswith(NAMESPACE_PREFIX) and x_status["namespace_from"] == "routes"
            assert x_status["namespace"] in repr(x.state)
        finally:
            for router in (x, x_peer, y):
                router.close()


def test_an_explicit_namespace_still_shares_on_purpose(redis_server: RedisServer, namespace: str) -> None:
    """Two configs naming one namespace share breakers even though their routes differ."""
    with FaultServer(MODEL) as x1, FaultServer(MODEL) as y1:
        y1.set_fault(Fault.STATUS, status=503)
        x = router_of(state_document({"gpu1": x1}, redis_server.url, namespace))
        y = router_of(state_document({"gpu1": y1}, redis_server.url, namespace))
        try:
            connected(x, y)
            for _ in range(3):
                with pytest.raises(AllRoutesFailed):
                    y.chat(USER, route="gpu1")
            bound = x.config.state.staleness_bound_s
            wait_for(lambda: x.routes["gpu1"].breaker.state is not BreakerState.CLOSED, bound, "x adopts y's breaker")
            assert x.state.status()["namespace"] == namespace and x.state.status()["namespace_from"] == "config"
        finally:
            x.close()
            y.close()


NAMESPACE_SCRIPT = """
import json, sys
from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
router = Router(config_from_dict(json.loads(sys.argv[1]), env={}), start_prober=False)
print(router.state.status()["namespace"])
router.close()
"""


def test_replicas_of_one_config_derive_one_namespace_in_every_process(
    redis_server: RedisServer, two: dict[str, FaultServer]
) -> None:
    """Another process, another hash seed, the routes listed in another order: the same namespace."""
    document = derived(state_document(two, redis_server.url, "unused"))
    here = router_of(document)
    try:
        expected = here.state.status()["namespace"]
    finally:
        here.close()
    reordered = json.loads(json.dumps(document))
    reordered["llm"]["routes"] = dict(reversed(list(document["llm"]["routes"].items())))
    seed = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 4242)  # not this process's seed
    out = subprocess.run(
        [sys.executable, "-c", NAMESPACE_SCRIPT, json.dumps(reordered)],
        env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == expected


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
HOSTS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
FLEETS = st.dictionaries(NAMES, st.tuples(HOSTS, st.integers(1, 65535), NAMES), min_size=1, max_size=6)


@given(fleet=FLEETS, data=st.data())
def test_a_derived_namespace_is_a_valid_one_of_the_routes_alone(
    fleet: dict[str, tuple[str, int, str]], data: st.DataObject
) -> None:
    """Any order gives one namespace, a valid one; changing any route's name, URL or model gives another."""
    routes = [(name, f"http://{host}:{port}/v1", model) for name, (host, port, model) in fleet.items()]
    namespace = fleet_namespace(routes)
    assert StateConfig(namespace=namespace).namespace == namespace  # passes the config's own check
    assert fleet_namespace(data.draw(st.permutations(routes))) == namespace
    i = data.draw(st.integers(0, len(routes) - 1))
    field = data.draw(st.integers(0, 2))
    changed = [list(route) for route in routes]
    changed[i][field] += "x" if field != 1 else "/x"
    assert fleet_namespace((a, b, c) for a, b, c in changed) != namespace


# --- 9. one half-open trial fleet-wide -------------------------------------------------------------


def trial_document(two: dict[str, FaultServer], url: str, namespace: str) -> dict[str, Any]:
    return state_document(two, url, namespace, health={"cooldown": 0.3}, state={"leader_ttl": TTL_S})


def admitting(fleet: list[Router]) -> list[int]:
    """The replicas whose s0 breaker would let a trial through now (asking, as a request's pick does)."""
    return [i for i, router in enumerate(fleet) if router.routes["s0"].breaker.available()]


def granted(fleet: list[Router]) -> list[int]:
    """The replicas that may send s0's trial now, read without asking for it (as ``status()`` shows)."""
    return [i for i, router in enumerate(fleet) if "s0" in router.state.status().get("trials", [])]


def is_open(router: Router) -> bool:
    """Whether s0's breaker is open or half-open, read without asking for the trial."""
    return router.routes["s0"].breaker.reading()[0]


def watch_idle(fleet: list[Router], seconds: float) -> None:
    """Let ``seconds`` pass with no request, checking all along that at most one replica may send the trial."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        now = granted(fleet)
        assert len(now) <= 1, f"replicas {now} each hold s0's trial {time.monotonic() - started:.2f} s idle"
        time.sleep(0.01)


def open_everywhere(fleet: list[Router], two: dict[str, FaultServer]) -> None:
    """s0 fails until the first replica's breaker opens; every replica adopts it; one is granted the trial."""
    two["s0"].set_fault(Fault.STATUS, status=503)
    for _ in range(3):
        with pytest.raises(AllRoutesFailed):
            fleet[0].chat(USER, route="s0")
    bound = fleet[0].config.state.staleness_bound_s
    wait_for(lambda: all(is_open(r) for r in fleet), bound, "every replica adopted the open breaker")
    wait_for(lambda: len(admitting(fleet)) == 1, 5, "one replica granted the trial")


def trials_sent(fleet: list[Router], two: dict[str, FaultServer]) -> int:
    """Traffic from every replica while s0 hangs: how many trials reached s0 in ``TRIAL_WINDOW_S``."""
    two["s0"].set_fault(Fault.HANG)
    hits, stop = two["s0"].hits, threading.Event()

    def traffic(router: Router) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                router.chat(USER)

    threads = [threading.Thread(target=traffic, args=(r,), daemon=True) for r in fleet for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: two["s0"].hits > hits, 5, "a trial")
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > TRIAL_WINDOW_S or two["s0"].hits > hits + 1, 5, "window")
        return two["s0"].hits - hits
    finally:
        stop.set()
        two["s0"].set_fault(None)
        for thread in threads:
            thread.join(5)


@contextlib.contextmanager
def fleet_of(n: int, document: dict[str, Any]) -> Iterator[list[Router]]:
    made = [router_of(document) for _ in range(n)]
    try:
        connected(*made)
        yield made
    finally:
        for router in made:
            router.close()


def test_an_idle_holder_never_leaves_two_replicas_holding_the_trial(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    """The grant's holder sends nothing for twice the lock's TTL: no two replicas hold the trial meanwhile, and
    when traffic comes the recovering server gets one trial, not one per replica."""
    with fleet_of(3, trial_document(two, redis_server.url, namespace)) as fleet:
        open_everywhere(fleet, two)
        watch_idle(fleet, IDLE_S)
        assert trials_sent(fleet, two) == 1


def test_a_holder_whose_trial_was_given_back_keeps_it_while_idle(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    """The holder's trial ended neither way (its deadline ran out): its breaker stays half-open, the lock its own."""
    with fleet_of(3, trial_document(two, redis_server.url, namespace)) as fleet:
        open_everywhere(fleet, two)
        (holder,) = admitting(fleet)
        two["s0"].set_fault(Fault.HANG)
        with contextlib.suppress(Exception):
            fleet[holder].chat(USER, route="s0", deadline=0.3)  # the trial is cut by the deadline: given back
        breaker = fleet[holder].routes["s0"].breaker
        assert breaker.state is BreakerState.HALF_OPEN and not breaker.trial_in_flight
        two["s0"].set_fault(None)
        watch_idle(fleet, IDLE_S)
        assert trials_sent(fleet, two) == 1


def test_a_holder_that_stops_renewing_loses_the_trial_to_one_other_replica(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    """The holder's sync stops (as if it crashed, or its thread starved): its lock expires, one other replica takes
    the trial, and the old holder, still believing itself connected, sends none once its lock could have expired."""
    with fleet_of(3, trial_document(two, redis_server.url, namespace)) as fleet:
        open_everywhere(fleet, two)
        (holder,) = admitting(fleet)
        fleet[holder].state.halt()  # its threads stop: nothing renews its lock, nothing is given back
        assert fleet[holder].state.status()["connected"]
        bound = TTL_S + 2 * fleet[0].config.state.staleness_bound_s
        wait_for(lambda: admitting(fleet) not in ([], [holder]), bound, "another replica granted the trial")
        watch_idle(fleet, TTL_S)
        assert trials_sent(fleet, two) == 1


def redis_client(server: RedisServer) -> Any:
    import redis

    return redis.Redis.from_url(server.url)


def test_a_trial_no_request_asks_for_goes_to_a_replica_whose_requests_do(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    """The grant's holder gets no more requests: it gives the trial up within one TTL, and the replica that has
    traffic sends it, so a recovered server is not kept out of the fleet by an idle replica."""
    with fleet_of(2, trial_document(two, redis_server.url, namespace)) as fleet:
        open_everywhere(fleet, two)
        (holder,) = admitting(fleet)
        busy, stop = fleet[1 - holder], threading.Event()
        two["s0"].set_fault(None)  # recovered: the busy replica's trial closes every breaker

        def traffic() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    busy.chat(USER)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            bound = 2 * TTL_S + 2 * busy.config.state.staleness_bound_s
            wait_for(lambda: not any(is_open(r) for r in fleet), bound, "the busy replica's trial closed s0")
        finally:
            stop.set()
            thread.join(5)

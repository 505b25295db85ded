"""``prefix_aware`` across app replicas: the index shared through a real redis-server (``fleet/redis_prefix.py``).

Replicas here are routers in this process, each with its own Redis connection; the hashes themselves are
checked across processes (different ``PYTHONHASHSEED``), since that is what lets separate pods share them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis as redis_lib
from hypothesis import given, settings
from hypothesis import strategies as st

from anorag_integrations import Router, call_info
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.router.balancing.prefix_aware import PrefixAware
from anorag_integrations.router.balancing.prefix_index import PrefixIndex, chain_blocks
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.fleet import redis_prefix
from anorag_integrations.router.fleet.redis_prefix import PrefixShare
from anorag_integrations.testing import Fault, FaultServer, RedisServer

from .fleet import connected, shared_config, wait_for

DOCS = [
    f"Document {d} on topic {d * 7}. " + " ".join(f"Fact {d}.{n} reads {n * d % 97}." for n in range(60))
    for d in range(6)
]


def ask(doc: str, question: str = "Summarise it.") -> list[dict[str, str]]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def policy(router: Router) -> PrefixAware:
    assert isinstance(router.policy, PrefixAware)
    return router.policy


def blocks_of(router: Router, doc: str, question: str = "Summarise it.") -> tuple[int, ...]:
    from anorag_integrations.router.balancing.prefix_index import conversation_blocks

    return conversation_blocks(ask(doc, question), router.config.prefix_aware.block_chars)


def replicas(n: int, config: object) -> list[Router]:
    made = [Router(config, start_prober=False) for _ in range(n)]  # type: ignore[arg-type]
    connected(*made)
    return made


def knows(router: Router, route: str, blocks: tuple[int, ...]) -> bool:
    return policy(router).index.depth(route, blocks) == len(blocks)


def test_block_hashes_are_the_same_in_every_process() -> None:
    """Replicas in other processes (other hash seeds) must name a prefix by the same number to share it."""
    text = "Shared system prompt. " * 40 + "\udc80 a lone surrogate, kept"
    code = (
        "import json, sys; from anorag_integrations.router.balancing.prefix_index import chain_blocks;"
        "print(json.dumps(chain_blocks(sys.argv[1])))"
    )
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, text], env=env, capture_output=True, text=True, check=True)
        seen.add(tuple(json.loads(out.stdout)))
    assert seen == {chain_blocks(text)}
    assert len(chain_blocks(text)) > 10 and len(set(chain_blocks(text))) == len(chain_blocks(text))


def test_a_replica_places_a_prompt_where_another_replica_sent_its_prefix(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = shared_config(two, redis_server.url, namespace, lb_policy="prefix_aware")
    a, b = replicas(2, config)
    try:
        placed = {i: call_info(a.chat(ask(doc))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
        assert set(placed.values()) == {"s0", "s1"}  # the documents were spread, so following them is not luck
        bound = config.state.staleness_bound_s
        wait_for(
            lambda: all(knows(b, placed[i], blocks_of(b, doc)) for i, doc in enumerate(DOCS)),
            bound,
            "b learns where a sent each document",
        )
        for i, doc in enumerate(DOCS):
            other = "s1" if placed[i] == "s0" else "s0"
            assert policy(b).index.depth(other, blocks_of(b, doc)) == 0
        followed = {i: call_info(b.chat(ask(doc, "Which fact is last?"))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
        assert followed == placed
        rates = policy(b).hit_rates()
        assert all(rate is not None and rate > 0.5 for rate in rates.values()), rates  # b predicted hits it never sent

        def fleet_rates() -> dict[str, float | None]:
            return policy(a).fleet_hit_rates()

        # a sent each document once (nothing predicted), b once more (all but the question): about half, fleet-wide
        wait_for(lambda: all((fleet_rates().get(r) or 0) > 0.3 for r in ("s0", "s1")), bound, "the fleet's tally")
        fleet = fleet_rates()
        assert all(rate is not None and rate < 0.6 for rate in fleet.values()), fleet
        assert all(rate is not None and rate < 0.05 for rate in policy(a).hit_rates().values())  # a's own: none
        assert b.stats()["s0"]["prefix_hit_rate_predicted_fleet"] == pytest.approx(fleet["s0"], abs=0.2)
    finally:
        for router in (a, b):
            router.close()


@pytest.mark.parametrize("page", [redis_prefix.PAGE, 8])
def test_a_replica_that_starts_late_learns_the_fleet_index_page_by_page(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With pages of 8 entries the documents' ~400 blocks take dozens of syncs each way: a full page has the next
    sync run at once, so the late replica still converges within the staleness bound's order."""
    monkeypatch.setattr(redis_prefix, "PAGE", page)
    config = shared_config(two, redis_server.url, namespace, lb_policy="prefix_aware")
    (a,) = replicas(1, config)
    try:
        placed = {i: call_info(a.chat(ask(doc))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
        total = sum(len(blocks_of(a, doc)) for doc in DOCS)
        wait_for(lambda: a.state.status().get("prefix_blocks_adopted", 0) >= total, 10, "a's pushes went through")
        late = Router(config, start_prober=False)  # the constructor waits for the first sync
        try:
            wait_for(
                lambda: all(knows(late, placed[i], blocks_of(late, doc)) for i, doc in enumerate(DOCS)),
                10 * config.state.staleness_bound_s,
                "the late replica reads the fleet's index",
            )
            followed = {i: call_info(late.chat(ask(doc, "Why?"))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
            assert followed == placed
        finally:
            late.close()
    finally:
        a.close()


def test_a_server_that_restarted_is_forgotten_by_the_fleet_and_by_replicas_that_join_later(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = shared_config(two, redis_server.url, namespace, lb_policy="prefix_aware", health={"cooldown": 0.2})
    a, b = replicas(2, config)
    try:
        placed = {i: call_info(a.chat(ask(doc))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
        on_s0 = [doc for i, doc in enumerate(DOCS) if placed[i] == "s0"]
        on_s1 = [doc for i, doc in enumerate(DOCS) if placed[i] == "s1"]
        bound = config.state.staleness_bound_s
        wait_for(lambda: all(knows(b, "s0", blocks_of(b, doc)) for doc in on_s0), bound, "b learns s0's prefixes")
        client = redis_lib.Redis.from_url(redis_server.url)
        key, roots = f"{namespace}:prefix:64:s0", [str(blocks_of(a, doc)[0]) for doc in on_s0]
        assert on_s0 and all(client.zscore(key, root) is not None for root in roots)  # in the fleet's index
        two["s0"].set_fault(Fault.STATUS, status=503)  # s0 goes down (its breaker opens fleet-wide)...
        for _ in range(3):
            with pytest.raises(AllRoutesFailed):
                a.chat(ask("Anything."), route="s0")
        wait_for(lambda: b.routes["s0"].breaker.state is not BreakerState.CLOSED, bound, "b adopts the open breaker")
        two["s0"].set_fault(Fault.NONE)  # ...and comes back, its cache empty

        def forgot(router: Router) -> bool:
            """The replica's next pick that may use s0 again sees its breaker moved on, and forgets s0."""
            router.chat(ask("Another question entirely."))
            return not any(knows(router, "s0", blocks_of(router, doc)) for doc in on_s0)

        wait_for(lambda: forgot(a), 10, "a forgets the restarted server")
        wait_for(lambda: forgot(b), 10, "b forgets the restarted server")
        try:
            wait_for(
                lambda: all(client.zscore(key, root) is None for root in roots),
                bound,
                "the replicas cut s0's entries from the fleet's index",
            )
        finally:
            client.close()
        late = Router(config, start_prober=False)
        try:
            wait_for(lambda: all(knows(late, "s1", blocks_of(late, doc)) for doc in on_s1), bound, "late learns s1")
            assert not any(knows(late, "s0", blocks_of(late, doc)) for doc in on_s0)  # the cut reached Redis
        finally:
            late.close()
    finally:
        for router in (a, b):
            router.close()


ROUTES = st.sampled_from(["r0", "r1"])
CHAINS = st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=6)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), ROUTES, CHAINS, st.integers(0, 6)),
        st.tuples(st.just("push"), st.booleans()),  # a sync: its push reaches Redis (True) or fails (False)
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS, cap=st.integers(1, 12))
def test_the_outbox_loses_nothing_but_its_oldest_past_the_cap_and_keeps_the_order_through_failed_syncs(
    steps: list[tuple[object, ...]], cap: int
) -> None:
    """Whatever the syncs do, each route's pushes arrive in the order recorded (deepest block first), a failed
    push is sent again before anything newer, only the oldest blocks past ``max_blocks`` are dropped, and the
    hit/sent tally that reaches Redis is exactly what was recorded."""
    share = PrefixShare(cap, {}, 64)
    recorded: dict[str, list[int]] = {"r0": [], "r1": []}
    delivered: dict[str, list[int]] = {"r0": [], "r1": []}
    tally_in, tally_out = [0, 0], [0, 0]
    for step in steps:
        if step[0] == "record":
            _, route, chain, depth = step
            assert isinstance(route, str) and isinstance(chain, list) and isinstance(depth, int)
            share.recorded(route, chain, depth)
            recorded[route] += list(reversed(chain[:cap]))
            tally_in[0] += depth
            tally_in[1] += len(chain)
        else:
            push = share.take()
            if step[1]:
                for route, hashes in push.hashes.items():
                    delivered[route] += hashes
                for hit, sent in push.tally.values():
                    tally_out[0] += hit
                    tally_out[1] += sent
            else:
                share.requeue(push)
    final = share.take()
    for route in ("r0", "r1"):
        pending = final.hashes.get(route, [])
        assert len(pending) <= cap
        sent = delivered[route] + pending
        assert _is_subsequence(sent, recorded[route])
        assert sent[-len(pending) :] == recorded[route][-len(pending) :] if pending else True  # newest never dropped
    tally_out[0] += sum(hit for hit, _ in final.tally.values())
    tally_out[1] += sum(sent for _, sent in final.tally.values())
    assert tally_out == tally_in


def _is_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def test_with_redis_gone_the_replicas_route_by_their_own_index_and_share_again_when_it_is_back(
    namespace: str, two: dict[str, FaultServer]
) -> None:
    with RedisServer() as redis:
        config = shared_config(two, redis.url, namespace, lb_policy="prefix_aware")
        a, b = replicas(2, config)
        try:
            redis.kill()
            wait_for(lambda: not a.state.status()["connected"], 5, "a notices the outage")
            placed = {i: call_info(a.chat(ask(doc))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
            again = {i: call_info(a.chat(ask(doc, "And?"))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
            assert again == placed  # a's own index still places its contexts: degraded, not broken
            assert not any(knows(b, placed[i], blocks_of(b, doc)) for i, doc in enumerate(DOCS))
            redis.start()
            wait_for(
                lambda: all(knows(b, placed[i], blocks_of(b, doc)) for i, doc in enumerate(DOCS)),
                10,
                "what a recorded during the outage reaches b once Redis is back",
            )
        finally:
            for router in (a, b):
                router.close()


class _Learner:
    """A policy's side of adoption, recording what it was taught."""

    def __init__(self) -> None:
        self.index = PrefixIndex(100)

    def adopt(self, route: object, hashes: list[int]) -> None:
        self.index.adopt(getattr(route, "name"), hashes)  # noqa: B009


def _route(name: str) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(name=name, kind="chat")


def test_an_exchange_under_way_when_a_server_restarts_or_a_route_leaves_teaches_nothing_about_it() -> None:
    """The reply of an exchange taken before ``restarted``/``left`` may hold entries from before: not adopted, and
    a push that failed meanwhile is not requeued (it was recorded for a cache that is gone)."""
    learner = _Learner()
    share = PrefixShare(100, {"chat": learner}, 64)
    routes = {"r": _route("r")}
    share.recorded("r", [1, 2, 3], 0)
    push = share.take()
    share.restarted("r")
    share.requeue(push)  # the push failed after the restart
    assert share.take().hashes == {}
    push = share.take()
    share.left("r")
    share.apply(routes, ["r"], [9, [[[b"11", b"1", b"12", b"2"], b"5", b"9", 4]]], push)
    assert learner.index.size("r") == 0 and share.fleet_tally == {}
    fresh = share.take()  # an exchange taken after: adopted
    share.apply(routes, ["r"], [9, [[[b"11", b"3", b"12", b"4"], b"5", b"9", 4]]], fresh)
    assert learner.index.size("r") == 2 and share.fleet_tally == {"r": (5, 9)}


def test_a_sequence_that_went_back_has_every_replica_read_the_index_anew() -> None:
    """Redis lost ``ns:prefix:seq`` (a restart without persistence): new entries are numbered from 1 again, below
    what replicas had read; they must start over rather than wait for the sequence to climb back."""
    learner = _Learner()
    share = PrefixShare(100, {"chat": learner}, 64)
    routes = {"r": _route("r")}
    share.apply(routes, ["r"], [500, [[[b"11", b"500"], b"0", b"0", 2]]], share.take())
    _, args = share.args("ns", ["r"], share.take())
    assert args[4] == 500  # since
    assert share.apply(routes, ["r"], [3, [[[], b"0", b"0", 0]]], share.take()) is True  # sync again at once
    _, args = share.args("ns", ["r"], share.take())
    assert args[4] == 0

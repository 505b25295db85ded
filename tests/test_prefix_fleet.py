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

from anorag_integrations import Router, call_info
from anorag_integrations.router import AllRoutesFailed
from anorag_integrations.router.balancing.prefix_aware import PrefixAware
from anorag_integrations.router.balancing.prefix_index import chain_blocks
from anorag_integrations.router.endpoints.health import BreakerState
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


def test_a_replica_that_starts_late_knows_the_fleet_index_before_its_first_request(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer]
) -> None:
    config = shared_config(two, redis_server.url, namespace, lb_policy="prefix_aware")
    (a,) = replicas(1, config)
    try:
        placed = {i: call_info(a.chat(ask(doc))).route for i, doc in enumerate(DOCS)}  # type: ignore[union-attr]
        wait_for(lambda: a.state.status().get("prefix_blocks_adopted", 0) > 0, 2, "a's push went through")
        late = Router(config, start_prober=False)  # the constructor waits for the first sync
        try:
            wait_for(
                lambda: all(knows(late, placed[i], blocks_of(late, doc)) for i, doc in enumerate(DOCS)),
                config.state.staleness_bound_s,
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
        client = redis_lib.Redis.from_url(redis_server.url)
        roots = [str(blocks_of(a, doc)[0]) for doc in on_s0]
        try:
            wait_for(
                lambda: all(client.zscore(f"{namespace}:prefix:s0", root) is None for root in roots),
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

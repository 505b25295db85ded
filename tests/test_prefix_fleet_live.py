"""``prefix_aware``'s shared index on the session's two real vLLM servers and a real redis-server.

Two app replicas (routers with their own Redis connections): a context one of them placed is found
cached where it went when the other asks about it (vLLM's own counters say so); a server that restarts
is forgotten by both, and a replica that starts afterwards learns the fleet's index without it.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib

from anorag_integrations import Router, call_info
from anorag_integrations.router.balancing.prefix_aware import PrefixAware
from anorag_integrations.router.balancing.prefix_index import conversation_blocks
from anorag_integrations.testing import RedisServer

from .conftest import real_config, vllm_on
from .fleet import FAST_STATE, connected, wait_for

pytestmark = [pytest.mark.live, pytest.mark.kills_vllm]  # it restarts one server of the pair (and starts it again)
TOPICS = ["the river trade", "migrating birds", "glass making", "tidal power"]
DOCS = [f"Notes on {t}.\n" + "\n".join(f"Fact {n} about {t}: value {n * 7 % 13}." for n in range(70)) for t in TOPICS]


def ask(doc: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def knows(router: Router, route: str, doc: str) -> bool:
    policy = router.policy
    assert isinstance(policy, PrefixAware)
    one, other = (conversation_blocks(ask(doc, q), policy.block_chars) for q in ("Q?", "Another one?"))
    shared = next(i for i, (x, y) in enumerate(zip(one, other, strict=False)) if x != y)  # the context's blocks
    return shared > 10 and policy.index.depth(route, one[:shared]) == shared


def cached_tokens(router: Router, route: str) -> float:
    """The server's ``vllm:prefix_cache_hits_total`` (prompt tokens found cached since it started)."""
    report = router.routes[route].scrape_load()
    assert report is not None and report.prefix_hits is not None
    return report.prefix_hits


def test_replicas_share_where_contexts_are_cached_forget_a_restarted_server_and_teach_a_late_replica(
    vllm_pair: list[Any], redis_server: RedisServer, namespace: str
) -> None:
    state = {"backend": "redis", "url": redis_server.url, "namespace": namespace, **FAST_STATE}
    config = real_config(
        vllm_pair, "vllm", {"timeout": 120}, lb_policy="prefix_aware", params={"max_tokens": 2}, state=state
    )
    a, b = Router(config), Router(config)  # each scrapes /metrics every second (a restart shows there)
    connected(a, b)
    try:
        placed = {doc: call_info(a.chat(ask(doc, "Which fact is first?"))).route for doc in DOCS}  # type: ignore[union-attr]
        assert set(placed.values()) == {"vllm0", "vllm1"}, placed  # spread: following them is not chance
        bound = config.state.staleness_bound_s
        wait_for(lambda: all(knows(b, route, doc) for doc, route in placed.items()), bound, "b learns a's placements")
        for doc, route in placed.items():
            before = cached_tokens(b, route)
            answer = b.chat(ask(doc, "Which fact is last?"))
            assert call_info(answer).route == route  # type: ignore[union-attr]
            # vLLM found the context cached where b sent it, though b never sent it before (blocks of 128 tokens)
            assert cached_tokens(b, route) - before >= 128 * 4, (doc[:20], route)

        gone = placed[DOCS[0]]
        client = redis_lib.Redis.from_url(redis_server.url)
        key = f"{namespace}:prefix:64:{gone}"
        roots = [str(conversation_blocks(ask(doc, "Q"), 64)[0]) for doc, route in placed.items() if route == gone]
        assert all(client.zscore(key, h) is not None for h in roots)  # in the fleet's index before the restart
        k = int(gone.removeprefix("vllm"))
        vllm_pair[k].stop()
        vllm_pair[k] = vllm_on(vllm_pair[k].port).start()  # back on its port, its cache and counters empty

        def forgot(router: Router) -> bool:
            """The replica's scraper reads the restarted server's counters, gone back: its next pick forgets it."""
            router.chat([{"role": "user", "content": "Say yes."}])
            return not any(knows(router, gone, doc) for doc, route in placed.items() if route == gone)

        wait_for(lambda: forgot(a), 60, "a forgets the restarted server")
        wait_for(lambda: forgot(b), 60, "b forgets the restarted server")
        kept = [doc for doc, route in placed.items() if route != gone]
        assert all(knows(a, placed[doc], doc) for doc in kept)  # the other server's contexts stay known

        try:  # the replicas cut what they had read of the restarted server from the fleet's index
            wait_for(lambda: all(client.zscore(key, h) is None for h in roots), bound, "cut")
        finally:
            client.close()
        late = Router(config)  # joins after the restart: learns the fleet's index, without what was lost
        try:
            wait_for(lambda: all(knows(late, placed[doc], doc) for doc in kept), bound, "late learns the kept")
            assert not any(knows(late, gone, doc) for doc, route in placed.items() if route == gone)
            before = cached_tokens(late, placed[kept[0]])
            answer = late.chat(ask(kept[0], "Which fact is second?"))
            assert call_info(answer).route == placed[kept[0]]  # type: ignore[union-attr]
            assert cached_tokens(late, placed[kept[0]]) - before >= 128 * 4
        finally:
            late.close()
    finally:
        a.close()
        b.close()

"""prefix_aware on the session's two real vLLM servers: contexts stay where they are cached, hit rates are read."""

from __future__ import annotations

from typing import Any

import pytest

from anorag_integrations import Router, call_info

from .conftest import real_config

pytestmark = pytest.mark.live
TOPICS = ["the river trade", "migrating birds", "glass making"]


def test_each_context_stays_on_the_server_that_caches_it(vllm_pair: list[Any]) -> None:
    """Three long contexts, two questions each, interleaved: round robin would move every second question."""
    docs = [
        f"Notes on {t}.\n" + "\n".join(f"Fact {n} about {t}: value {n * 7 % 13}." for n in range(80)) for t in TOPICS
    ]
    config = real_config(vllm_pair, "vllm", {"timeout": 120}, lb_policy="prefix_aware", params={"max_tokens": 2})
    with Router(config) as router:
        served: dict[int, set[str]] = {i: set() for i in range(len(docs))}
        for question in ("Which fact is first?", "Which fact is last?"):
            for i, doc in enumerate(docs):
                response = router.chat([{"role": "system", "content": doc}, {"role": "user", "content": question}])
                served[i].add(call_info(response).route)  # type: ignore[union-attr, arg-type]
        for route in router.routes.values():
            route.scrape_load()  # the scraper reads /metrics every second; read it now
        stats = router.stats()
    assert all(len(routes) == 1 for routes in served.values()), served
    used = [row for row in stats.values() if row["successes"]]
    # Each context was sent twice to its server: the second time most of the prompt was predicted cached...
    assert all(row["prefix_hit_rate_predicted"] > 0.4 for row in used), stats
    # ...and vLLM's own counters agree that it was (the session's servers may have served other prompts before).
    assert all(row["prefix_hit_rate_measured"] is not None and row["prefix_hit_rate_measured"] > 0 for row in used)

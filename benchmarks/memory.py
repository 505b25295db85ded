"""Memory: resident set size after 50,000 requests minus after 1,000, per client (target < 10 MB).

A growing RSS here would mean per-request state that is never freed (stats, call records, clients).
One vLLM-shaped server in its own process; requests at concurrency 64. Linux only (reads /proc).
``--prefix-index``: instead, ``prefix_aware``'s index and session table after 1,000,000 routed
requests, then of the session table after a million conversations (tracemalloc: held and peak),
against their caps, and a pick's cost untraced.
Run: ``.venv/bin/python benchmarks/memory.py [--prefix-index]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
from typing import Any

from _common import MODEL, fault_server, pin_client, save
from _measure import PROMPT, Call, drain, throughput

MESSAGES = [{"role": "user", "content": PROMPT}]
TARGET_MB = 10


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def clients(url: str) -> dict[str, Call]:
    from anorag_integrations import Router
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.langchain import ChatVLLMRouted

    router = Router(config_from_dict({"llm": {"routes": {"only": {"base_url": url, "model": MODEL}}}}, env={}))
    routed = ChatVLLMRouted(router=router)

    return {
        "Router.achat": lambda: router.achat(MESSAGES),
        "Router.astream": lambda: drain(router.astream(MESSAGES)),
        "ChatVLLMRouted.ainvoke": lambda: routed.ainvoke(PROMPT),
    }


async def growth(call: Call, first: int, total: int, concurrency: int) -> dict[str, float]:
    await throughput(call, first, concurrency)
    gc.collect()
    after_first = rss_mb()
    result = await throughput(call, total - first, concurrency)
    gc.collect()
    after_total = rss_mb()
    return {
        "rss_after_first_mb": round(after_first, 1),
        "rss_after_total_mb": round(after_total, 1),
        "growth_mb": round(after_total - after_first, 2),
        "failures": result["failures"],
    }


INDEX_REQUESTS = 1_000_000
INDEX_CONTEXTS = 50_000
"""Distinct contexts the million requests draw from (about 2,000 characters each: the index fills up)."""
INDEX_CAP_MB = 32.0
"""The memory bound the README gives two routes' indexes at the default entry cap: 16 MB per route."""
SESSIONS_CAP_MB = 32.0
"""The bound it gives a full session table (100,000 conversations, ids of about ten characters)."""
PICKS_TIMED = 50_000


def prefix_index_memory(requests: int) -> dict[str, Any]:
    """tracemalloc of ``prefix_aware`` (its index and the router's session table) over ``requests`` picks."""
    import random
    import time
    import tracemalloc

    from anorag_integrations import Router
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.router.balancing.prefix_aware import PrefixAware
    from anorag_integrations.testing.prompts import TextPrompt as Prompt

    routes = {n: {"base_url": f"http://127.0.0.1:9/{n}/v1", "model": MODEL} for n in ("a", "b")}
    router = Router(
        config_from_dict({"llm": {"routes": routes, "lb_policy": "prefix_aware"}}, env={}), start_prober=False
    )
    fleet = list(router.routes.values())
    pool = router.pools["chat"]
    policy = pool.policy
    assert isinstance(policy, PrefixAware)
    rng = random.Random(7)
    contexts = [f"context {c}: " + "word " * 400 for c in range(INDEX_CONTEXTS)]
    tracemalloc.start()
    for n in range(requests):
        route = policy.pick(fleet, lambda r: True, Prompt(f"{contexts[rng.randrange(INDEX_CONTEXTS)]} question {n}"))
        assert route is not None
    index_bytes, index_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for n in range(requests):
        pool.sessions.set(f"session-{n}", "a")
    total_bytes, total_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sizes = {route.name: policy.index.size(route.name) for route in fleet}
    began = time.perf_counter()  # the pick's cost, untraced (tracemalloc slows every allocation)
    for n in range(PICKS_TIMED):
        policy.pick(fleet, lambda r: True, Prompt(f"{contexts[rng.randrange(INDEX_CONTEXTS)]} question {n}"))
    pick_us = (time.perf_counter() - began) / PICKS_TIMED * 1e6
    router.close()
    entries = sum(sizes.values())
    return {
        "requests": requests,
        "index_blocks": sizes,
        "index_cap_blocks": policy.index.max_blocks,
        "index_mb": round(index_bytes / 2**20, 1),
        "index_peak_mb": round(index_peak / 2**20, 1),
        "bytes_per_block": round(index_bytes / entries),
        "index_cap_mb": INDEX_CAP_MB,
        "sessions": len(pool.sessions),
        "sessions_cap": pool.sessions.max_sessions,
        "sessions_mb": round((total_bytes - index_bytes) / 2**20, 1),
        "sessions_peak_mb": round((total_peak - index_bytes) / 2**20, 1),
        "sessions_cap_mb": SESSIONS_CAP_MB,
        "met": index_peak / 2**20 < INDEX_CAP_MB
        and (total_peak - index_bytes) / 2**20 < SESSIONS_CAP_MB
        and all(v <= policy.index.max_blocks for v in sizes.values()),
        "pick_us": round(pick_us, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix-index", action="store_true", help="measure prefix_aware's index instead")
    parser.add_argument("--index-requests", type=int, default=INDEX_REQUESTS)
    parser.add_argument("--first", type=int, default=1_000)
    parser.add_argument("--total", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if args.prefix_index:
        row = prefix_index_memory(args.index_requests)
        print(row)
        print("written to", save("memory_prefix_index", row, cores=pin_client()))
        return
    cores = pin_client()
    rows = []
    with fault_server() as server:

        async def run() -> None:
            for name, call in clients(server.url).items():
                row = {"client": name, **await growth(call, args.first, args.total, args.concurrency)}
                row["met"] = row["growth_mb"] < TARGET_MB
                rows.append(row)
                print(row, flush=True)

        asyncio.run(run())
    path = save(
        "memory",
        rows,
        cores=cores,
        first=args.first,
        total=args.total,
        concurrency=args.concurrency,
        target_mb=TARGET_MB,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

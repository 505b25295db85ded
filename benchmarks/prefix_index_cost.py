"""What ``prefix_aware``'s index costs at fleet scale: a pick at 1,000 routes, a shared block, 1,000,000 blocks.

- **pick**: ``PrefixAware.pick`` over N routes (2 to 1,000), every route's index holding 64 prompts of
  ~10,000 characters (the prompt's blocks hashed once, as a call does; the hashing is timed apart).
- **shared block** (what a KV event is to vLLM's own scheme: one block learnt from elsewhere): adopting the
  fleet's entries a sync reads back (``PrefixShare.apply``), per block; and one sync's ``PREFIX`` script on a
  real redis-server at 1,000 routes, idle (nothing new) and pushing one 10,000-character prompt.
- **memory at 1,000,000 blocks per route**: the local index (tracemalloc) and the route's sorted set in Redis
  (``MEMORY USAGE``).
Run: ``.venv/bin/python benchmarks/prefix_index_cost.py`` (about a minute; nothing else running).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import redis
from _common import pin_client, save

from anorag_integrations.router.balancing.prefix_aware import PrefixAware
from anorag_integrations.router.balancing.prefix_index import PrefixIndex, chain_blocks
from anorag_integrations.router.fleet.redis_prefix import PREFIX, PrefixShare, Push
from anorag_integrations.testing import RedisServer

PROMPT_CHARS = 10_000


def fake_route(name: str) -> Any:
    """What the policy reads of a route: name, weight, in-flight count, breaker epoch, no /metrics reading."""
    return SimpleNamespace(
        name=name,
        weight=1.0,
        kind="chat",
        stats=SimpleNamespace(in_flight=0),
        load=None,
        breaker=SimpleNamespace(epoch=0),
    )


class Prompt:
    def __init__(self, text: str) -> None:
        self.blocks = chain_blocks(text)

    def prefix_blocks(self, block_chars: int) -> tuple[int, ...]:
        return self.blocks


def text(i: int) -> str:
    return f"Context {i}. " + "The quick brown fox jumps over the lazy dog. " * (PROMPT_CHARS // 45)


def pick_cost(n: int) -> dict[str, Any]:
    routes = [fake_route(f"r{i}") for i in range(n)]
    policy = PrefixAware(scrape_metrics=False)
    prompts = [Prompt(text(i)) for i in range(64)]
    for i, prompt in enumerate(prompts):  # each route's index holds some prompts: a realistic depth to search
        for route in routes[i % n :: max(1, n // 8)][:8]:
            policy.index.record(route.name, prompt.blocks)
    usable = lambda route: True  # noqa: E731
    rounds = max(200, 20_000 // n)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for k in range(rounds):
            policy.pick(routes, usable, prompts[k % len(prompts)])
        times.append((time.perf_counter() - started) / rounds * 1e6)
    return {"routes": n, "pick_us": round(statistics.median(times), 1)}


def hash_cost() -> float:
    sample = text(1)
    started = time.perf_counter()
    for _ in range(500):
        chain_blocks(sample)
    return round((time.perf_counter() - started) / 500 * 1e6, 1)


def adopt_cost() -> dict[str, Any]:
    """Per block: parsing a PREFIX reply and adopting its entries into the local index (1,000 routes, 64 each)."""
    adopted: list[int] = []

    class Policy:
        def __init__(self) -> None:
            self.index = PrefixIndex(65_536)

        def adopt(self, route: Any, hashes: list[int]) -> None:
            self.index.adopt(route.name, hashes)
            adopted.append(len(hashes))

    share = PrefixShare(65_536, {"chat": Policy()}, 64)
    routes = {f"r{i}": fake_route(f"r{i}") for i in range(1000)}
    names = list(routes)
    blocks = chain_blocks(text(0))[:64]
    reply = [[[str(h).encode(), str(j).encode()] for j, h in enumerate(blocks, 1)] for _ in names]
    flat = [[[x for pair in part for x in pair], b"0", b"0", 2 * len(part)] for part in reply]
    started = time.perf_counter()
    share.apply(routes, names, [len(blocks), flat], Push())
    took = time.perf_counter() - started
    return {"blocks": sum(adopted), "adopt_us_per_block": round(took / sum(adopted) * 1e6, 2)}


def sync_cost(url: str) -> dict[str, Any]:
    """One ``PREFIX`` call at 1,000 routes: idle (nothing new to push or read) and pushing one 10,000-char prompt."""
    client = redis.Redis.from_url(url)
    sha = client.script_load(PREFIX)
    share = PrefixShare(65_536, {"chat": object()}, 64)  # type: ignore[dict-item]
    names = [f"r{i}" for i in range(1000)]
    keys, args = share.args("bench", names, Push())
    client.evalsha(sha, len(keys), *keys, *args)  # creates nothing: warm the script
    idle = []
    for _ in range(20):
        started = time.perf_counter()
        client.evalsha(sha, len(keys), *keys, *args)
        idle.append(time.perf_counter() - started)
    blocks = chain_blocks(text(2))
    pushes = []
    for i in range(20):
        push = Push(hashes={names[i]: list(reversed(blocks))}, tally={names[i]: (0, len(blocks))})
        keys, args = share.args("bench", names, push)
        started = time.perf_counter()
        client.evalsha(sha, len(keys), *keys, *args)
        pushes.append(time.perf_counter() - started)
    client.close()
    return {
        "sync_idle_ms_1000_routes": round(statistics.median(idle) * 1000, 2),
        "sync_push_ms_1000_routes": round(statistics.median(pushes) * 1000, 2),
        "pushed_blocks": len(blocks),
    }


def memory(url: str, held: int) -> dict[str, Any]:
    """Bytes per block at ``held`` blocks in one route: the local index, and the route's sorted set in Redis."""
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex(held)
    base = 0x9E3779B97F4A7C15
    chunk = min(10_000, held)
    for start in range(0, held, chunk):
        index.adopt("r", [(base * (start + j)) & ((1 << 64) - 1) for j in range(chunk)])
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert index.size("r") == held
    del index
    client = redis.Redis.from_url(url)
    sha = client.script_load(PREFIX)
    share = PrefixShare(held, {"chat": object()}, 64)  # type: ignore[dict-item]
    for start in range(0, held, chunk):
        hashes = [(base * (start + j)) & ((1 << 64) - 1) for j in range(chunk)]
        keys, args = share.args("mem", ["r"], Push(hashes={"r": hashes}))
        args[4] = 2**62  # ``since``: read nothing back
        client.evalsha(sha, len(keys), *keys, *args)
    stored = client.zcard("mem:prefix:64:r")
    used = client.memory_usage("mem:prefix:64:r", samples=0) or 0
    client.close()
    return {
        "blocks": held,
        "index_mb": round(current / 1e6, 1),
        "index_bytes_per_block": round(current / held),
        "redis_blocks": stored,
        "redis_mb": round(used / 1e6, 1),
        "redis_bytes_per_block": round(used / max(stored, 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, nargs="*", default=[2, 16, 100, 1000])
    parser.add_argument("--blocks", type=int, default=1_000_000, help="blocks held in one route for the memory figure")
    args = parser.parse_args()
    cores = pin_client()
    picks = [pick_cost(n) for n in args.routes]
    for row in picks:
        print(row, flush=True)
    with RedisServer() as server:
        result = {
            "picks": picks,
            "hash_us_10k_chars": hash_cost(),
            **adopt_cost(),
            **sync_cost(server.url),
            "memory": memory(server.url, args.blocks),
        }
    print(result)
    print("written to", save("prefix_index_cost", result, cores=cores))


if __name__ == "__main__":
    main()

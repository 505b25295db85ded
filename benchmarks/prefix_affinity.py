"""Prefix affinity: time to first token on two real servers, prefix_affinity vs round_robin.

RAG traffic: DOCS distinct long contexts (each over 1,000 tokens, as a system message), QUESTIONS
questions about each, in one shuffled order (fixed seed), streamed at concurrency CONCURRENCY
through a router over two servers. Each server's cache holds a few prefixes, as a busy GPU's would:
- vLLM (the default): SmolLM2-135M-Instruct, one core each, automatic prefix caching with a KV cache
  of ``--kv-blocks`` blocks of 128 tokens (``--num-gpu-blocks-override``; 40 blocks: about four
  contexts), prompt-token details on so usage reports the cached tokens;
- llama.cpp (``--engine llamacpp``): Gemma 3 270M, 1 thread and PARALLEL slots each; each slot keeps
  its last prompt and the host-RAM prompt cache is off (``--cache-ram 0``).
Each policy gets freshly started servers, so neither inherits the other's cache.
Target: prefix_affinity's mean TTFT <= 0.6 x round_robin's.
Run: ``.venv/bin/python benchmarks/prefix_affinity.py [--engine vllm|llamacpp]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from _common import save
from _engines import ENGINES, MODELS, cores, result_name, start_servers
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import running
from anorag_integrations.config import config_from_dict

PARALLEL = 4
POLICIES = ("round_robin", "prefix_affinity")
TOPICS = ["river trade", "migrating birds", "glass making", "tidal power", "bridge design", "beekeeping"]


def context(topic: str, facts: int) -> str:
    lines = (f"Fact {n}: in {topic}, reading {n * 7 % 13} was {n * 31 % 97} units." for n in range(facts))
    return f"You answer questions about {topic} from these notes.\n" + "\n".join(lines)


def workload(docs: int, questions: int, facts: int, seed: int = 7) -> list[list[dict[str, str]]]:
    pairs = [(d, q) for d in range(docs) for q in range(questions)]
    random.Random(seed).shuffle(pairs)
    return [
        [{"role": "system", "content": context(TOPICS[d], facts)}, {"role": "user", "content": f"What is fact {q}?"}]
        for d, q in pairs
    ]


async def run(urls: list[str], model: str, policy: str, requests: list[Any], concurrency: int) -> dict[str, Any]:
    routes = {f"server{i}": {"base_url": url, "model": model, "timeout": 120} for i, url in enumerate(urls)}
    config = {"llm": {"routes": routes, "lb_policy": policy}}
    router = Router(config_from_dict(config, env={}), start_prober=False)
    queue: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    ttfts: list[float] = []
    prompt_tokens = cached_tokens = 0

    async def worker() -> None:
        nonlocal prompt_tokens, cached_tokens
        while not queue.empty():
            messages = queue.get_nowait()
            started = time.perf_counter()
            first: float | None = None
            async for chunk in router.astream(messages, max_tokens=4, temperature=0):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    prompt_tokens += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    cached_tokens += (details.cached_tokens or 0) if details else 0
                assert call_info(chunk) is not None
            ttfts.append(first if first is not None else time.perf_counter() - started)

    begin = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - begin
    stats = router.stats()
    served = {name: row["successes"] for name, row in stats.items()}
    failed = {name: row["last_error"] for name, row in stats.items() if row["failures"]}
    await router.aclose()
    ttfts.sort()
    return {
        "policy": policy,
        "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000),
        "ttft_p95_ms": round(percentile(ttfts, 95) * 1000),
        "cached_prompt_share": round(cached_tokens / prompt_tokens, 3) if prompt_tokens else None,
        "prompt_tokens_per_request": round(prompt_tokens / len(requests)),
        "wall_s": round(wall, 1),
        "served": served,
        "failed_attempts": failed,
    }


def measure(policy: str, requests: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """One policy on two freshly started servers (empty caches)."""
    fresh = start_servers(
        args.engine,
        parallel=PARALLEL,
        llama_args=["--cache-ram", str(args.cache_ram)],
        vllm_args=["--num-gpu-blocks-override", str(args.kv_blocks), "--enable-prompt-tokens-details"],
    )
    with running(fresh) as servers:
        urls = [s.base_url for s in servers]
        return asyncio.run(run(urls, servers[0].alias, policy, requests, args.concurrency))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--facts", type=int, default=60, help="lines per context (60: about 1,200 tokens)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cache-ram", type=int, default=0, help="llama.cpp's host prompt cache, MiB (0: off)")
    parser.add_argument("--kv-blocks", type=int, default=40, help="vLLM's KV cache, blocks of 128 tokens")
    parser.add_argument("--engine", choices=ENGINES, default="vllm")
    args = parser.parse_args()
    requests = workload(args.docs, args.questions, args.facts)
    rows = [measure(policy, requests, args) for policy in POLICIES]
    baseline = rows[0]["ttft_mean_ms"]
    for row in rows:
        row["ttft_mean_vs_round_robin"] = round(row["ttft_mean_ms"] / baseline, 2)
        print(row)
    path = save(
        result_name("prefix_affinity", args.engine),
        rows,
        engine=args.engine,
        cores=cores(args.engine),
        docs=args.docs,
        questions_per_doc=args.questions,
        concurrency=args.concurrency,
        parallel_slots=PARALLEL if args.engine == "llamacpp" else None,
        cache_ram_mib=args.cache_ram if args.engine == "llamacpp" else None,
        kv_cache_tokens=args.kv_blocks * 128 if args.engine == "vllm" else None,
        model=MODELS[args.engine],
    )
    print("written to", path)


if __name__ == "__main__":
    main()

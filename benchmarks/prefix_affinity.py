"""Prefix-aware routing on two real servers: TTFT, throughput and the servers' own prefix-cache hit rates.

Three workloads, each streamed at ``--concurrency`` in one fixed shuffled order (seed 7):
- ``rag``: one of ``--docs`` contexts of about 1,200 tokens each (after a one-line system prompt)
  and one of ``--questions`` questions about it, interleaved;
- ``rag_many_questions``: the same contexts with ``--many-questions`` questions each (popular documents);
- ``rag_shared_system``: the same as ``rag`` with a 600-token system prompt every request shares, and
  ``--shared-docs`` contexts (the case where a hash of the first 2,000 characters sees one key);
- ``unique``: prompts of about 1,000 tokens that share nothing (not even their first characters).
Policies: round_robin, least_outstanding, the consistent-hash ring ``prefix_affinity`` (its default
``prefix_chars`` and one tuned per workload to hash the system prompt and 1,500 characters of the
context, never the question) and ``prefix_aware``.

vLLM (the default engine): SmolLM2-135M-Instruct, each server pinned to its own core (``taskset``,
``VLLM_CPU_OMP_THREADS_BIND``), automatic prefix caching with ``--kv-blocks`` blocks of 128 tokens
(52: about five of rag's ten contexts per server, four of rag_shared_system's eight: one server
cannot hold a workload's contexts, two can). The servers start once and are warmed up; before each
policy every server's prefix cache is emptied (``POST /reset_prefix_cache``, vLLM's dev endpoint)
and its ``vllm:prefix_cache_*`` counters read, so each policy starts cold and its measured hit rate
is its own. ``--engine llamacpp``: the rag workload on Gemma 3 270M, fresh servers per policy.
Targets (rag): prefix_aware's mean TTFT <= 0.35x round_robin's and <= 0.7x the hash ring's; measured
hit rate >= 1.5x round_robin's. (unique): p95 TTFT within 5 % of least_outstanding's.
Run: ``flock /tmp/anorag-cpu.lock .venv/bin/python benchmarks/prefix_affinity.py`` (about 12 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from _common import save
from _engines import ENGINES, MODELS, cores, result_name, start_servers
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import LocalServer, running
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.balancing.server_load import parse_load

PARALLEL = 4
TUNED_REACH = 1500
"""``prefix_affinity_tuned`` hashes the system prompt and this many characters of the context (not the question)."""
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "round_robin": ("round_robin", {}),
    "least_outstanding": ("least_outstanding", {}),
    "prefix_affinity": ("prefix_affinity", {}),
    "prefix_affinity_tuned": ("prefix_affinity", {}),  # prefix_chars set per workload (see ``tuned``)
    "prefix_aware": ("prefix_aware", {}),
}
UNIQUE_RUNS = ("least_outstanding", "prefix_aware", "round_robin")
TOPICS = [
    "river trade", "migrating birds", "glass making", "tidal power", "bridge design", "beekeeping",
    "salt mining", "clock repair", "coral reefs", "paper mills", "wind farms", "rice terraces",
]  # fmt: skip
SHORT_SYSTEM = "You answer questions from the notes the user gives."
LONG_SYSTEM = "You are a careful assistant for a research team. Follow these rules.\n" + "\n".join(
    f"Rule {n}: when a question concerns item {n}, quote the notes exactly and name the fact number." for n in range(30)
)
"""About 600 tokens: the system prompt every request of ``rag_shared_system`` shares."""


def context(topic: str, facts: int) -> str:
    lines = (f"Fact {n}: in {topic}, reading {n * 7 % 13} was {n * 31 % 97} units." for n in range(facts))
    return f"Notes about {topic}.\n" + "\n".join(lines)


def topic(d: int) -> str:
    """The ``d``-th document's topic: past the list's end, the same topics again as later volumes."""
    base = TOPICS[d % len(TOPICS)]
    return base if d < len(TOPICS) else f"{base}, volume {d // len(TOPICS) + 1}"


def rag(docs: int, questions: int, facts: int, system: str, seed: int = 7) -> list[list[dict[str, str]]]:
    pairs = [(d, q) for d in range(docs) for q in range(questions)]
    random.Random(seed).shuffle(pairs)
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{context(topic(d), facts)}\n\nQuestion: what is fact {q}?"},
        ]
        for d, q in pairs
    ]


def unique(count: int, facts: int) -> list[list[dict[str, str]]]:
    """Prompts that share no prefix: each starts with its own number and has its own readings."""
    return [
        [
            {"role": "user", "content": f"Request {i}. " + context(f"{TOPICS[i % len(TOPICS)]} site {i}", facts)},
        ]
        for i in range(count)
    ]


def counters(server: LocalServer) -> tuple[float, float]:
    """The server's (prefix-cache hits, queries) so far, read by the router's own /metrics parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as page:
        load = parse_load(page.read().decode(), 0)
    if load is None or load.prefix_hits is None or load.prefix_queries is None:
        return 0.0, 0.0
    return load.prefix_hits, load.prefix_queries


def reset_cache(server: LocalServer) -> None:
    """Empty the server's prefix cache (it refuses while requests hold blocks: retry)."""
    for _ in range(50):
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/reset_prefix_cache", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            if b"true" in answer.read():
                return
        time.sleep(0.2)
    raise RuntimeError(f"server on port {server.port} did not reset its prefix cache")


async def run(
    urls: list[str], model: str, policy: str, extra: dict[str, Any], requests: list[Any], concurrency: int
) -> dict[str, Any]:
    routes = {f"server{i}": {"base_url": url, "model": model, "timeout": 300} for i, url in enumerate(urls)}
    config = {"llm": {"routes": routes, "lb_policy": policy, **extra}}
    router = Router(config_from_dict(config, env={}), start_prober=False)
    await router.astart_prober()  # the /metrics scraper (prefix_aware, least_queue) on this loop
    queue: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    ttfts: list[float] = []
    by_sight: dict[bool, list[float]] = {True: [], False: []}
    """TTFTs of each context's first request in the run (no policy can find it cached) and of the rest."""
    seen: set[str] = set()
    prompt_tokens = cached_tokens = 0

    async def worker() -> None:
        nonlocal prompt_tokens, cached_tokens
        while not queue.empty():
            messages = queue.get_nowait()
            context = messages[-1]["content"].rsplit("Question", 1)[0]
            first_sight = context not in seen
            seen.add(context)
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
            by_sight[first_sight].append(ttfts[-1])

    begin = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - begin
    stats = router.stats()
    served = {name: row["successes"] for name, row in stats.items()}
    failed = {name: row["last_error"] for name, row in stats.items() if row["failures"]}
    predicted = {name: _round(row["prefix_hit_rate_predicted"]) for name, row in stats.items()}
    await router.aclose()
    ttfts.sort()
    total = sum(served.values()) or 1
    return {
        "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000),
        "ttft_p95_ms": round(percentile(ttfts, 95) * 1000),
        "ttft_first_sight_mean_ms": _mean_ms(by_sight[True]),
        "ttft_repeat_mean_ms": _mean_ms(by_sight[False]),
        "first_sight_requests": len(by_sight[True]),
        "requests_per_s": round(len(requests) / wall, 3),
        "wall_s": round(wall, 1),
        "cached_prompt_share": round(cached_tokens / prompt_tokens, 3) if prompt_tokens else None,
        "prompt_tokens_per_request": round(prompt_tokens / len(requests)),
        "served": served,
        "share": {name: round(n / total, 2) for name, n in served.items()},
        "hit_rate_predicted": predicted if any(v is not None for v in predicted.values()) else None,
        "failed_attempts": failed,
    }


def _mean_ms(values: list[float]) -> int | None:
    return round(statistics.fmean(values) * 1000) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@contextlib.contextmanager
def fleet(args: argparse.Namespace) -> Iterator[list[LocalServer]]:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM's /reset_prefix_cache
    fresh = start_servers(
        args.engine,
        parallel=PARALLEL,
        llama_args=["--cache-ram", str(args.cache_ram)],
        vllm_args=["--num-gpu-blocks-override", str(args.kv_blocks), "--enable-prompt-tokens-details"],
    )
    with running(fresh) as servers:
        yield servers


def tuned(requests: list[Any]) -> dict[str, Any]:
    """The hash ring's ``prefix_chars`` for this workload: past its system prompt, into the context."""
    return {"prefix_affinity": {"prefix_chars": len(requests[0][0]["content"]) + TUNED_REACH}}


def measure(servers: list[LocalServer], name: str, requests: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """One policy on the servers, their prefix caches emptied first; the hit rates its requests got."""
    policy, extra = RUNS[name]
    if name == "prefix_affinity_tuned":
        extra = tuned(requests)
    vllm = args.engine == "vllm"  # llama.cpp: fresh servers per policy, no prefix-cache counters
    for server in servers if vllm else ():
        reset_cache(server)
    before = [counters(server) if vllm else (0.0, 0.0) for server in servers]
    row = {"run": name, "policy": policy, **extra}
    row.update(
        asyncio.run(run([s.base_url for s in servers], servers[0].alias, policy, extra, requests, args.concurrency))
    )
    after = [counters(server) if vllm else (0.0, 0.0) for server in servers]
    hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    queries = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    row["hit_rate_measured"] = {
        f"server{i}": round(h / q, 3) if q else None for i, (h, q) in enumerate(zip(hits, queries, strict=True))
    }
    row["hit_rate_measured_fleet"] = round(sum(hits) / sum(queries), 3) if sum(queries) else None
    print(row, flush=True)
    return row


def warm_up(servers: list[LocalServer]) -> None:
    """The first requests after start are slow (vLLM compiles and allocates): not part of any policy's figures."""
    for server in servers:
        config = {"llm": {"routes": {"s": {"base_url": server.base_url, "model": server.alias, "timeout": 300}}}}
        with Router(config_from_dict(config, env={}), start_prober=False) as router:
            for messages in unique(2, 40):
                router.chat(messages, max_tokens=4)


def ratios(rows: list[dict[str, Any]], baselines: tuple[str, ...]) -> None:
    by_run = {row["run"]: row for row in rows}
    for row in rows:
        for base in baselines:
            if base in by_run:
                for key in ("ttft_mean_ms", "ttft_p95_ms"):
                    row[f"{key.removesuffix('_ms')}_vs_{base}"] = round(row[key] / by_run[base][key], 2)
                mine, theirs = row.get("hit_rate_measured_fleet"), by_run[base].get("hit_rate_measured_fleet")
                if mine is not None and theirs:
                    row[f"hit_rate_vs_{base}"] = round(mine / theirs, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=10, help="contexts of the rag workload")
    parser.add_argument("--shared-docs", type=int, default=8, help="contexts of rag_shared_system (longer prompts)")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--many-questions", type=int, default=16, help="questions per context of rag_many_questions")
    parser.add_argument("--facts", type=int, default=60, help="lines per context (60: about 1,200 tokens)")
    parser.add_argument("--unique", type=int, default=80, help="requests of the unique workload")
    parser.add_argument("--unique-facts", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cache-ram", type=int, default=0, help="llama.cpp's host prompt cache, MiB (0: off)")
    parser.add_argument("--kv-blocks", type=int, default=52, help="vLLM's KV cache, blocks of 128 tokens")
    parser.add_argument("--engine", choices=ENGINES, default="vllm")
    parser.add_argument("--only", nargs="*", default=None, help="workloads to run (default: all)")
    args = parser.parse_args()
    if args.engine != "vllm":
        return llamacpp(args)
    workloads = {
        "rag": (rag(args.docs, args.questions, args.facts, SHORT_SYSTEM), tuple(RUNS)),
        "rag_many_questions": (rag(args.docs, args.many_questions, args.facts, SHORT_SYSTEM), tuple(RUNS)),
        "rag_shared_system": (rag(args.shared_docs, args.questions, args.facts, LONG_SYSTEM), tuple(RUNS)),
        "unique": (unique(args.unique, args.unique_facts), UNIQUE_RUNS),
    }
    rows: list[dict[str, Any]] = []
    with fleet(args) as servers:
        warm_up(servers)
        for workload, (requests, runs) in workloads.items():
            if args.only and workload not in args.only:
                continue
            part = [{"workload": workload, **measure(servers, name, requests, args)} for name in runs]
            ratios(part, ("round_robin", "least_outstanding", "prefix_affinity", "prefix_affinity_tuned"))
            rows += part
    for row in rows:
        print({k: v for k, v in row.items() if k in ("workload", "run", "ttft_mean_ms", "ttft_p95_ms", "share")})
    written(
        args,
        rows,
        shared_system_docs=args.shared_docs,
        many_questions_per_doc=args.many_questions,
        unique_requests=args.unique,
        kv_cache_tokens=args.kv_blocks * 128,
    )


def written(args: argparse.Namespace, rows: list[dict[str, Any]], **meta: Any) -> None:
    """Save ``rows`` with the settings every engine's run shares, and ``meta``."""
    path = save(
        result_name("prefix_affinity", args.engine),
        rows,
        engine=args.engine,
        cores=cores(args.engine),
        docs=args.docs,
        questions_per_doc=args.questions,
        concurrency=args.concurrency,
        model=MODELS[args.engine],
        **meta,
    )
    print("written to", path)


LLAMACPP_RUNS = ("round_robin", "prefix_affinity", "prefix_aware")


def llamacpp(args: argparse.Namespace) -> None:
    """The rag workload on fresh llama.cpp servers per policy (its slots cannot be emptied in place)."""
    requests = rag(args.docs, args.questions, args.facts, SHORT_SYSTEM)
    rows = []
    for name in LLAMACPP_RUNS:
        with fleet(args) as servers:
            rows.append(measure(servers, name, requests, args))
    ratios(rows, ("round_robin",))
    written(args, rows, parallel_slots=PARALLEL, cache_ram_mib=args.cache_ram, kv_cache_tokens=None)


if __name__ == "__main__":
    main()

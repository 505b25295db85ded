"""Real engine: throughput and time to first token through the router over two servers, against one.

Two real vLLM servers on CPU (SmolLM2-135M-Instruct, each pinned to its own core; ``--engine
llamacpp``: two ``llama-server`` processes on Gemma 3 270M, one thread and PARALLEL slots each); the
same streamed requests go to one server alone and then through the router over both.
Run: ``.venv/bin/python benchmarks/real_engine.py [--engine vllm|llamacpp]``; ``--urls A,B --model NAME``
measures two servers already running instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from typing import Any

from _common import save
from _engines import ENGINES, MODELS, cores, result_name, start_servers
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import running
from anorag_integrations.config import config_from_dict

PARALLEL = 2
QUESTIONS = [f"Write one sentence about the number {i}." for i in range(64)]


async def run(urls: list[str], model: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    routes = {f"server{i}": {"base_url": url, "model": model, "timeout": 120} for i, url in enumerate(urls)}
    router = Router(config_from_dict({"llm": {"routes": routes}}, env={}), start_prober=False)
    semaphore = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with semaphore:
            started = time.perf_counter()
            first: float | None = None
            async for chunk in router.astream(
                [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=max_tokens, temperature=0
            ):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            latencies.append(time.perf_counter() - started)
            ttfts.append(first if first is not None else latencies[-1])
            assert call_info(chunk) is not None

    begin = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - begin
    served = {name: route.stats.snapshot()["requests"] for name, route in router.routes.items()}
    await router.aclose()
    ttfts.sort()
    return {
        "servers": len(urls),
        "requests_per_s": round(requests / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000),
        "ttft_p95_ms": round(percentile(ttfts, 95) * 1000),
        "latency_p50_ms": round(statistics.median(latencies) * 1000),
        "served": served,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=ENGINES, default="vllm")
    parser.add_argument(
        "--urls", help="two running servers' base URLs (comma-separated), measured instead of starting two"
    )
    parser.add_argument("--model", help="the model the --urls servers serve")
    args = parser.parse_args()
    given = args.urls.split(",") if args.urls else []
    if args.urls and (len(given) != 2 or not args.model):
        parser.error("--urls takes two base URLs, comma-separated, and needs --model")
    with contextlib.ExitStack() as stack:
        if given:
            urls, model = given, args.model
        else:
            servers = stack.enter_context(running(start_servers(args.engine, parallel=PARALLEL)))
            urls, model = [s.base_url for s in servers], servers[0].alias
        asyncio.run(run(urls, model, 8, args.concurrency, args.max_tokens))  # warm both servers
        rows = [asyncio.run(run(u, model, args.requests, args.concurrency, args.max_tokens)) for u in (urls[:1], urls)]
    one, two = rows
    for row in rows:
        print(row)
    ratios = {
        "throughput_two_vs_one": round(two["requests_per_s"] / one["requests_per_s"], 2),
        "ttft_p50_two_vs_one": round(two["ttft_p50_ms"] / one["ttft_p50_ms"], 2),
    }
    print(ratios)
    path = save(
        result_name("real_engine", args.engine),
        {"rows": rows, "ratios": ratios},
        engine=args.engine,
        cores="the --urls servers, as they run" if given else cores(args.engine),
        requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        parallel_slots=PARALLEL if args.engine == "llamacpp" else None,
        model=MODELS[args.engine],
    )
    print("written to", path)


if __name__ == "__main__":
    main()

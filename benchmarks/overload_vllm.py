"""Overload on real vLLM (issue 28): two vLLM servers on CPU, each pinned to a core, streamed calls arriving
faster than they can serve, ``round_robin`` without admission control against our defaults.

First the fleet's capacity is measured (streams answered per second at concurrency ``--concurrency``, closed
loop), then calls arrive open loop at ``--load`` times that for ``--duration`` s, each one stream of
MAX_TOKENS tokens, admission off and on alternating (``--rounds`` each). Measured: goodput (streams completed
per second, against capacity), p50/p95 latency of completed streams and their time to first token against the
unloaded ones (sequential streams on the idle fleet), failed calls by error, attempts per call (the routes'
own counts). The client is not pinned (the two cores are the servers'): it is an asyncio loop mostly waiting.
``--tolerance 3`` measures admission control with that ``admission.tolerance`` instead of its default (a
batching engine serves more at once when it may run slower). Run:
``.venv/bin/python benchmarks/overload_vllm.py [--duration 40] [--load 2] [--tolerance 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time
from typing import Any

from _common import save
from _engines import MODELS, cores, start_servers
from _measure import open_loop, percentile

from anorag_integrations import Router
from anorag_integrations.cli.servers import running
from anorag_integrations.config import config_from_dict

MAX_TOKENS = 32
TIMEOUT_S = 10.0
"""Per attempt: to the first chunk, then between chunks."""
ASK = [{"role": "user", "content": "Write three sentences about rivers and the sea."}]


def config(urls: list[str], model: str, admission: bool, tolerance: float | None = None) -> Any:
    routes = {f"v{i}": {"base_url": url, "model": model} for i, url in enumerate(urls)}
    llm: dict[str, Any] = {
        "routes": routes,
        "lb_policy": "round_robin",
        "params": {"timeout": TIMEOUT_S, "temperature": 0, "max_tokens": MAX_TOKENS},
        "admission": {"enabled": admission} if tolerance is None else {"enabled": admission, "tolerance": tolerance},
    }
    return config_from_dict({"llm": llm}, env={})


async def stream_once(router: Router, timings: list[tuple[float, float]] | None = None) -> None:
    """One streamed call read to its end; (latency, time to first token) appended to ``timings``."""
    started = time.perf_counter()
    first: float | None = None
    async for chunk in router.astream(ASK, stream_options={"include_usage": True}, ignore_eos=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    if timings is not None:
        timings.append((time.perf_counter() - started, first if first is not None else float("nan")))


async def unloaded(urls: list[str], model: str, calls: int) -> dict[str, float]:
    timings: list[tuple[float, float]] = []
    async with Router(config(urls, model, False)) as router:
        for _ in range(3):
            await stream_once(router)  # warm both servers
        for _ in range(calls):
            await stream_once(router, timings)
    latencies, ttfts = sorted(t for t, _ in timings), sorted(f for _, f in timings)
    return {
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
    }


async def capacity(urls: list[str], model: str, concurrency: int, seconds: float) -> float:
    """Streams completed per second at ``concurrency`` (closed loop, no admission control)."""
    done = 0
    async with Router(config(urls, model, False)) as router:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stream_once(router)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def overload(
    urls: list[str], model: str, admission: bool, rate: float, seconds: float, tolerance: float | None
) -> dict[str, Any]:
    timings: dict[int, tuple[float, float]] = {}
    async with Router(config(urls, model, admission, tolerance)) as router:
        count = iter(range(10**9))

        async def call(tag: str) -> None:
            mine: list[tuple[float, float]] = []
            await stream_once(router, mine)
            timings[next(count)] = mine[0]

        run = await open_loop(call, rate, seconds)
        stats = router.stats()
    outcomes = run["outcomes"]
    attempts = sum(row["requests"] for row in stats.values())
    return {"run": run, "timings": list(timings.values()), "attempts": attempts, "offered": len(outcomes)}


def summary(name: str, result: dict[str, Any], cap: float, base: dict[str, float]) -> dict[str, Any]:
    run, timings = result["run"], result["timings"]
    outcomes = run["outcomes"]
    failed = [o for o in outcomes if not o[1]]
    latencies = sorted(t for t, _ in timings)
    ttfts = sorted(f for _, f in timings if f == f)
    goodput = len(latencies) / run["wall_s"]
    return {
        "client": name,
        "offered": result["offered"],
        "completed": len(latencies),
        "goodput_per_s": round(goodput, 3),
        "goodput_vs_capacity": round(goodput / cap, 3),
        "attempts_per_call": round(result["attempts"] / result["offered"], 2),
        "failed": len(failed),
        "errors": dict(collections.Counter(o[3] for o in failed).most_common()),
        "p50_vs_unloaded": round(percentile(latencies, 50) / base["p50_s"], 2) if latencies else None,
        "p95_vs_unloaded": round(percentile(latencies, 95) / base["p95_s"], 2) if latencies else None,
        "ttft_p95_vs_unloaded": round(percentile(ttfts, 95) / base["ttft_p95_s"], 2) if ttfts else None,
        "client_late_s": round(run["late_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    parser.add_argument("--load", type=float, default=2.0, help="arrivals as a multiple of the measured capacity")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop streams measuring capacity")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, alternating")
    parser.add_argument("--tolerance", type=float, help="admission.tolerance of the variant with admission control")
    args = parser.parse_args()
    ours = "round_robin, defaults" if args.tolerance is None else f"round_robin, tolerance {args.tolerance:g}"
    rows: dict[str, list[dict[str, Any]]] = {"round_robin, admission off": [], ours: []}
    with running(start_servers("vllm")) as servers:
        urls, model = [s.base_url for s in servers], servers[0].alias
        base = asyncio.run(unloaded(urls, model, 10))
        cap = asyncio.run(capacity(urls, model, args.concurrency, 20.0))
        print(f"unloaded p50 {base['p50_s']:.2f} s, ttft p95 {base['ttft_p95_s']:.3f} s; capacity {cap:.2f}/s")
        for _ in range(args.rounds):
            for name, admission in (("round_robin, admission off", False), (ours, True)):
                result = asyncio.run(overload(urls, model, admission, args.load * cap, args.duration, args.tolerance))
                rows[name].append(summary(name, result, cap, base))
                print(rows[name][-1], flush=True)
    merged = [
        {
            "client": name,
            "runs": runs,
            "goodput_vs_capacity": round(statistics.median(r["goodput_vs_capacity"] for r in runs), 3),
            "p95_vs_unloaded": round(statistics.median(r["p95_vs_unloaded"] or 0 for r in runs), 2),
        }
        for name, runs in rows.items()
    ]
    off, on = merged
    ratios = {
        "goodput_on_over_off": round(on["goodput_vs_capacity"] / off["goodput_vs_capacity"], 2),
        "p95_on_over_off": round(on["p95_vs_unloaded"] / off["p95_vs_unloaded"], 2) if off["p95_vs_unloaded"] else None,
    }
    print(ratios)
    path = save(
        "overload_vllm" if args.tolerance is None else f"overload_vllm_tolerance{args.tolerance:g}",
        {"unloaded": base, "capacity_per_s": round(cap, 3), "rows": merged, **ratios},
        cores("vllm"),
        model=MODELS["vllm"],
        load=args.load,
        duration_s=args.duration,
        max_tokens=MAX_TOKENS,
        timeout_s=TIMEOUT_S,
        capacity_concurrency=args.concurrency,
        tolerance=args.tolerance,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

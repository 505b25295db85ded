"""Hedged requests: tail latency with one server that stalls now and then, hedging off vs on.

Three servers answer in SERVICE_S; server 0 also stalls STALL_S on every STALL_EVERY-th request it
gets (a GC pause, a preempted sequence). REQUESTS non-streaming requests at concurrency 8 through a
round-robin router, once without hedging and once with ``hedge: {after: p95}`` (max_rate 5 %).
Target: p99 well below the unhedged p99, with at most 5 % extra requests.
Run: ``.venv/bin/python benchmarks/hedging.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import MODEL, fault_server, save
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.config import config_from_dict

SERVICE_S = 0.02
STALL_S = 1.0
STALL_EVERY = 20
SETTINGS: dict[str, dict[str, Any] | None] = {"no hedging": None, "hedge after p95": {"after": "p95"}}
ASK = [{"role": "user", "content": "hi"}]


async def run(urls: list[str], name: str, requests: int, concurrency: int) -> dict[str, Any]:
    routes = {f"s{i}": {"base_url": url, "model": MODEL} for i, url in enumerate(urls)}
    llm: dict[str, Any] = {"routes": routes}
    if SETTINGS[name] is not None:
        llm["hedge"] = SETTINGS[name]
    router = Router(config_from_dict({"llm": llm}, env={}), start_prober=False)
    latencies: list[float] = []
    hedged = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, hedged
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await router.achat(ASK, max_tokens=4)
            latencies.append((time.perf_counter() - started) * 1000)
            hedged += call_info(response).hedge is not None  # type: ignore[union-attr]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await router.aclose()
    ordered = sorted(latencies)
    return {
        "setting": name,
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(percentile(ordered, 99), 1),
        "max_ms": round(ordered[-1], 1),
        "extra_requests": round(hedged / requests, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    stall = ("--fault", "delay", "--every", str(STALL_EVERY), "--option", f"delay={STALL_S}")
    with fault_server(SERVICE_S, *stall) as s0, fault_server(SERVICE_S) as s1, fault_server(SERVICE_S) as s2:
        urls = [s0.url, s1.url, s2.url]
        rows = [asyncio.run(run(urls, name, args.requests, args.concurrency)) for name in SETTINGS]
    for row in rows:
        row["p99_vs_no_hedging"] = round(row["p99_ms"] / rows[0]["p99_ms"], 2)
        print(row)
    path = save(
        "hedging",
        rows,
        requests=args.requests,
        concurrency=args.concurrency,
        service_s=SERVICE_S,
        stall_s=STALL_S,
        stall_every=STALL_EVERY,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

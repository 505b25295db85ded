"""Balancing quality: two servers, one four times slower; mean and p95 latency per policy.

500 requests at concurrency 16 through a fresh router per policy; the fast server answers after
FAST_S, the slow one after 4 x FAST_S. Target: the best adaptive policy's p95 <= 0.6 x round_robin's,
and the slow route still gets some requests (it is re-measured, not abandoned).
Run: ``.venv/bin/python benchmarks/balancing.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import MODEL, fault_server, save
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.config import config_from_dict

FAST_S = 0.02
POLICIES = ("round_robin", "least_outstanding", "least_latency")


async def run(fast: str, slow: str, policy: str, requests: int, concurrency: int) -> dict[str, object]:
    routes = {"fast": {"base_url": fast, "model": MODEL}, "slow": {"base_url": slow, "model": MODEL}}
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    served: list[str] = []

    async def one() -> None:
        async with semaphore:
            started = time.perf_counter()
            response = await router.achat([{"role": "user", "content": "hi"}], max_tokens=4)
            latencies.append((time.perf_counter() - started) * 1000)
            served.append(call_info(response).route or "?")  # type: ignore[union-attr]

    await asyncio.gather(*(one() for _ in range(requests)))
    await router.aclose()
    ordered = sorted(latencies)
    return {
        "policy": policy,
        "mean_ms": round(statistics.fmean(ordered), 1),
        "p95_ms": round(percentile(ordered, 95), 1),
        "slow_share": round(served.count("slow") / len(served), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with fault_server(FAST_S) as fast, fault_server(4 * FAST_S) as slow:
        rows = [asyncio.run(run(fast.url, slow.url, p, args.requests, args.concurrency)) for p in POLICIES]
    baseline = next(r for r in rows if r["policy"] == "round_robin")["p95_ms"]
    for row in rows:
        row["p95_vs_round_robin"] = round(row["p95_ms"] / baseline, 2)  # type: ignore[operator]
        print(f"{row['policy']:18} mean {row['mean_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms "
              f"({row['p95_vs_round_robin']}x round_robin)  slow route share {row['slow_share']:.1%}")  # fmt: skip
    path = save(
        "balancing", rows, requests=args.requests, concurrency=args.concurrency, fast_s=FAST_S, slow_s=4 * FAST_S
    )
    print("written to", path)


if __name__ == "__main__":
    main()

"""Membership changes under load: a route removed and another added every second, against a static fleet.

Four vLLM-shaped servers (own processes). Calls run at concurrency 32 through ``Router.achat`` over routes a, b
and c. Phases alternate, each ``--phase`` seconds, ``--rounds`` times: *static* (no change) and *churn* (every
``--period`` seconds a thread removes c and adds d, or the reverse: two changes per swap). Counted per phase:
calls, failed calls (lost), the router process's CPU time per call and the median latency; at the end, whether
every removed route was released. Ratios: churn over static, measured in the same run.
Run: ``.venv/bin/python benchmarks/membership.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

from _common import MODEL, fault_server, pin_client, save

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict

ASK = [{"role": "user", "content": "hello"}]


def route(url: str) -> dict[str, Any]:
    return {"base_url": url, "model": MODEL, "timeout": 10}


async def phase(
    router: Router, seconds: float, concurrency: int, churn: dict[str, str] | None = None, period: float = 1.0
) -> dict[str, Any]:
    """One phase of calls; with ``churn`` (name -> url of the two swapped routes) a thread swaps them meanwhile."""
    latencies: list[float] = []
    failed = 0
    stop_at = time.monotonic() + seconds
    changes: list[int] = [0]
    drains: list[Any] = []
    done = threading.Event()

    def swap() -> None:
        assert churn is not None
        while not done.wait(period):
            present = next(name for name in churn if name in router.routes)
            other = next(name for name in churn if name != present)
            router.add_route(other, route(churn[other]))
            drains.append(router.remove_route(present))
            changes[0] += 2

    async def worker() -> None:
        nonlocal failed
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                await router.achat(ASK)
            except Exception:  # counted: the benchmark's point is that none is lost
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=swap) if churn is not None else None
    cpu0 = time.process_time()
    if thread is not None:
        thread.start()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - cpu0
    done.set()
    if thread is not None:
        thread.join()
    calls = len(latencies) + failed
    return {
        "calls": calls,
        "lost": failed,
        "changes": changes[0],
        "cpu_us_per_call": cpu / max(calls, 1) * 1e6,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "released": all(await asyncio.gather(*(d.async_wait(30) for d in drains))),
    }


async def main_async(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    routes = {name: route(url) for name, url in zip("abc", urls, strict=False)}
    config = config_from_dict({"llm": {"routes": routes, "params": {"max_retries": 2}}}, env={})
    churn = {"c": urls[2], "d": urls[3]}
    totals: dict[str, list[dict[str, Any]]] = {"static": [], "churn": []}
    async with Router(config, start_prober=False) as router:
        await phase(router, min(args.phase, 2.0), args.concurrency, None)  # warm-up: connections, first calls
        for _ in range(args.rounds):
            totals["static"].append(await phase(router, args.phase, args.concurrency, None))
            totals["churn"].append(await phase(router, args.phase, args.concurrency, churn, args.period))
        owned_ok = router.owned == set(router.routes.values()) and not router.draining
    summary: dict[str, Any] = {"phases": totals, "all_released": owned_ok}
    for kind, rows in totals.items():
        calls = sum(r["calls"] for r in rows)
        summary[kind] = {
            "calls": calls,
            "lost": sum(r["lost"] for r in rows),
            "changes": sum(r["changes"] for r in rows),
            "cpu_us_per_call": round(sum(r["cpu_us_per_call"] * r["calls"] for r in rows) / max(calls, 1), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rows if r["p50_ms"] is not None), 2),
            "released": all(r["released"] for r in rows),
        }
    summary["cpu_per_call_churn_over_static"] = round(
        summary["churn"]["cpu_us_per_call"] / summary["static"]["cpu_us_per_call"], 3
    )
    summary["p50_churn_over_static"] = round(summary["churn"]["p50_ms"] / summary["static"]["p50_ms"], 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="static + churn phase pairs")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between swaps while churning")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds each server takes per answer")
    args = parser.parse_args()
    cores = pin_client()
    with (
        fault_server(args.delay) as a,
        fault_server(args.delay) as b,
        fault_server(args.delay) as c,
        fault_server(args.delay) as d,
    ):
        summary = asyncio.run(main_async([a.url, b.url, c.url, d.url], args))
    print({k: v for k, v in summary.items() if k != "phases"})
    path = save("membership", summary, cores, phase_s=args.phase, rounds=args.rounds, period_s=args.period,
                concurrency=args.concurrency, delay_s=args.delay)  # fmt: skip
    print("written to", path)


if __name__ == "__main__":
    main()

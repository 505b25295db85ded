"""Queue-aware balancing: two servers, one kept full by another client the router cannot see.

Both servers serve SLOTS requests at once with SERVICE_S each (more wait in a queue, as vLLM's
``--max-num-seqs``); a second client keeps EXTERNAL requests in flight on server A the whole time,
as another application sharing the fleet would. The router sends its requests at concurrency 4.
Only A's ``/metrics`` (running, waiting) shows that load. Target: least_queue's p95 latency below
round_robin's and least_outstanding's. Run: ``.venv/bin/python benchmarks/least_queue.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import openai
from _common import MODEL, fault_server, save
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.config import config_from_dict

SERVICE_S = 0.05
SLOTS = 4
EXTERNAL = 6
POLICIES = ("round_robin", "least_outstanding", "least_queue")
ASK = [{"role": "user", "content": "hi"}]


async def external_load(url: str, stop: asyncio.Event) -> None:
    """Another client's traffic on one server: EXTERNAL requests in flight until ``stop``."""
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)

    async def worker() -> None:
        while not stop.is_set():
            await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)  # type: ignore[arg-type]

    try:
        await asyncio.gather(*(worker() for _ in range(EXTERNAL)))
    finally:
        await client.close()


async def run(busy: str, free: str, policy: str, requests: int, concurrency: int) -> dict[str, object]:
    routes = {"busy": {"base_url": busy, "model": MODEL}, "free": {"base_url": free, "model": MODEL}}
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    await router.astart_prober()  # least_queue's /metrics scraper (every 1 s, the default)
    stop = asyncio.Event()
    load = asyncio.ensure_future(external_load(busy, stop))
    await asyncio.sleep(1.5)  # the other client's queue builds up; the scraper takes a first reading
    latencies: list[float] = []
    served: list[str] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await router.achat(ASK, max_tokens=4)
            latencies.append((time.perf_counter() - started) * 1000)
            served.append(call_info(response).route or "?")  # type: ignore[union-attr]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stop.set()
    with contextlib.suppress(openai.APIError):
        await load
    await router.aclose()
    ordered = sorted(latencies)
    return {
        "policy": policy,
        "mean_ms": round(statistics.fmean(ordered), 1),
        "p95_ms": round(percentile(ordered, 95), 1),
        "busy_share": round(served.count("busy") / len(served), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    slots = ("--max-running", str(SLOTS))
    with fault_server(SERVICE_S, *slots) as busy, fault_server(SERVICE_S, *slots) as free:
        rows = [asyncio.run(run(busy.url, free.url, p, args.requests, args.concurrency)) for p in POLICIES]
    by_policy = {row["policy"]: row for row in rows}
    for row in rows:
        row["p95_vs_round_robin"] = round(row["p95_ms"] / by_policy["round_robin"]["p95_ms"], 2)  # type: ignore[operator]
        row["p95_vs_least_outstanding"] = round(row["p95_ms"] / by_policy["least_outstanding"]["p95_ms"], 2)  # type: ignore[operator]
        print(row)
    path = save(
        "least_queue",
        rows,
        requests=args.requests,
        concurrency=args.concurrency,
        service_s=SERVICE_S,
        slots=SLOTS,
        external_in_flight=EXTERNAL,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

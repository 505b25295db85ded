"""Queue-aware balancing: two servers, one kept full by another client the router cannot see.

A second client keeps EXTERNAL requests in flight on server A the whole time, as another application
sharing the fleet would; the router sends its requests at concurrency 4. Only A's ``/metrics``
(running, waiting) shows that load. The servers are two real vLLM servers on CPU, one core each
(``--engine vllm``, the default), or two emulated ones (``--engine fault``: SLOTS requests at once
with SERVICE_S each, more wait in a queue, as vLLM's ``--max-num-seqs``; exact and quick).
Target: least_queue's p95 latency below round_robin's and least_outstanding's.
Run: ``.venv/bin/python benchmarks/least_queue.py [--engine vllm|fault]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import openai
from _common import MODEL, fault_server, save
from _engines import MODELS, cores, start_servers
from _measure import percentile

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import running
from anorag_integrations.config import config_from_dict

SERVICE_S = 0.05
SLOTS = 4
EXTERNAL = 6
POLICIES = ("round_robin", "least_outstanding", "least_queue")
ASK = [{"role": "user", "content": "Write one sentence about rivers."}]
TOKENS = {"fault": (4, 4), "vllm": (16, 64)}
"""Tokens per answer: (the router's requests, the other client's)."""


async def external_load(url: str, stop: asyncio.Event, model: str, max_tokens: int) -> None:
    """Another client's traffic on one server: EXTERNAL requests in flight until ``stop``."""
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)

    async def worker() -> None:
        while not stop.is_set():
            await client.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens)  # type: ignore[arg-type]

    try:
        await asyncio.gather(*(worker() for _ in range(EXTERNAL)))
    finally:
        await client.close()


async def run(
    busy: str, free: str, policy: str, requests: int, concurrency: int, model: str, engine: str
) -> dict[str, object]:
    ours, theirs = TOKENS[engine]
    routes = {"busy": {"base_url": busy, "model": model}, "free": {"base_url": free, "model": model}}
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    await router.astart_prober()  # least_queue's /metrics scraper (every 1 s, the default)
    stop = asyncio.Event()
    load = asyncio.ensure_future(external_load(busy, stop, model, theirs))
    await asyncio.sleep(1.5)  # the other client's queue builds up; the scraper takes a first reading
    latencies: list[float] = []
    served: list[str] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await router.achat(ASK, max_tokens=ours, temperature=0)
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


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every policy over the same two servers: emulated, or real vLLM started here."""
    if args.engine == "fault":
        slots = ("--max-running", str(SLOTS))
        with fault_server(SERVICE_S, *slots) as busy, fault_server(SERVICE_S, *slots) as free:
            return [
                asyncio.run(run(busy.url, free.url, p, args.requests, args.concurrency, MODEL, "fault"))
                for p in POLICIES
            ]
    with running(start_servers("vllm")) as (busy_server, free_server):
        urls, model = (busy_server.base_url, free_server.base_url), busy_server.alias
        asyncio.run(run(*urls, "round_robin", 8, args.concurrency, model, "vllm"))  # warm both servers
        return [asyncio.run(run(*urls, p, args.requests, args.concurrency, model, "vllm")) for p in POLICIES]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--engine", choices=("vllm", "fault"), default="vllm")
    args = parser.parse_args()
    rows = measure(args)
    by_policy = {row["policy"]: row for row in rows}
    for row in rows:
        row["p95_vs_round_robin"] = round(row["p95_ms"] / by_policy["round_robin"]["p95_ms"], 2)  # type: ignore[operator]
        row["p95_vs_least_outstanding"] = round(row["p95_ms"] / by_policy["least_outstanding"]["p95_ms"], 2)  # type: ignore[operator]
        print(row)
    fault = args.engine == "fault"
    path = save(
        "least_queue" if args.engine == "vllm" else "least_queue_fault",
        rows,
        engine=args.engine,
        cores=None if fault else cores("vllm"),
        model=None if fault else MODELS["vllm"],
        requests=args.requests,
        concurrency=args.concurrency,
        service_s=SERVICE_S if fault else None,
        slots=SLOTS if fault else None,
        external_in_flight=EXTERNAL,
        max_tokens_ours_theirs=TOKENS[args.engine],
    )
    print("written to", path)


if __name__ == "__main__":
    main()

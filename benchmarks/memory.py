"""Memory: resident set size after 50,000 requests minus after 1,000, per client (target < 10 MB).

A growing RSS here would mean per-request state that is never freed (stats, call records, clients).
One vLLM-shaped server in its own process; requests at concurrency 64. Linux only (reads /proc).
Run: ``.venv/bin/python benchmarks/memory.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os

from _common import MODEL, fault_server, pin_client, save
from _measure import PROMPT, Call, drain, throughput

MESSAGES = [{"role": "user", "content": PROMPT}]
TARGET_MB = 10


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def clients(url: str) -> dict[str, Call]:
    from anorag_integrations import Router
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.langchain import ChatVLLMRouted

    router = Router(config_from_dict({"llm": {"routes": {"only": {"base_url": url, "model": MODEL}}}}, env={}))
    routed = ChatVLLMRouted(router=router)

    return {
        "Router.achat": lambda: router.achat(MESSAGES),
        "Router.astream": lambda: drain(router.astream(MESSAGES)),
        "ChatVLLMRouted.ainvoke": lambda: routed.ainvoke(PROMPT),
    }


async def growth(call: Call, first: int, total: int, concurrency: int) -> dict[str, float]:
    await throughput(call, first, concurrency)
    gc.collect()
    after_first = rss_mb()
    result = await throughput(call, total - first, concurrency)
    gc.collect()
    after_total = rss_mb()
    return {
        "rss_after_first_mb": round(after_first, 1),
        "rss_after_total_mb": round(after_total, 1),
        "growth_mb": round(after_total - after_first, 2),
        "failures": result["failures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--first", type=int, default=1_000)
    parser.add_argument("--total", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    cores = pin_client()
    rows = []
    with fault_server() as server:

        async def run() -> None:
            for name, call in clients(server.url).items():
                row = {"client": name, **await growth(call, args.first, args.total, args.concurrency)}
                row["met"] = row["growth_mb"] < TARGET_MB
                rows.append(row)
                print(row, flush=True)

        asyncio.run(run())
    path = save(
        "memory",
        rows,
        cores=cores,
        first=args.first,
        total=args.total,
        concurrency=args.concurrency,
        target_mb=TARGET_MB,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

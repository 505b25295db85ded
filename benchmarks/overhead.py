"""Client overhead: requests per client CPU-second through each client, same server, same run.

The server (a vLLM-shaped FaultServer, 8-token answers) runs in its own process; clients are
interleaved (A B C D, repeated) and the median of the rounds is reported, with ratios against
``ChatOpenAI(base_url=...).ainvoke``. Run: ``.venv/bin/python benchmarks/overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "hello"}]


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "anorag_integrations.testing", "--model", MODEL],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[1]


def clients(base_url: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    import openai
    from langchain_openai import ChatOpenAI

    from anorag_integrations import Router
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.langchain import ChatVLLMRouted

    raw = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
    config = config_from_dict({"llm": {"routes": {"only": {"base_url": base_url, "model": MODEL}}}}, env={})
    router = Router(config)
    routed = ChatVLLMRouted(router=router)
    chat_openai = ChatOpenAI(base_url=base_url, api_key="EMPTY", model=MODEL, max_retries=0)
    return {
        "raw AsyncOpenAI": lambda: raw.chat.completions.create(model=MODEL, messages=MESSAGES),  # type: ignore[arg-type]
        "Router.achat": lambda: router.achat(MESSAGES),
        "ChatVLLMRouted.ainvoke": lambda: routed.ainvoke("hello"),
        "ChatOpenAI.ainvoke": lambda: chat_openai.ainvoke("hello"),
    }


async def measure(call: Callable[[], Awaitable[Any]], requests: int, concurrency: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(concurrency)
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with semaphore:
            try:
                await call()
            except Exception:
                failures += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(requests)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rps": requests / wall, "per_cpu_s": requests / cpu, "failures": failures}


async def run(base_url: str, requests: int, concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    named = clients(base_url)
    for call in named.values():  # warm up connections and imports
        await measure(call, 50, concurrency)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, call in named.items():
            samples[name].append(await measure(call, requests, concurrency))
    return {
        name: {
            "rps": statistics.median(s["rps"] for s in runs),
            "per_cpu_s": statistics.median(s["per_cpu_s"] for s in runs),
            "failures": sum(s["failures"] for s in runs),
        }
        for name, runs in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = parser.parse_args()
    proc, base_url = start_server()
    try:
        results = asyncio.run(run(base_url, args.requests, args.concurrency, args.rounds))
    finally:
        proc.terminate()
        proc.wait(10)
    peer = results["ChatOpenAI.ainvoke"]["per_cpu_s"]
    print(f"{'client':26} {'req/s':>8} {'req/CPU-s':>10} {'vs ChatOpenAI':>14} {'failed':>7}")
    for name, row in results.items():
        row["ratio_vs_chat_openai"] = row["per_cpu_s"] / peer
        ratio = row["ratio_vs_chat_openai"]
        print(f"{name:26} {row['rps']:8.0f} {row['per_cpu_s']:10.0f} {ratio:13.2f}x {row['failures']:7.0f}")
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared by client and server (own process)",
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("openai", "langchain-core", "langchain-openai", "anorag-integrations")},
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{json.dumps(meta)}\nwritten to {args.out}")


if __name__ == "__main__":
    main()

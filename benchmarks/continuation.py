"""Stream continuation: streams cut mid-answer on one of three servers, continue_streams off vs on.

Server 0 closes the connection after CUT_AFTER chunks on every CUT_EVERY-th stream it serves (a
crashed worker, a proxy timeout). REQUESTS streams at concurrency 8 through a round-robin router.
Without continuation those streams end in ``StreamInterruptedError`` (no peer does better: a cut
after the first token reaches neither ``with_fallbacks`` nor LiteLLM's fallbacks); with
``continue_streams: true`` they resume on another server. Counted: streams whose text is exactly the
full answer, streams that failed, and any with repeated or missing text.
Run: ``.venv/bin/python benchmarks/continuation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import MODEL, fault_server, save
from _measure import percentile

from anorag_integrations import Router, StreamInterruptedError, call_info
from anorag_integrations.config import config_from_dict

CUT_EVERY = 4
CUT_AFTER = 3
REPLY = "one two three four five six seven eight"
ASK = [{"role": "user", "content": "count"}]


async def run(urls: list[str], continue_streams: bool, requests: int, concurrency: int) -> dict[str, Any]:
    routes = {
        f"s{i}": {"base_url": url, "model": MODEL, "continue_streams": continue_streams} for i, url in enumerate(urls)
    }
    router = Router(config_from_dict({"llm": {"routes": routes}}, env={}), start_prober=False)
    complete = failed = garbled = continued = 0
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, complete, failed, garbled, continued
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            text: list[str] = []
            try:
                async for chunk in router.astream(ASK):
                    text.extend(choice.delta.content or "" for choice in chunk.choices)
            except StreamInterruptedError as exc:
                failed += 1
                garbled += "".join(text) != exc.delivered_text
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            complete += "".join(text) == REPLY
            garbled += "".join(text) != REPLY
            continued += call_info(chunk).continued  # type: ignore[union-attr]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await router.aclose()
    ordered = sorted(latencies)
    return {
        "continue_streams": continue_streams,
        "complete": complete,
        "failed": failed,
        "garbled": garbled,
        "continued": continued,
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(percentile(ordered, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    cut = ("--reply", REPLY, "--fault", "cut", "--every", str(CUT_EVERY), "--option", f"after_chunks={CUT_AFTER}")
    plain = ("--reply", REPLY)
    with fault_server(0.0, *cut) as s0, fault_server(0.0, *plain) as s1, fault_server(0.0, *plain) as s2:
        urls = [s0.url, s1.url, s2.url]
        rows = [asyncio.run(run(urls, on, args.requests, args.concurrency)) for on in (False, True)]
    for row in rows:
        row["complete_share"] = round(row["complete"] / args.requests, 3)
        print(row)
    path = save(
        "continuation",
        rows,
        requests=args.requests,
        concurrency=args.concurrency,
        cut_every=CUT_EVERY,
        cut_after_chunks=CUT_AFTER,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

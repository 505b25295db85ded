"""Soak: many requests at high concurrency over three routes, one flapping through the fault corpus.

Routes ``a`` and ``b`` stay healthy; ``c`` changes fault every few tens of milliseconds, through the
corpus's transient faults (``anorag_integrations.testing.corpus``: HTTP errors, hangs, refused
connections, cuts, error events, every malformed answer, trickles, stalls) and a broken ``/v1/models``.
Async calls (``achat``/``astream``) and sync threads (``chat``/``stream``) run at once. Pass means: no
request lost, every in-flight count back to zero, open files and threads back to where they were
before it started, and memory growth small. The healthy servers run in their own
processes (a healthy route must be able to keep up); the flapping one runs in this process, where
its faults are switched. Run: ``.venv/bin/python benchmarks/soak.py`` (10,000 requests at 256).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import sys
import threading
import time
from collections import Counter

from _common import MODEL, fault_server, pin_client, save
from memory import rss_mb

from anorag_integrations import Router, RouterError
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import MODELS_FAULT_CORPUS, TRANSIENT_FAULTS, FaultServer

MESSAGES = [{"role": "user", "content": "hello"}]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def build(urls: dict[str, str]) -> Router:
    # One core runs 256 async calls, 8 sync threads and route c's server: answers can wait seconds for
    # the client itself (seen: about 0.2% of attempts over 5 s with every route healthy). The healthy
    # routes get room for that; the flapping one gets a short bound, so its hangs cost little.
    routes = {
        name: {"base_url": url, "model": MODEL, "timeout": 2.0 if name == "c" else 30.0, "continue_streams": True}
        for name, url in urls.items()
    }
    llm = {
        "routes": routes,
        "health": {"failure_threshold": 2, "cooldown": 0.2, "probe_interval": 0.1},
        "params": {"max_retries": 3, "max_retry_after": 0.5},
    }
    return Router(config_from_dict({"llm": llm}, env={}))


def flap(server: FaultServer, stop: threading.Event, period: float) -> int:
    """Cycle ``server`` through the corpus until ``stop``; how many faults it went through.

    Only transient faults: a permanent one (a 400) is raised to the caller, and this run loses no request.
    """
    changes = 0
    faults = zip(itertools.cycle(TRANSIENT_FAULTS), itertools.cycle(MODELS_FAULT_CORPUS), strict=False)
    for case, models in faults:
        if stop.wait(period):
            break
        case.apply(server)
        server.models_fault = models
        changes += 1
    server.set_fault(None)
    server.models_fault = None
    return changes


def run(router: Router, total: int, concurrency: int, sync_threads: int) -> Counter[str]:
    """``total`` requests, async at ``concurrency`` plus sync threads; outcome counts."""
    outcomes: Counter[str] = Counter()
    numbers = itertools.count()
    lock = threading.Lock()

    def take() -> int | None:
        with lock:
            n = next(numbers)
        return n if n < total else None

    def record(outcome: str) -> None:
        with lock:
            outcomes[outcome] += 1

    def sync_worker() -> None:
        while (n := take()) is not None:
            try:
                if n % 2:
                    text = router.chat(MESSAGES).choices[0].message.content or ""
                else:
                    text = "".join(c.choices[0].delta.content or "" for c in router.stream(MESSAGES) if c.choices)
                record("ok" if text.startswith("from") else f"garbled:{text[:20]}")
            except RouterError as exc:
                record(f"lost:{type(exc).__name__}")

    async def async_worker() -> None:
        while (n := take()) is not None:
            try:
                if n % 2:
                    text = (await router.achat(MESSAGES)).choices[0].message.content or ""
                else:
                    parts = [c.choices[0].delta.content or "" async for c in router.astream(MESSAGES) if c.choices]
                    text = "".join(parts)
                record("ok" if text.startswith("from") else f"garbled:{text[:20]}")
            except RouterError as exc:
                record(f"lost:{type(exc).__name__}")

    async def main() -> None:
        await asyncio.gather(*(async_worker() for _ in range(concurrency)))

    threads = [threading.Thread(target=sync_worker) for _ in range(sync_threads)]
    for thread in threads:
        thread.start()
    asyncio.run(main())
    for thread in threads:
        thread.join()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--sync-threads", type=int, default=8, help="threads making sync calls beside the async ones")
    parser.add_argument("--period", type=float, default=0.03, help="seconds between two faults of route c")
    args = parser.parse_args()
    cores = pin_client()
    with (
        fault_server(0.0, "--reply", "from a") as a,
        fault_server(0.0, "--reply", "from b") as b,
        FaultServer(MODEL, reply="from c") as c,
    ):
        baseline = {"fds": open_fds(), "threads": threading.active_count()}  # servers up, no router yet
        router = build({"a": a.url, "b": b.url, "c": c.base_url})
        run(router, args.warmup, args.concurrency, args.sync_threads)
        gc.collect()
        rss_before = rss_mb()
        stop = threading.Event()
        changes: list[int] = []
        flapper = threading.Thread(target=lambda: changes.append(flap(c, stop, args.period)))
        flapper.start()
        started = time.perf_counter()
        outcomes = run(router, args.requests, args.concurrency, args.sync_threads)
        elapsed = time.perf_counter() - started
        stop.set()
        flapper.join()
        in_flight = {name: route.stats.in_flight for name, route in router.routes.items()}
        served = {name: route.stats.successes for name, route in router.routes.items()}
        failures = {name: route.stats.failures for name, route in router.routes.items()}
        last_errors = {name: route.stats.last_error for name, route in router.routes.items()}
        gc.collect()
        rss_after = rss_mb()
        router.close()
        gc.collect()
        after = {"fds": open_fds(), "threads": threading.active_count()}
    lost = sum(count for outcome, count in outcomes.items() if outcome != "ok")
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "sync_threads": args.sync_threads,
        "seconds": round(elapsed, 1),
        "outcomes": dict(outcomes),
        "lost": lost,
        "fault_changes_on_c": changes[0] if changes else 0,
        "served": served,
        "failed_attempts": failures,
        "last_errors": last_errors,
        "in_flight_at_end": in_flight,
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "before_router": baseline,
        "after_router_closed": after,
    }
    # Closing the router and its servers releases their threads and sockets: anything left is a leak.
    # (The process-wide watchdog thread, started on the first sync call, is the one thread allowed to stay.)
    leaked = after["fds"] > baseline["fds"] or after["threads"] > baseline["threads"] + 1
    result["passed"] = lost == 0 and not any(in_flight.values()) and not leaked
    print(result, flush=True)
    print("written to", save("soak", result, cores=cores, requests=args.requests, concurrency=args.concurrency))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

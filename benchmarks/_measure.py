"""Measurement loops every benchmark process shares, ours and the peers' (standard library only).

The peers' process (``_peers.py``) runs in its own virtualenv, so this module imports nothing
outside the standard library.
"""

from __future__ import annotations

import asyncio
import inspect
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL = "fake-model"
PROMPT = "hello"

Call = Callable[[], Awaitable[Any]]


async def drain(chunks: AsyncIterator[Any] | Awaitable[AsyncIterator[Any]]) -> None:
    """Read a stream to its end (awaiting it first where a client returns it from a coroutine)."""
    if inspect.isawaitable(chunks):
        chunks = await chunks
    async for _ in chunks:
        pass


async def throughput(call: Call, requests: int, concurrency: int) -> dict[str, float]:
    """Run ``requests`` calls, ``concurrency`` at a time: wall req/s and req per client CPU-second.

    ``concurrency`` workers take requests until none are left (no task per request is created up
    front: 50,000 waiting tasks would cost the client CPU time and leave their memory in the RSS).
    """
    remaining = requests
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            try:
                await call()
            except Exception:
                failures += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rps": requests / wall, "per_cpu_s": requests / max(cpu, 1e-9), "failures": failures}


def median_of(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median rps and req/CPU-s over interleaved rounds; failures summed."""
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "per_cpu_s": statistics.median(r["per_cpu_s"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
    }


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Scenario:
    """A failover run: which routes fail at which fraction of the requests, and what each client saw.

    ``faults`` maps a fraction of started requests to an action (kill or hang one server) and the
    URL it takes down. Clients report every failed attempt on a route with :meth:`attempt_failed`.
    """

    faults: list[tuple[float, str, Callable[[], None]]]
    failed_attempts: list[tuple[float, str]] = field(default_factory=list)
    fault_times: dict[str, float] = field(default_factory=dict)

    def attempt_failed(self, url: str) -> None:
        self.failed_attempts.append((time.monotonic(), url))

    async def run(self, call: Call, requests: int, concurrency: int) -> dict[str, Any]:
        semaphore = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: list[str] = []
        pending = sorted(self.faults)
        started = 0

        async def one() -> None:
            nonlocal started
            async with semaphore:
                started += 1
                while pending and started > pending[0][0] * requests:
                    _, url, action = pending.pop(0)
                    action()
                    self.fault_times[url] = time.monotonic()
                begin = time.perf_counter()
                try:
                    await call()
                    latencies.append((time.perf_counter() - begin) * 1000)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

        begin = time.monotonic()
        await asyncio.gather(*(one() for _ in range(requests)))
        duration = time.monotonic() - begin
        ordered = sorted(latencies)
        routes = {}
        for url, at in self.fault_times.items():
            after = [t - at for t, u in self.failed_attempts if u == url and t >= at]
            routes[url] = {
                "failed_attempts_after_fault": len(after),
                "last_attempt_after_fault_s": max(after, default=0),
            }
        return {
            "requests": requests,
            "failed": len(errors),
            "errors": sorted(set(errors))[:5],
            "duration_s": round(duration, 2),
            "p50_ms": round(percentile(ordered, 50), 1),
            "p99_ms": round(percentile(ordered, 99), 1),
            "max_ms": round(ordered[-1] if ordered else 0.0, 1),
            "faulted_routes": routes,
        }


Outcome = tuple[str, bool, float, str, float]
"""One call of an open-loop run: (its tag, answered, seconds from its scheduled start, error class or "", when it
was due, in seconds from the run's start)."""


async def open_loop(
    call: Callable[[str], Awaitable[Any]], rate: float, duration: float, tags: Sequence[str] = ("",)
) -> dict[str, Any]:
    """Calls arriving on a fixed schedule (``rate`` per second for ``duration`` s), each its own task.

    Open loop: an arrival never waits for earlier calls, as users do not wait for each other. Call ``i``
    gets ``tags[i % len(tags)]`` (a priority mix); its time counts from when it was due, so a client
    too busy to start calls on time is charged for it (``late_s``: the latest start past its due time).
    """
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * duration))
    outcomes: list[Outcome] = []
    late = 0.0

    async def one(tag: str, due: float) -> None:
        try:
            await call(tag)
        except Exception as exc:
            outcomes.append((tag, False, loop.time() - due, type(exc).__name__, due - start))
        else:
            outcomes.append((tag, True, loop.time() - due, "", due - start))

    tasks = []
    cpu, start = time.process_time(), loop.time()
    for i in range(count):
        due = start + i / rate
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        late = max(late, loop.time() - due)
        tasks.append(asyncio.ensure_future(one(tags[i % len(tags)], due)))
    await asyncio.gather(*tasks)
    return {
        "outcomes": outcomes,
        "wall_s": loop.time() - start,
        "cpu_s": time.process_time() - cpu,
        "late_s": late,
    }

"""Many app replicas, one view of the fleet: local state against state shared through Redis.

Six app processes (each its own Router, ``CONCURRENCY`` requests at a time for ``--seconds``) over
three vLLM-shaped servers (own processes, ``DELAY_S`` per answer) and one real redis-server, all on
loopback. Each scenario runs twice, ``state: local`` then ``state: redis``, on fresh servers:

- kill (``--kill-seconds``): the first server is SIGKILLed at 30 % (breaker cool-down 1 s, so the
  run holds several half-open trials); attempts that reached it dead, fleet-wide: those of requests
  sent after the kill (target >= 4x fewer shared), also counting the requests in flight at the kill
  (they fail whatever the state), and those sent after the first breaker in the fleet opened (what
  sharing can save); failed requests (target 0 either way).
- balance (``--pairs`` runs of each, alternating): ``least_outstanding``, the third server twice as
  slow; server-side requests running, sampled from each server's ``/metrics``; spread = max/min of
  their means (target: closer to 1 shared). Also requests per client CPU-second, all processes
  (target: shared >= 0.95x local; the median of the pairs' ratios, as one run's noise on 2 busy
  cores is a few per cent).
- throttle: the third server answers 429 with ``Retry-After: 5`` to every ``THROTTLE_EVERY``-th
  request; requests the fleet sent it in the 5 s after the first 429, past the staleness bound
  (target 0 shared).
- redis kill (shared only): redis-server SIGKILLed at 40 %; failed requests (target 0), and
  median / p95 latency before and after the kill.

Shared state uses the config's defaults (``StateConfig``) unless ``--refresh-interval`` says otherwise.

Run: ``.venv/bin/python benchmarks/shared_state.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from _common import MODEL, fault_server, save
from _measure import percentile

APPS = 6
"""App processes per run (``--apps``; the test suite's smoke run uses 2: each costs an interpreter's start)."""
CONCURRENCY = 4
DELAY_S = 0.02
FAILURE_THRESHOLD = 3
"""``health.failure_threshold`` (the default): failures that open a replica's breaker."""
KILL_COOLDOWN_S = 1.0
"""Breaker cool-down in the kill scenario, so a run holds several half-open trials of the dead route."""
THROTTLE_EVERY = 150
RETRY_AFTER_S = 5.0
STATE: dict[str, float] = {}
"""Shared-state settings other than the defaults (``--refresh-interval``)."""


SETTINGS = ("refresh_interval", "timeout", "leader_ttl", "load_ttl")
"""The shared-state settings recorded with the results."""


def state_settings() -> Any:
    """The shared-state settings the runs use: the config's defaults, updated by ``STATE``."""
    from anorag_integrations.config import StateConfig

    return StateConfig(**STATE)


MESSAGES = [{"role": "user", "content": "hello"}]


# --- one app process -------------------------------------------------------------------------------


async def app(spec: dict[str, Any]) -> dict[str, Any]:
    """Build a router from ``spec``, say READY, wait for the start time on stdin, run, return what happened."""
    from anorag_integrations import Router, call_info
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.router import AllRoutesFailed

    router = Router(config_from_dict(spec["config"], env={}))
    while spec["config"]["llm"]["state"]["backend"] == "redis" and not router.state.status()["connected"]:
        await asyncio.sleep(0.01)
    print("READY", flush=True)
    start_at = float(sys.stdin.readline())
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end_at = start_at + spec["seconds"]
    records: list[list[Any]] = []  # [start (Unix), latency s, served route or None, [failed attempt routes], [their s]]
    cpu0 = time.process_time()

    async def worker() -> None:
        while time.time() < end_at:
            started = time.time()
            try:
                response = await router.achat(MESSAGES, max_tokens=4)
                info = call_info(response)
                assert info is not None
                attempts = info.attempts
                records.append([started, time.time() - started, info.route, *_attempts(attempts)])
            except AllRoutesFailed as exc:
                records.append([started, time.time() - started, None, *_attempts(exc.attempts)])

    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    cpu = time.process_time() - cpu0
    await router.aclose()
    return {"records": records, "cpu_s": cpu}


def _attempts(attempts: Any) -> tuple[list[str], list[float]]:
    return [a.route for a in attempts], [round(a.elapsed_s, 4) for a in attempts]


# --- the coordinator -------------------------------------------------------------------------------


def config(urls: list[str], backend: str, redis_url: str, namespace: str, **llm: Any) -> dict[str, Any]:
    routes = {f"s{i}": {"base_url": url, "model": MODEL, "timeout": 2.0} for i, url in enumerate(urls)}
    state: dict[str, Any] = {"backend": backend}
    if backend == "redis":
        state.update(url=redis_url, namespace=namespace, **STATE)
    params = {"max_retries": 2, "max_retry_after": 30}
    return {"llm": {"routes": routes, "params": params, "state": state, **llm}}


def fleet(
    document: dict[str, Any], seconds: float, events: list[tuple[float, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """Run APPS app processes on ``document``; call each ``(fraction, action)`` at that point of the run."""
    spec = json.dumps({"config": document, "seconds": seconds, "concurrency": CONCURRENCY})
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--app", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(APPS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("an app process did not start")
        start_at = time.time() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at}\n")
            proc.stdin.flush()
        for fraction, action in sorted(events, key=lambda e: e[0]):
            time.sleep(max(0.0, start_at + fraction * seconds - time.time()))
            action()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results, start_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def records(results: list[dict[str, Any]]) -> list[list[Any]]:
    return [r for result in results for r in result["records"]]


class Sampler:
    """Reads ``vllm:num_requests_running`` from each server's ``/metrics`` every 20 ms, in a thread."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = [url.removesuffix("/v1") + "/metrics" for url in urls]
        self.samples: list[list[float]] = [[] for _ in urls]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for i, url in enumerate(self.urls):
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
                    for line in answer.read().decode().splitlines():
                        if line.startswith("vllm:num_requests_running"):
                            self.samples[i].append(float(line.rsplit(" ", 1)[1]))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def kill_run(backend: str, redis_url: str, seconds: float) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(fault_server(DELAY_S)) for _ in range(3)]
        urls = [s.url for s in servers]
        document = config(urls, backend, redis_url, f"kill-{time.time_ns()}", health={"cooldown": KILL_COOLDOWN_S})
        results, start_at = fleet(document, seconds, [(0.3, lambda: os.kill(servers[0].proc.pid, signal.SIGKILL))])
    rows = records(results)
    kill_at = start_at + 0.3 * seconds
    first_open = min(_opened(result["records"]) for result in results)
    return {
        "state": backend,
        "requests": len(rows),
        "failed": sum(1 for r in rows if r[2] is None),
        "dead_route_attempts_sent_after_kill": sum(r[3].count("s0") for r in rows if r[0] > kill_at),
        "dead_route_attempts_with_in_flight_at_kill": sum(r[3].count("s0") for r in rows),
        "dead_route_attempts_after_first_open": sum(r[3].count("s0") for r in rows if r[0] > first_open),
        "first_open_s_after_kill": round(first_open - kill_at, 3),
    }


def _opened(rows: list[list[Any]]) -> float:
    """When one replica's breaker of s0 opened: the end of its ``FAILURE_THRESHOLD``-th failed attempt there."""
    ends = sorted(r[0] + sum(r[4][: i + 1]) for r in rows for i, route in enumerate(r[3]) if route == "s0")
    return ends[FAILURE_THRESHOLD - 1] if len(ends) >= FAILURE_THRESHOLD else float("inf")


def balance_run(backend: str, redis_url: str, seconds: float) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(fault_server(d)) for d in (DELAY_S, DELAY_S, 2 * DELAY_S)]
        urls = [s.url for s in servers]
        document = config(urls, backend, redis_url, f"balance-{time.time_ns()}", lb_policy="least_outstanding")
        with Sampler(urls) as sampler:
            results, _ = fleet(document, seconds, [])
    means = [statistics.fmean(s) if s else 0.0 for s in sampler.samples]
    rows = records(results)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "state": backend,
        "requests": len(rows),
        "failed": sum(1 for r in rows if r[2] is None),
        "running_mean": [round(m, 2) for m in means],
        "spread": round(max(means) / min(means), 2) if min(means) > 0 else None,
        "per_cpu_s": round(len(rows) / cpu, 1),
    }


def throttle_run(backend: str, redis_url: str, seconds: float) -> dict[str, Any]:
    fault = ["--fault", "status", "--every", str(THROTTLE_EVERY), "--option", "status=429"]
    fault += ["--option", f"retry_after={RETRY_AFTER_S:g}"]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(fault_server(DELAY_S, *(fault if i == 2 else []))) for i in range(3)]
        document = config([s.url for s in servers], backend, redis_url, f"throttle-{time.time_ns()}")
        results, _ = fleet(document, seconds, [])
    rows = records(results)
    # When each 429 came back: the request's start plus its attempts' time up to the one on s2.
    throttled = sorted(r[0] + sum(r[4][: r[3].index("s2") + 1]) for r in rows if "s2" in r[3])
    first = throttled[0] if throttled else None

    def sent(after: float) -> int | None:
        """Requests whose attempts reached s2 (served or throttled) started within (after, first + 5 s)."""
        if first is None:
            return None
        return sum(1 for r in rows if first + after < r[0] < first + RETRY_AFTER_S and (r[2] == "s2" or "s2" in r[3]))

    return {
        "state": backend,
        "requests": len(rows),
        "failed": sum(1 for r in rows if r[2] is None),
        "sent_in_window": sent(0.0),
        "sent_after_bound": sent(state_settings().staleness_bound_s),
    }


def redis_kill_run(redis: Any, seconds: float) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(fault_server(DELAY_S)) for _ in range(3)]
        document = config([s.url for s in servers], "redis", redis.url, f"rkill-{time.time_ns()}")
        results, start_at = fleet(document, seconds, [(0.4, redis.kill)])
    rows = records(results)
    kill_at = start_at + 0.4 * seconds
    before = sorted(r[1] * 1000 for r in rows if r[0] < kill_at and r[2] is not None)
    after = sorted(r[1] * 1000 for r in rows if r[0] >= kill_at and r[2] is not None)
    return {
        "requests": len(rows),
        "failed": sum(1 for r in rows if r[2] is None),
        "p50_before_ms": round(percentile(before, 50), 1),
        "p50_after_ms": round(percentile(after, 50), 1),
        "p95_before_ms": round(percentile(before, 95), 1),
        "p95_after_ms": round(percentile(after, 95), 1),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def main() -> None:
    global APPS
    from anorag_integrations.testing import RedisServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run but the kill runs")
    parser.add_argument("--kill-seconds", type=float, default=20.0, help="length of the kill runs")
    parser.add_argument("--pairs", type=int, default=3, help="balance runs of each state, alternating")
    parser.add_argument("--apps", type=int, default=APPS, help=f"app processes per run (default {APPS})")
    parser.add_argument("--refresh-interval", type=float, help="state.refresh_interval (default: the config's)")
    args = parser.parse_args()
    APPS = args.apps
    if args.refresh_interval is not None:
        STATE["refresh_interval"] = args.refresh_interval
    settings = state_settings()
    out: dict[str, Any] = {}
    with RedisServer(password="bench-pw") as redis:
        out["kill"] = [kill_run(b, redis.url, args.kill_seconds) for b in ("local", "redis")]
        pairs = [[balance_run(b, redis.url, args.seconds) for b in ("local", "redis")] for _ in range(args.pairs)]
        out["balance"] = pairs
        out["throttle"] = [throttle_run(b, redis.url, args.seconds) for b in ("local", "redis")]
        out["redis_kill"] = redis_kill_run(redis, args.seconds)
    (kl, ks), (tl, ts), rk = out["kill"], out["throttle"], out["redis_kill"]

    def kill_ratio(key: str) -> float | None:
        return ratio(kl[key], ks[key])

    cpu = [ratio(shared["per_cpu_s"], local["per_cpu_s"]) for local, shared in pairs]
    out["ratios"] = {
        "dead_route_attempts_sent_after_kill_local_over_shared": kill_ratio("dead_route_attempts_sent_after_kill"),
        "dead_route_attempts_with_in_flight_at_kill_local_over_shared": kill_ratio(
            "dead_route_attempts_with_in_flight_at_kill"
        ),
        "dead_route_attempts_after_first_open_local_over_shared": kill_ratio("dead_route_attempts_after_first_open"),
        "spread_local": statistics.median(local["spread"] or math.inf for local, _ in pairs),
        "spread_shared": statistics.median(shared["spread"] or math.inf for _, shared in pairs),
        "throttled_route_requests_after_bound_local": tl["sent_after_bound"],
        "throttled_route_requests_after_bound_shared": ts["sent_after_bound"],
        "per_cpu_s_shared_over_local": statistics.median(c if c is not None else 0.0 for c in cpu),
        "per_cpu_s_shared_over_local_each_pair": cpu,
        "p50_after_over_before_redis_kill": ratio(rk["p50_after_ms"], rk["p50_before_ms"]),
    }
    for name, value in out["ratios"].items():
        print(f"{name:61} {value}")
    failed = [kl, ks, *(run for pair in pairs for run in pair), tl, ts, rk]
    print("failed requests, all runs:", sum(run["failed"] for run in failed))
    path = save(
        "shared_state", out, apps=APPS, concurrency=CONCURRENCY, seconds=args.seconds, kill_seconds=args.kill_seconds,
        pairs=args.pairs, delay_s=DELAY_S, state=settings.model_dump(include=set(SETTINGS)),
        staleness_bound_s=settings.staleness_bound_s, throttle_every=THROTTLE_EVERY, retry_after_s=RETRY_AFTER_S,
    )  # fmt: skip
    print("written to", path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--app":
        print(json.dumps(asyncio.run(app(json.loads(sys.argv[2])))), flush=True)
    else:
        main()

"""Overload without collapse (issue 28): answers per second when more calls arrive than the fleet can serve.

Three vLLM-shaped servers of fixed capacity (SLOTS requests at once, SERVICE_S each: 24 answers/s in all; more
wait in each server's queue, and a client that disconnects aborts its request, as vLLM does), in one process of
their own off the client's core. Calls arrive open loop (on a fixed schedule, each its own task, never waiting
for earlier ones) at 1.5x, 2x and 4x capacity for ``--duration`` s; per-attempt timeout TIMEOUT_S. Clients: the
raw openai SDK (``max_retries=2``, its default) taking the servers in turn, LiteLLM's ``Router`` (its defaults
but the timeout; in ``.venv-peers``), and our ``Router`` (``round_robin``) with admission control off and with
its defaults. Measured per client and load: answers/s against capacity, attempts the servers received per
call offered, failed calls and their median time to fail, latency of answered calls against the unloaded
latency (sequential calls on the idle fleet, measured first). Then a priority mix at 2x (20 % interactive,
80 % batch; ours, defaults) and a run below capacity (0.5x: CPU per call, p50, calls shed; admission off vs on).
Run: ``.venv/bin/python benchmarks/overload.py [--duration 15] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import openai
from _common import MODEL, Peers, _server_cpus, pin_client, save
from _measure import Outcome, open_loop, percentile

from anorag_integrations import Router
from anorag_integrations.config import Config, config_from_dict, sections

SERVERS = 3
SLOTS = 4
SERVICE_S = 0.5
CAPACITY = SERVERS * SLOTS / SERVICE_S
"""Answers per second the fleet can give: 24."""
TIMEOUT_S = 2.0
LOADS = (1.5, 2.0, 4.0)
BELOW = 0.5
"""The load of the below-capacity run (a multiple of capacity)."""
LEARNT_S = 5.0
"""The priority mix is also reported for calls due after this many seconds: once the limits are learnt (a router
starting cold sends up to ``admission.initial_limit`` per route before its first answers say the servers queue)."""
MIX = ("interactive", "batch", "batch", "batch", "batch")
"""The priority mix: one call in five interactive (priority 0), the rest batch (priority 1)."""
PRIORITY = {"interactive": 0, "batch": 1}
MAX_TOKENS = 8
ASK = [{"role": "user", "content": "hello"}]
ADMISSION = hasattr(sections, "AdmissionConfig")
"""Whether this router has admission control (issue 28); until it does, both of our variants are today's router
and calls carry no priority (today it would go to the servers as vLLM's ``priority``, which a server that does not
schedule by priority refuses)."""
RAW = "raw AsyncOpenAI (max_retries=2)"
LITELLM = "LiteLLM Router"
OFF = "Router, admission off"
DEFAULTS = "Router, defaults"


# --- the servers: one process of their own, asked for their counters on stdin ----------------------------------


def serve(servers: int, slots: int, service_s: float, scheduling: str) -> None:
    """``--serve``: run the fleet; print ``READY url...``, then one JSON line of counters per line read."""
    from anorag_integrations.testing import FaultServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet = [FaultServer(MODEL, max_running=slots, scheduling=scheduling) for _ in range(servers)]  # type: ignore[arg-type]
    with contextlib.ExitStack() as stack:
        for server in fleet:
            server.latency = service_s
            stack.enter_context(server)
        print("READY", *(server.base_url for server in fleet), flush=True)
        for _ in sys.stdin:
            counters = [{"hits": s.hits, "running": s.running, "waiting": s.waiting} for s in fleet]
            print(json.dumps(counters), flush=True)


class Fleet:
    """The servers' process, pinned off the client's core; ``counters()`` reads theirs."""

    def __init__(self, scheduling: str = "fcfs") -> None:
        command = [sys.executable, __file__, "--serve", "--scheduling", scheduling]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cpus = _server_cpus()
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, cpus)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            self.close()
            raise RuntimeError(f"benchmark servers did not start: {line!r}")
        self.urls: list[str] = line[1:]

    def counters(self) -> list[dict[str, int]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def hits(self) -> int:
        return sum(c["hits"] for c in self.counters())

    def idle(self, bound: float = 30.0) -> None:
        """Wait (polling, with a bound) until no server runs or queues anything: each run starts on an idle fleet."""
        deadline = time.monotonic() + bound
        while any(c["running"] or c["waiting"] for c in self.counters()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers still busy {bound:g} s after a run: {self.counters()}")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BreakerLog(logging.Handler):
    """Counts the router's "circuit breaker opened" warnings (and keeps them off the benchmark's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.opened += "breaker opened" in record.getMessage()


BREAKERS = BreakerLog()
ROUTER_LOG = logging.getLogger("anorag_integrations.router")
ROUTER_LOG.addHandler(BREAKERS)
ROUTER_LOG.propagate = False


# --- the clients ----------------------------------------------------------------------------------------------


def our_config(urls: list[str], admission: bool, send_priority: bool = False) -> Config:
    """``round_robin`` over the servers, the same per-attempt timeout; ``admission: {enabled: false}`` for the
    variant without admission control, once the router has it (today's router: both variants alike);
    ``send_priority``: calls' priorities go on to the servers (which then schedule by them)."""
    route: dict[str, Any] = {"model": MODEL, "send_priority": True} if send_priority else {"model": MODEL}
    routes = {f"s{i}": {"base_url": url, **route} for i, url in enumerate(urls)}
    llm: dict[str, Any] = {"routes": routes, "lb_policy": "round_robin", "params": {"timeout": TIMEOUT_S}}
    if not admission and ADMISSION:
        llm["admission"] = {"enabled": False}
    return config_from_dict({"llm": llm}, env={})


async def raw_run(urls: list[str], rate: float, duration: float, warmup: int) -> dict[str, Any]:
    clients = [openai.AsyncOpenAI(base_url=u, api_key="EMPTY", max_retries=2, timeout=TIMEOUT_S) for u in urls]
    turn = itertools.cycle(clients)

    async def call(tag: str) -> None:
        await next(turn).chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]

    try:
        for _ in range(warmup):
            await call("")
        return await open_loop(call, rate, duration)
    finally:
        for client in clients:
            await client.close()


async def ours_run(
    urls: list[str],
    rate: float,
    duration: float,
    warmup: int,
    admission: bool,
    tags: tuple[str, ...] = ("",),
    server_priority: bool = False,
) -> dict[str, Any]:
    send_priority = ADMISSION and tags != ("",)
    opened = BREAKERS.opened
    async with Router(our_config(urls, admission, server_priority)) as router:

        async def call(tag: str) -> None:
            if send_priority:
                await router.achat(ASK, max_tokens=MAX_TOKENS, priority=PRIORITY[tag])
            else:
                await router.achat(ASK, max_tokens=MAX_TOKENS)

        for _ in range(warmup):
            await router.achat(ASK, max_tokens=MAX_TOKENS)
        result = await open_loop(call, rate, duration, tags)
    return {**result, "priority_sent": send_priority, "breakers_opened": BREAKERS.opened - opened}


async def unloaded(urls: list[str], calls: int) -> dict[str, float]:
    """Sequential calls on the idle fleet (raw SDK, no retries): the latency every ratio is taken against."""
    clients = [openai.AsyncOpenAI(base_url=u, api_key="EMPTY", max_retries=0, timeout=TIMEOUT_S) for u in urls]
    seconds = []
    try:
        for i in range(calls):
            started = time.perf_counter()
            await clients[i % len(clients)].chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - started)
    finally:
        for client in clients:
            await client.close()
    ordered = sorted(seconds[len(urls) :])  # the first call to each server opens its connection
    return {
        "calls": len(ordered),
        "p50_s": round(statistics.median(ordered), 4),
        "p95_s": round(percentile(ordered, 95), 4),
    }


# --- measuring ------------------------------------------------------------------------------------------------


def latency(outcomes: list[Outcome], base: dict[str, float]) -> dict[str, Any]:
    answered = sorted(o[2] for o in outcomes if o[1])
    p50, p95 = percentile(answered, 50), percentile(answered, 95)
    return {
        "answered": len(answered),
        "p50_s": round(p50, 3) if answered else None,
        "p95_s": round(p95, 3) if answered else None,
        "p50_vs_unloaded": round(p50 / base["p50_s"], 2) if answered else None,
        "p95_vs_unloaded": round(p95 / base["p95_s"], 2) if answered else None,
    }


def summary(client: str, load: float, run: dict[str, Any], hits: int, base: dict[str, float]) -> dict[str, Any]:
    outcomes: list[Outcome] = [tuple(o) for o in run["outcomes"]]  # type: ignore[misc]
    offered = len(outcomes)
    failed = sorted(o[2] for o in outcomes if not o[1])
    stats = latency(outcomes, base)
    answers_per_s = stats["answered"] / run["wall_s"]
    return {
        "client": client,
        "load": load,
        "offered": offered,
        "offered_per_s": round(load * CAPACITY, 1),
        **stats,
        "answers_per_s": round(answers_per_s, 2),
        "vs_capacity": round(answers_per_s / CAPACITY, 3),
        "attempts_per_request": round(hits / offered, 2),
        "failed": len(failed),
        "median_fail_s": round(statistics.median(failed), 3) if failed else None,
        "errors": dict(collections.Counter(o[3] for o in outcomes if not o[1]).most_common()),
        "wall_s": round(run["wall_s"], 2),
        "client_late_s": round(run["late_s"], 3),
        "client_cpu_ms_per_call": round(run["cpu_s"] / offered * 1000, 3),
        "breakers_opened": run.get("breakers_opened"),
    }


def measured(
    fleet: Fleet, client: str, load: float, start: Callable[[], dict[str, Any]], base: dict[str, float], warmup: int
) -> dict[str, Any]:
    """One run on an idle fleet, with the attempts the servers received during it (``warmup`` calls apart)."""
    fleet.idle()
    before = fleet.hits()
    run = start()
    fleet.idle()
    hits = fleet.hits() - before - warmup
    row = summary(client, load, run, hits, base)
    print(
        f"{client:32} {load:4.1f}x  answers/s {row['answers_per_s']:6.2f} ({row['vs_capacity']:.2f}x)  "
        f"attempts/call {row['attempts_per_request']:.2f}  failed {row['failed']:4}/{row['offered']:<5} "
        f"p50 {row['p50_vs_unloaded']}x p95 {row['p95_vs_unloaded']}x  {row['errors']}",
        flush=True,
    )
    return {**row, **({"litellm_settings": run["settings"]} if "settings" in run else {})}


def synchronously(make: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any) -> Callable[[], dict[str, Any]]:
    """A run of one of our in-process clients, on an event loop of its own."""
    return lambda: asyncio.run(make(*args))


def measure(args: argparse.Namespace, peers: Peers) -> dict[str, Any]:
    warmup = SERVERS  # one sequential call per server before each run: its attempts are not the run's
    with Fleet() as fleet:
        urls = fleet.urls
        base = asyncio.run(unloaded(urls, args.unloaded_calls))
        print(f"unloaded: p50 {base['p50_s'] * 1000:.0f} ms, p95 {base['p95_s'] * 1000:.0f} ms", flush=True)
        rows = []
        for load in args.loads:
            rate = load * CAPACITY
            starts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                (RAW, synchronously(raw_run, urls, rate, args.duration, warmup))
            ]
            if peers.proc is not None:
                command = {"op": "open_loop", "urls": urls, "rate": rate, "duration": args.duration,
                           "timeout": TIMEOUT_S, "warmup": warmup, "max_tokens": MAX_TOKENS}  # fmt: skip
                starts.append((LITELLM, functools.partial(peers.ask, **command)))
            for name, admission in ((OFF, False), (DEFAULTS, True)):
                starts.append((name, synchronously(ours_run, urls, rate, args.duration, warmup, admission)))
            rows += [measured(fleet, name, load, start, base, warmup) for name, start in starts]
        mix = priority_mix(fleet, args, base, warmup)
        below = below_capacity(fleet, args, base, warmup)
    with Fleet("priority") as fleet:  # servers started with vLLM's --scheduling-policy priority
        mix_scheduled = priority_mix(fleet, args, base, warmup, server_priority=True)
    return {"capacity_per_s": CAPACITY, "unloaded": base, "rows": rows, "priority_mix": mix,
            "priority_mix_scheduled": mix_scheduled, "below_capacity": below}  # fmt: skip


def priority_mix(
    fleet: Fleet, args: argparse.Namespace, base: dict[str, float], warmup: int, server_priority: bool = False
) -> dict[str, Any]:
    """2x capacity, one call in five interactive: ours with its defaults; ``server_priority``: the servers
    schedule by priority and the routes send it (``send_priority: true``), else the queue alone orders calls."""
    fleet.idle()
    before = fleet.hits()
    run = asyncio.run(ours_run(fleet.urls, 2.0 * CAPACITY, args.duration, warmup, True, MIX, server_priority))
    fleet.idle()
    hits = fleet.hits() - before - warmup
    outcomes: list[Outcome] = [tuple(o) for o in run["outcomes"]]  # type: ignore[misc]
    result: dict[str, Any] = {"client": DEFAULTS, "load": 2.0, "server_priority": server_priority, "learnt_s": LEARNT_S,
                              "priority_sent": run["priority_sent"],
                              "breakers_opened": run["breakers_opened"],
                              "attempts_per_request": round(hits / len(outcomes), 2)}  # fmt: skip
    for tag in ("interactive", "batch"):
        mine = [o for o in outcomes if o[0] == tag]
        stats = latency(mine, base)
        failed = [o for o in mine if not o[1]]
        steady = latency([o for o in mine if o[4] >= LEARNT_S], base)
        result[tag] = {
            "offered": len(mine),
            **stats,
            "answers_per_s": round(stats["answered"] / run["wall_s"], 2),
            "failed": len(failed),
            "errors": dict(collections.Counter(o[3] for o in failed).most_common()),
            "steady": {"p95_vs_unloaded": steady["p95_vs_unloaded"], "answered": steady["answered"]},
        }
    inter = result["interactive"]
    print(
        f"priority mix 2x (servers by priority: {server_priority}): interactive p95 {inter['p95_vs_unloaded']}x "
        f"unloaded p95 ({inter['steady']['p95_vs_unloaded']}x after {LEARNT_S:g} s), failed "
        f"{inter['failed']}/{inter['offered']}; batch {result['batch']['answers_per_s']}/s",
        flush=True,
    )
    return result


def below_capacity(fleet: Fleet, args: argparse.Namespace, base: dict[str, float], warmup: int) -> dict[str, Any]:
    """0.5x capacity, admission off and on alternating (``--rounds`` each): CPU per call, p50, calls shed."""
    runs: dict[str, list[dict[str, Any]]] = {OFF: [], DEFAULTS: []}
    for _ in range(args.rounds):
        for name, admission in ((OFF, False), (DEFAULTS, True)):
            fleet.idle()
            run = asyncio.run(ours_run(fleet.urls, BELOW * CAPACITY, args.duration, warmup, admission))
            runs[name].append(summary(name, BELOW, run, 0, base))
    result: dict[str, Any] = {"load": BELOW, "rounds": args.rounds}
    for name, rows in runs.items():
        result[name] = {
            "calls": sum(r["offered"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
            "shed": sum(r["errors"].get("FleetSaturatedError", 0) for r in rows),
            "errors": dict(sum((collections.Counter(r["errors"]) for r in rows), collections.Counter())),
            "cpu_ms_per_call": round(statistics.median(r["client_cpu_ms_per_call"] for r in rows), 3),
            "p50_s": round(statistics.median(r["p50_s"] for r in rows if r["p50_s"] is not None), 4),
        }
    off, on = result[OFF], result[DEFAULTS]
    result["cpu_per_call_on_over_off"] = round(on["cpu_ms_per_call"] / off["cpu_ms_per_call"], 3)
    result["p50_on_over_off"] = round(on["p50_s"] / off["p50_s"], 3)
    print(
        f"below capacity {BELOW}x: CPU per call on/off {result['cpu_per_call_on_over_off']}x, p50 on/off "
        f"{result['p50_on_over_off']}x, shed {on['shed']}, failed off {off['failed']} on {on['failed']}",
        flush=True,
    )
    return result


def table(results: dict[str, Any]) -> None:
    print(f"\ncapacity {CAPACITY:g}/s; unloaded p50 {results['unloaded']['p50_s'] * 1000:.0f} ms")
    columns = ("load", "ans/s", "vs cap", "att/call", "failed", "fail s", "p50x", "p95x")
    print(f"{'client':32}", *(f"{c:>8}" for c in columns))
    for r in results["rows"]:
        failed = f"{r['failed']}/{r['offered']}"
        cells = (f"{r['load']:g}x", r["answers_per_s"], r["vs_capacity"], r["attempts_per_request"], failed,
                 r["median_fail_s"], r["p50_vs_unloaded"], r["p95_vs_unloaded"])  # fmt: skip
        print(f"{r['client']:32}", *(f"{'n/a' if c is None else c:>8}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per run")
    parser.add_argument("--loads", type=float, nargs="+", default=list(LOADS), help="multiples of capacity")
    parser.add_argument("--rounds", type=int, default=2, help="below-capacity runs per variant (alternating)")
    parser.add_argument("--unloaded-calls", type=int, default=23, help="sequential calls on the idle fleet")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per run, 1 round")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scheduling", default="fcfs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(SERVERS, SLOTS, SERVICE_S, args.scheduling)
        return
    if args.quick:
        args.duration, args.rounds, args.unloaded_calls = 2.0, 1, 9
    cores = pin_client()
    with Peers() as peers:
        peer_versions = peers.ask(op="versions") or {}
        results = measure(args, peers)
    table(results)
    path = save(
        "overload",
        results,
        cores,
        servers=SERVERS,
        slots=SLOTS,
        service_s=SERVICE_S,
        timeout_s=TIMEOUT_S,
        duration_s=args.duration,
        max_tokens=MAX_TOKENS,
        admission_available=ADMISSION,
        peer_versions={k: v for k, v in peer_versions.items() if k == "litellm"},
        peers_missing=peers.missing or None,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

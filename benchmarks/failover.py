"""Failover cost: three servers; one killed (SIGKILL) at 30 % of the requests, one hung (SIGSTOP) at 60 %.

Each client gets three fresh vLLM-shaped servers (own processes, DELAY_S per answer) and runs the same
requests twice: without faults, then with them. Reported per client: failed requests (target 0),
p99 latency against its own no-fault run, and for each faulted server the failed attempts it still
got after its fault and when the last one came (how long until a dead route stops being chosen).
Every client gets the same per-attempt timeout and two retries. LiteLLM runs in ``.venv-peers``.
Run: ``.venv/bin/python benchmarks/failover.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

from _common import MODEL, Peers, Server, fault_server, pin_client, save
from _measure import PROMPT, Call, Scenario

DELAY_S = 0.02
TIMEOUT_S = 2.0
RETRIES = 2
MESSAGES = [{"role": "user", "content": PROMPT}]
CLIENTS = ("Router.achat", "ChatOpenAI.with_fallbacks", "LiteLLM Router.acompletion")


def faults(servers: list[Server]) -> list[tuple[float, str, int, int]]:
    """Kill the first server at 30 %, hang the second at 60 % (it accepts connections, never answers)."""
    return [
        (0.3, servers[0].url, servers[0].proc.pid, signal.SIGKILL),
        (0.6, servers[1].url, servers[1].proc.pid, signal.SIGSTOP),
    ]


def router_call(urls: list[str], scenario: Scenario) -> Call:
    from anorag_integrations import Router, call_info
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.router import AllRoutesFailed

    routes = {f"s{i}": {"base_url": url, "model": MODEL} for i, url in enumerate(urls)}
    params = {"timeout": TIMEOUT_S, "max_retries": RETRIES}
    router = Router(config_from_dict({"llm": {"routes": routes, "params": params}}, env={}))

    async def call() -> None:
        try:
            response = await router.achat(MESSAGES)
        except AllRoutesFailed as exc:
            for attempt in exc.attempts:
                scenario.attempt_failed(router.routes[attempt.route].base_url)
            raise
        info = call_info(response)
        for attempt in info.attempts if info else ():
            scenario.attempt_failed(router.routes[attempt.route].base_url)

    return call


def with_fallbacks_call(urls: list[str], scenario: Scenario) -> Call:
    from langchain_core.callbacks import AsyncCallbackHandler
    from langchain_openai import ChatOpenAI

    class Failures(AsyncCallbackHandler):
        async def on_llm_error(self, error: BaseException, *, tags: list[str] | None = None, **_: Any) -> None:
            scenario.attempt_failed(next(t for t in tags or [] if t.startswith("http")))

    # LangChain's advice for fallbacks: no retries inside each model, so the fallback is tried at once.
    models = [
        ChatOpenAI(base_url=url, api_key="EMPTY", model=MODEL, timeout=TIMEOUT_S, max_retries=0).with_config(tags=[url])  # type: ignore[arg-type]
        for url in urls
    ]
    chain = models[0].with_fallbacks(models[1:])
    config = {"callbacks": [Failures()]}

    async def call() -> None:
        await chain.ainvoke(PROMPT, config=config)  # type: ignore[arg-type]

    return call


async def ours(
    make: Callable[[list[str], Scenario], Call],
    servers: list[Server],
    with_faults: bool,
    requests: int,
    concurrency: int,
) -> dict[str, Any]:
    planned = faults(servers) if with_faults else []
    scenario = Scenario([(f, url, lambda pid=pid, sig=sig: os.kill(pid, sig)) for f, url, pid, sig in planned])
    return await scenario.run(make([s.url for s in servers], scenario), requests, concurrency)


async def run_client(
    client: str, peers: Peers, with_faults: bool, requests: int, concurrency: int
) -> dict[str, Any] | None:
    """One run of ``client`` on three fresh servers (a killed server cannot serve the next run)."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(fault_server(DELAY_S)) for _ in range(3)]
        if client == "Router.achat":
            return await ours(router_call, servers, with_faults, requests, concurrency)
        if client == "ChatOpenAI.with_fallbacks":
            return await ours(with_fallbacks_call, servers, with_faults, requests, concurrency)
        planned = faults(servers) if with_faults else []
        urls = [s.url for s in servers]
        answer: dict[str, Any] | None = peers.ask(
            op="failover",
            client=client,
            urls=urls,
            requests=requests,
            concurrency=concurrency,
            timeout=TIMEOUT_S,
            faults=planned,
        )
        return answer


def seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def run_all(peers: Peers, requests: int, concurrency: int, clients: list[str]) -> list[dict[str, Any]]:
    """Each client without and with faults, in one event loop (the clients close with it)."""
    rows = []
    for client in clients:
        baseline = await run_client(client, peers, False, requests, concurrency)
        faulted = await run_client(client, peers, True, requests, concurrency)
        if baseline is None or faulted is None:
            continue
        dead, hung = list(faulted["faulted_routes"].values()) or [{}, {}]
        row = {
            "client": client,
            "failed": faulted["failed"],
            "errors": faulted["errors"],
            "p50_ms": faulted["p50_ms"],
            "p99_ms": faulted["p99_ms"],
            "p99_no_fault_ms": baseline["p99_ms"],
            "p99_vs_no_fault": round(faulted["p99_ms"] / baseline["p99_ms"], 1),
            "duration_s": faulted["duration_s"],
            "killed_route_attempts_after": dead.get("failed_attempts_after_fault"),
            "killed_route_last_attempt_s": seconds(dead.get("last_attempt_after_fault_s")),
            "hung_route_attempts_after": hung.get("failed_attempts_after_fault"),
            "hung_route_last_attempt_s": seconds(hung.get("last_attempt_after_fault_s")),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS), help="default: all")
    args = parser.parse_args()
    cores = pin_client()
    with Peers() as peers:
        peer_versions = peers.ask(op="versions") or {}
        rows = asyncio.run(run_all(peers, args.requests, args.concurrency, args.clients))
    path = save(
        "failover",
        rows,
        cores=cores,
        requests=args.requests,
        concurrency=args.concurrency,
        delay_s=DELAY_S,
        timeout_s=TIMEOUT_S,
        retries=RETRIES,
        peer_versions=peer_versions,
    )
    print("written to", path)


if __name__ == "__main__":
    main()

"""``anorag-llm demo``: two local llama.cpp servers, requests through the router, tables, failover."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from ..config import load_config
from ..router import Router, call_info
from .servers import LlamaServer
from .tables import HEALTH_COLUMNS, STATS_COLUMNS, table

QUESTIONS = ("The capital of France is", "Water boils at", "The largest planet is")


def _local_servers(config_path: str | None) -> list[LlamaServer]:
    """One llama-server per loopback route of the config, on that route's port, named as its model."""
    config = load_config(config_path)
    servers = []
    for route in config.routes.values():
        parts = urlsplit(route.base_url)
        if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
            servers.append(LlamaServer(parts.port, alias=route.model))
    return servers


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def run_demo(config_path: str | None) -> int:
    servers = _local_servers(config_path)
    if len(servers) < 2:
        print("demo: the config needs at least two routes on 127.0.0.1 (the servers it starts)")
        return 2
    with contextlib.ExitStack() as stack:
        print(f"starting {len(servers)} llama.cpp servers (logs in {servers[0].log_path.parent}) ...")
        for server in servers:
            server.start(wait=False)
            stack.callback(server.stop)
        for server in servers:
            server.wait_ready()
            print(f"  {server.base_url} ready (pid {server.process.pid if server.process else '?'})")
        router = stack.enter_context(Router.from_config(config_path))

        print("\n== sync chat ==")
        for q in QUESTIONS:
            resp = router.chat(messages(q))
            info = call_info(resp)
            print(f"  [{info.route if info else '?'}] {q} -> {resp.choices[0].message.content!r}")

        print("\n== async chat, 3 concurrent ==")

        async def concurrent() -> None:
            results = await asyncio.gather(*(router.achat(messages(q)) for q in QUESTIONS))
            for q, resp in zip(QUESTIONS, results, strict=True):
                info = call_info(resp)
                print(f"  [{info.route if info else '?'}] {q} -> {resp.choices[0].message.content!r}")

        asyncio.run(concurrent())

        print("\n== streamed ==")
        route = "?"
        print("  ", end="")
        for chunk in router.stream(messages("Once upon a time"), max_tokens=24):
            info = call_info(chunk)
            route = info.route or route if info else route
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(f"\n  (served by {route})")

        victim = servers[0]
        print(f"\n== failover: killing the server on port {victim.port} ==")
        victim.kill()
        started = time.perf_counter()
        served = [call_info(router.chat(messages(q))) for q in QUESTIONS * 2]
        routes = [info.route if info else "?" for info in served]
        print(f"  {len(served)} requests, 0 failed, served by {routes} in {time.perf_counter() - started:.1f}s")

        print("\n== health ==")
        print(table(router.health(), HEALTH_COLUMNS))
        print("\n== stats ==")
        print(table(router.stats(), STATS_COLUMNS))
        print("\nstopping servers")
    return 0

"""``anorag-llm demo``: two real vLLM servers on CPU, requests through the router, failover, tables."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from ..config import load_config
from ..router import Router, call_info
from .manage import check_ports
from .servers import running
from .tables import HEALTH_COLUMNS, STATS_COLUMNS, table
from .vllm import VllmServer, cache_dir, chat_model

QUESTIONS = ("What is the capital of France?", "Name the three primary colors.", "How many days are in a week?")
SYSTEM = "Answer in one short sentence."
"""A 135M model rambles without it (seen: a list of French words for the capital of France)."""


def _local_servers(config_path: str | None) -> list[VllmServer]:
    """One vLLM server per loopback route of the config, on that route's port, serving the route's model name."""
    config = load_config(config_path)
    servers = []
    for route in config.routes.values():
        parts = urlsplit(route.base_url)
        if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
            servers.append(VllmServer(parts.port, alias=route.model))
    check_ports([server.port for server in servers])
    return servers


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def one_line(text: str | None, width: int = 110) -> str:
    """An answer on one line, shortened to ``width`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_demo(config_path: str | None) -> int:
    servers = _local_servers(config_path)
    if len(servers) < 2:
        print("demo: the config needs at least two routes on 127.0.0.1 (the servers it starts)")
        return 2
    print(f"preparing SmolLM2-135M-Instruct (first run only; cached in {cache_dir()}) ...", flush=True)
    chat_model()
    print(f"starting {len(servers)} vLLM servers on CPU (about 40 s; logs in {servers[0].log_path.parent}) ...")
    with contextlib.ExitStack() as stack:
        started = stack.enter_context(running(servers))
        for server in started:
            print(f"  {server.base_url} ready (pid {server.process.pid if server.process else '?'})")
        router = stack.enter_context(Router.from_config(config_path))

        print("\n== sync chat ==")
        for q in QUESTIONS:
            resp = router.chat(messages(q))
            info = call_info(resp)
            print(f"  [{info.route if info else '?'}] {q}\n      {one_line(resp.choices[0].message.content)}")

        print("\n== async chat, 3 concurrent ==")

        async def concurrent() -> None:
            results = await asyncio.gather(*(router.achat(messages(q)) for q in QUESTIONS))
            for q, resp in zip(QUESTIONS, results, strict=True):
                info = call_info(resp)
                print(f"  [{info.route if info else '?'}] {q}\n      {one_line(resp.choices[0].message.content)}")

        asyncio.run(concurrent())

        print("\n== streamed ==")
        route = "?"
        print("  ", end="")
        for chunk in router.stream(messages("Write one sentence about the sea.")):
            info = call_info(chunk)
            route = info.route or route if info else route
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(f"\n  (served by {route})")

        victim = started[0]
        print(f"\n== failover: killing the vLLM server on port {victim.port} (SIGKILL) ==")
        victim.kill()
        begun = time.perf_counter()
        served = [call_info(router.chat(messages(q))) for q in QUESTIONS * 2]
        routes = [info.route if info else "?" for info in served]
        print(f"  {len(served)} requests, 0 failed, served by {routes} in {time.perf_counter() - begun:.1f}s")

        print("\n== health ==")
        print(table(router.health(), HEALTH_COLUMNS))
        print("\n== stats ==")
        print(table(router.stats(), STATS_COLUMNS))
        print("\nstopping servers")
    return 0

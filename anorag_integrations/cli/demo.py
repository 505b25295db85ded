"""``anorag-llm demo``: two real vLLM servers on CPU, requests through the router, failover, tables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ENV_CONFIG_PATH, Config, config_file, config_from_dict, load_config
from ..router import Router, call_info
from .manage import check_ports
from .servers import DEFAULT_PORTS, running
from .tables import HEALTH_COLUMNS, STATS_COLUMNS, table
from .vllm import CHAT_ALIAS, VllmServer, cache_dir, chat_model

QUESTIONS = ("What is the capital of France?", "Name the three primary colors.", "How many days are in a week?")
SYSTEM = "Answer in one short sentence."
"""A 135M model rambles without it (seen: a list of French words for the capital of France)."""


BUILT_IN = "built-in demo config"
"""The ``source`` of :data:`DEMO_CONFIG` once loaded (health tables and errors name it)."""
DEMO_CONFIG: dict[str, Any] = {
    "llm": {
        "provider": "vllm_openai",
        "vllm_openai": {
            "routes": {
                "local_a": {
                    "base_url": f"http://127.0.0.1:{DEFAULT_PORTS[0]}/v1",
                    "model": CHAT_ALIAS,
                    "timeout": 30,
                    "api_key": "EMPTY",
                    "weight": 1,
                },
                "local_b": {
                    "base_url": f"http://127.0.0.1:{DEFAULT_PORTS[1]}/v1",
                    "model": CHAT_ALIAS,
                    "timeout": 30,
                    "weight": 1,
                },
            },
            "default_route": "local_a",
            "lb_policy": "least_outstanding",
            "params": {
                "temperature": 0,
                "max_tokens": 48,
                "timeout": 30,
                "max_retries": 2,
                "deadline": 120,
                "max_retry_after": 60,
            },
            "health": {"probe_interval": 2, "probe_timeout": 2, "failure_threshold": 3, "cooldown": 5},
        },
    }
}
"""The demo's config when there is no file to read: the repository's ``config.yaml`` (two local vLLM servers),
so a pip install, which has no such file, runs the same demo (a test holds the two equal)."""


def demo_config(config_path: str | None, *, env: Mapping[str, str] | None = None) -> Config:
    """``--config``, else ``$ANORAG_CONFIG``, else ``./config.yaml``; with none of them, :data:`DEMO_CONFIG`.

    The built-in config ignores ``VLLM_BASE_URL`` and friends: the demo starts its own servers on its ports.
    """
    env = os.environ if env is None else env
    if config_path is not None or env.get(ENV_CONFIG_PATH) or _present(config_file(env=env)):
        return load_config(config_path, env=env)
    return config_from_dict(DEMO_CONFIG, source=BUILT_IN, env={})


def _local_servers(config: Config) -> list[VllmServer]:
    """One vLLM server per loopback route of the config, on that route's port, serving the route's model name."""
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
    config = demo_config(config_path)
    servers = _local_servers(config)
    if len(servers) < 2:
        print(f"demo: {config.source} needs at least two routes on 127.0.0.1 (the servers it starts)")
        return 2
    if config.source == BUILT_IN:
        ports = ", ".join(str(server.port) for server in servers)
        print(f"config: {BUILT_IN} (no ./config.yaml): {len(servers)} local vLLM servers on ports {ports}")
    else:
        print(f"config: {config.source}")
    print(f"preparing SmolLM2-135M-Instruct (first run only; cached in {cache_dir()}) ...", flush=True)
    chat_model()
    print(f"starting {len(servers)} vLLM servers on CPU (about 40 s; logs in {servers[0].log_path.parent}) ...")
    with contextlib.ExitStack() as stack:
        started = stack.enter_context(running(servers))
        for server in started:
            print(f"  {server.base_url} ready (pid {server.process.pid if server.process else '?'})")
        router = stack.enter_context(Router(config))

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


def _present(path: Path) -> bool:
    """Whether something is at ``path``: a file, and also what cannot be one (a directory, a dangling or looping
    link), which the loader then reports rather than the demo quietly using its built-in config."""
    return path.exists() or path.is_symlink()

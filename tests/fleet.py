"""Helpers of the shared-state tests: configs over one Redis, bounded polling, and app replicas in processes.

``python -m tests.fleet '<config as JSON>'`` runs one app replica: a Router of its own, driven by
one command per line on stdin, each answered by one JSON line on stdout::

    status          {"connected", "leads", "breakers": {route: state}, "elsewhere": {route: in flight}}
    chat N          N chats one after another: {"served": {route: n}, "failed": n}
    hold ROUTE N    N chats pinned to ROUTE in threads (a hanging server keeps them): {"in_flight": N}
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anorag_integrations import Router, call_info
from anorag_integrations.config import Config, config_from_dict
from anorag_integrations.testing import FaultServer

MODEL = "m"
USER = [{"role": "user", "content": "hello"}]
ROOT = Path(__file__).parent.parent

FAST_STATE = {"refresh_interval": 0.05, "timeout": 0.25, "leader_ttl": 0.6, "load_ttl": 0.6}
"""Shared-state timings short enough for tests (bound: 0.05 + 4 x 0.25 = 1.05 s)."""


def state_document(servers: dict[str, FaultServer], url: str, namespace: str, **llm: Any) -> dict[str, Any]:
    """A config document: one route per server, state shared through ``url`` under ``namespace``."""
    routes = {name: {"base_url": server.base_url, "model": MODEL, "timeout": 2.0} for name, server in servers.items()}
    health = {"failure_threshold": 3, "cooldown": 60, **llm.pop("health", {})}
    params = {"max_retries": 0, **llm.pop("params", {})}
    state = {"backend": "redis", "url": url, "namespace": namespace, **FAST_STATE, **llm.pop("state", {})}
    return {"llm": {"routes": routes, "health": health, "params": params, "state": state, **llm}}


def shared_config(servers: dict[str, FaultServer], url: str, namespace: str, **llm: Any) -> Config:
    return config_from_dict(state_document(servers, url, namespace, **llm), env={})


def wait_for(condition: Callable[[], object], bound: float, what: str) -> float:
    """Poll ``condition`` until it holds; the seconds it took. AssertionError after ``bound`` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > bound:
            raise AssertionError(f"not within {bound:.2f} s: {what}")
        time.sleep(0.005)
    return time.monotonic() - started


def connected(*routers: Router, bound: float = 5.0) -> None:
    """Wait until every router has exchanged state with Redis once."""
    wait_for(lambda: all(r.state.status()["connected"] for r in routers), bound, "routers connected to Redis")


class Replica:
    """An app replica in a process of its own (``python -m tests.fleet``), with its own Router."""

    def __init__(self, document: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet", json.dumps(document)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"replica {self.proc.pid} ended (exit {self.proc.poll()})")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def replicas(document: dict[str, Any], n: int) -> Iterator[list[Replica]]:
    started = [Replica(document) for _ in range(n)]
    try:
        for replica in started:  # each answers once it has imported and built its router: the tests' time
            replica.ask("status")  # bounds then cover what they name (a sync, a breaker), not interpreter starts
        yield started
    finally:
        for replica in started:
            replica.close()


def _serve(router: Router) -> None:
    held: list[threading.Thread] = []
    for line in sys.stdin:
        command, *args = line.split()
        if command == "status":
            answer: Any = {
                **router.state.status(),
                "breakers": {name: str(r.breaker.state) for name, r in router.routes.items()},
                "elsewhere": {name: r.elsewhere.in_flight for name, r in router.routes.items()},
            }
        elif command == "chat":
            served: dict[str, int] = {}
            failed = 0
            for _ in range(int(args[0])):
                try:
                    info = call_info(router.chat(USER))
                    name = info.route if info is not None and info.route else "?"
                    served[name] = served.get(name, 0) + 1
                except Exception:
                    failed += 1
            answer = {"served": served, "failed": failed}
        elif command == "hold":
            route, count = args[0], int(args[1])
            for _ in range(count):
                thread = threading.Thread(target=_quietly, args=(router, route), daemon=True)
                thread.start()
                held.append(thread)
            stats = router.routes[route].stats
            wait_for(lambda: stats.in_flight >= count, 10, "held requests in flight")  # noqa: B023 - read at once
            answer = {"in_flight": stats.in_flight}
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


def _quietly(router: Router, route: str) -> None:
    with contextlib.suppress(Exception):
        router.chat(USER, route=route)


def main() -> None:
    router = Router(config_from_dict(json.loads(sys.argv[1]), env={}))
    try:
        _serve(router)
    finally:
        router.close()


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: servers and peers in their own processes, results files, machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _measure import MODEL

HERE = Path(__file__).parent
RESULTS = Path(os.environ.get("ANORAG_BENCH_RESULTS") or HERE / "results")
"""Where results go; the CI smoke run points this at a temporary folder."""
PEERS_PYTHON = Path(os.environ.get("ANORAG_PEERS_PYTHON") or HERE.parent / ".venv-peers" / "bin" / "python")
"""The virtualenv holding the peers that pin openai<3 (``make bench`` creates it)."""
CLIENT_CPU = 0
"""Clients (ours and the peers' process) run on this core; servers on the others, when there are any."""

__all__ = ["MODEL", "Peers", "Server", "fault_server", "pin_client", "save"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# A benchmark stopped by SIGTERM (`timeout`, a test's cleanup) unwinds like Ctrl-C, so the servers it
# started in its own processes are stopped by their ``finally`` blocks instead of outliving it.
signal.signal(signal.SIGTERM, _interrupt)


def _server_cpus() -> set[int]:
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    return (cpus - {CLIENT_CPU}) or cpus


def pin_client() -> str:
    """Pin this process (and the peers' process it starts) to one core; say which cores run what."""
    if not hasattr(os, "sched_setaffinity") or len(_server_cpus()) == len(os.sched_getaffinity(0)):
        return f"{os.cpu_count()} cores shared by clients and servers"
    servers = _server_cpus()
    os.sched_setaffinity(0, {CLIENT_CPU})
    return f"client pinned to core {CLIENT_CPU}; servers (own processes) on cores {sorted(servers)}"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]


@contextlib.contextmanager
def fault_server(delay: float = 0.0, *options: str) -> Iterator[Server]:
    """A vLLM-shaped server in its own process (its own event loop and interpreter), off the client's core.

    ``options`` are more command-line flags of ``python -m anorag_integrations.testing`` (faults, slots).
    """
    command = [sys.executable, "-m", "anorag_integrations.testing", "--model", MODEL, "--delay", str(delay), *options]
    cpus = _server_cpus()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, cpus)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        yield Server(line.split()[1], proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a benchmark may have hung it with SIGSTOP
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # still draining connections a hung phase left behind
            proc.kill()
            proc.wait(10)


class Peers:
    """The peers' worker process (``_peers.py`` in ``.venv-peers``); ``None`` answers when it is missing."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.missing = f"{PEERS_PYTHON} not found: run `make bench` (it creates .venv-peers)"
        if PEERS_PYTHON.exists():
            self.proc = subprocess.Popen(
                [str(PEERS_PYTHON), str(HERE / "_peers.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            self.missing = ""
        else:
            print("peers not measured:", self.missing, file=sys.stderr)

    def ask(self, **command: Any) -> Any:
        if self.proc is None:
            return None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "peers process ended"}')
        if "error" in answer:
            raise RuntimeError(f"peer command {command['op']} failed: {answer['error']}")
        return answer["ok"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def machine(cores: str = "") -> dict[str, Any]:
    packages = ("openai", "langchain-core", "langchain-openai", "llama-index-core", "anorag-integrations")
    versions = {}
    for name in packages:
        with contextlib.suppress(Exception):
            versions[name] = version(name)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; {cores or 'client and servers share them'}",
        "python": platform.python_version(),
        "versions": versions,
    }


def save(name: str, results: Any, cores: str = "", **settings: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": {**machine(cores), **settings}, "results": results}, indent=2))
    return path

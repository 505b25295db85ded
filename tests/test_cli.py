"""The anorag-llm console script: healthcheck exit codes and clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anorag_integrations.cli import main
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL


def write_config(tmp_path: Path, servers: dict[str, FaultServer]) -> Path:
    routes = {name: {"base_url": s.base_url, "model": MODEL, "timeout": 2} for name, s in servers.items()}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"provider": "vllm_openai", "routes": routes}}))
    return path


def test_healthcheck_all_healthy(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, servers)
    assert main(["--config", str(path), "healthcheck"]) == 0
    out = capsys.readouterr().out
    assert "3/3 routes healthy" in out and "default route: a" in out


def test_healthcheck_json_and_failing_exit_status(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    servers["b"].set_fault(Fault.REFUSE)
    path = write_config(tmp_path, servers)
    assert main(["--config", str(path), "healthcheck", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["healthy"], data["total"]) == (2, 3)
    assert data["routes"]["b"]["healthy"] is False and "cannot connect" in data["routes"]["b"]["error"]


def test_bad_config_is_one_clear_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("llm:\n  routes:\n    a: {base_url: 'gpu1:8000', model: x}\n")
    result = subprocess.run(
        [sys.executable, "-m", "anorag_integrations.cli", "--config", str(path), "healthcheck"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}: llm.routes.a.base_url: not an http(s) URL" in result.stderr
    assert "Traceback" not in result.stderr

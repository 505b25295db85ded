"""``anorag-llm demo`` without a config file (a pip install has none): the built-in config, equal to the
repository's ``config.yaml``; a file, ``--config`` or ``$ANORAG_CONFIG`` still wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anorag_integrations.cli import main
from anorag_integrations.cli.demo import BUILT_IN, _local_servers, demo_config
from anorag_integrations.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bare_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without config.yaml, and no variable naming a config or a route."""
    for name in ("ANORAG_CONFIG", "VLLM_BASE_URL", "VLLM_MODEL", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_without_a_config_file_the_demo_runs_on_the_shipped_config_built_in(bare_cwd: Path) -> None:
    config = demo_config(None)
    assert config.source == BUILT_IN
    shipped = load_config(ROOT / "config.yaml", env={})
    assert config.model_dump(exclude={"source"}) == shipped.model_dump(exclude={"source"})
    assert [(server.port, server.alias) for server in _local_servers(config)] == [(8201, "smollm2"), (8202, "smollm2")]


def test_a_config_file_here_or_named_wins_over_the_built_in_one(
    bare_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = {
        name: {"base_url": f"http://127.0.0.1:{port}/v1", "model": "smollm2"}
        for name, port in (("x", 9301), ("y", 9302))
    }
    (bare_cwd / "config.yaml").write_text(yaml.safe_dump({"llm": {"routes": routes}}))
    assert [s.port for s in _local_servers(demo_config(None))] == [9301, 9302]
    assert demo_config(None).source == "config.yaml"
    monkeypatch.setenv("ANORAG_CONFIG", str(bare_cwd / "missing.yaml"))  # named, so a missing file stays an error
    with pytest.raises(ConfigError, match="config file not found"):
        demo_config(None)
    with pytest.raises(ConfigError, match="config file not found"):
        demo_config(str(bare_cwd / "other.yaml"))


def test_the_demo_without_a_config_file_goes_on_to_vllm_and_says_how_to_set_it_up(
    bare_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the config (once "config file not found"): with no vLLM virtualenv it names `anorag-llm setup`."""
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(bare_cwd / "no-vllm"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(bare_cwd / "cache"))  # no prepared model: vLLM's Python is needed
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert f"config: {BUILT_IN} (no ./config.yaml): 2 local vLLM servers on ports 8201, 8202" in out
    assert "config file not found" not in err
    assert "step 'vLLM environment' failed" in err and "anorag-llm setup" in err and "make vllm" in err
    assert "Traceback" not in err

"""Both notebooks execute headless against real local servers; the committed copies carry no outputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["compare_providers.ipynb", "rag_pipeline.ipynb"])
def test_committed_notebooks_are_stripped(name: str) -> None:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"


def execute(name: str, figures: Path) -> Any:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return book


def text_of(book: Any) -> str:
    return "\n".join(out.get("text", "") for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.live
def test_compare_providers_live(llama_servers: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    routes = {f"llama{i}": {"base_url": s.base_url, "model": s.alias} for i, s in enumerate(llama_servers)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"llm": {"routes": routes}}))
    monkeypatch.setenv("ANORAG_CONFIG", str(config))
    monkeypatch.setenv("ANORAG_FIGURES", str(tmp_path))
    out = text_of(execute("compare_providers.ipynb", tmp_path))
    assert "LIVE run" in out and "(c) skipped: no llm.ollama section" in out
    for client in ("ChatOpenAI (1 server)", "ChatVLLMRouted least_latency", "VLLMRouted (LlamaIndex)"):
        assert client in out
    assert (tmp_path / "compare_providers.png").stat().st_size > 10_000
    assert (tmp_path / "bench_offline.png").exists()


def test_compare_providers_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server answers: the notebook still runs, from the committed bench results."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"llm": {"routes": {"gone": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}}})
    )
    monkeypatch.setenv("ANORAG_CONFIG", str(config))
    monkeypatch.setenv("ANORAG_FIGURES", str(tmp_path))
    out = text_of(execute("compare_providers.ipynb", tmp_path))
    assert "OFFLINE from" in out and not (tmp_path / "compare_providers.png").exists()
    assert (tmp_path / "bench_offline.png").stat().st_size > 10_000


@pytest.mark.live
def test_rag_pipeline_runs_on_the_fleet_and_survives_a_route_going_down(vllm_room: None) -> None:
    """The notebook starts two vLLM chat servers and a pooling server (``vllm_room`` makes room for them)."""
    pytest.importorskip("sentence_transformers")
    out = text_of(execute("rag_pipeline.ipynb", Path()))
    assert out.count("retrieved: mars.txt") == 2  # before and after the kill
    lowest = re.search(r"lowest cosine fleet vs sentence-transformers ([\d.]+)", out)
    assert lowest is not None and float(lowest.group(1)) >= 0.999, out
    assert "killed the server behind vllm_0" in out
    assert "vllm_0  NO" in out  # the health table after

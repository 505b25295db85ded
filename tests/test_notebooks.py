"""Both notebooks are committed executed, and re-executed here headless (nbclient) against real local servers.

Outputs are checked for their shape, never their bytes (timings and ports differ from run to run): the
tables have one row per client or route, the plot cells produced a PNG, the RAG run found its documents.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from anorag_integrations.testing import FaultServer

ROOT = Path(__file__).parent.parent
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
MAX_PNG_BYTES = 100_000
CLIENTS = [
    "ChatOpenAI (1 server)",
    "ChatVLLMRouted round_robin",
    "ChatVLLMRouted least_latency",
    "ChatVLLMRouted least_outstanding",
    "VLLMRouted (LlamaIndex)",
]
"""The comparison's rows, in order, where no Ollama is configured."""
BENCH_RUNS = len(json.loads((DOCS / "bench_sweep_local.json").read_text())["runs"])
WRITTEN_BEFORE = ("compare_providers.png", "compare_providers.json", "bench_offline.png")
"""What the notebook wrote into docs/ before it showed its results inline (docs pages still use them)."""


def execute(name: str) -> Any:
    """The committed notebook, executed in memory (nbclient replaces each cell's outputs as it runs it)."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return book


def outputs(book: Any) -> list[Any]:
    return [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(book: Any) -> str:
    return "\n".join(out.get("text", "") for out in outputs(book) if out.output_type == "stream")


def tables(book: Any) -> list[list[dict[str, str]]]:
    """Every Markdown table the notebook displayed, as rows keyed by its header."""
    found = []
    for out in outputs(book):
        markdown = out.get("data", {}).get("text/markdown")
        if markdown is None:
            continue
        header, _, *lines = [
            [cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.splitlines()
        ]
        found.append([dict(zip(header, line, strict=True)) for line in lines])
    return found


def pngs(book: Any) -> list[bytes]:
    return [base64.b64decode(out.data["image/png"]) for out in outputs(book) if "image/png" in out.get("data", {})]


def check_compare(book: Any, *, routes: dict[str, str], live: bool) -> None:
    """Routes listed (name -> kind); when live, one comparison row per client, all answered, and its plot; then
    the recorded bench run, one row per concurrency, and its plot."""
    found = tables(book)
    assert {row["route"]: row["kind"] for row in found[0]} == routes
    if live:
        comparison = found[1]
        assert [row["client"] for row in comparison] == CLIENTS
        assert all(row["success_rate"] == "1.0" for row in comparison), comparison
    assert len(found[-1]) == BENCH_RUNS and "concurrency" in found[-1][0]
    assert len(found) == 2 + live
    images = pngs(book)
    assert len(images) == 1 + live
    assert all(image.startswith(b"\x89PNG") and 10_000 < len(image) < MAX_PNG_BYTES for image in images)


def check_rag(text: str) -> None:
    assert text.count("retrieved: mars.txt") == 2, text  # before and after the kill
    lowest = re.search(r"lowest cosine fleet vs sentence-transformers ([\d.]+)", text)
    assert lowest is not None and float(lowest.group(1)) >= 0.999, text
    assert "killed the server behind vllm_0" in text
    assert "vllm_0  NO" in text  # the health table after


@pytest.mark.parametrize("name", ["compare_providers.ipynb", "rag_pipeline.ipynb"])
def test_committed_notebooks_carry_their_outputs_and_nothing_volatile(name: str) -> None:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    cells = [cell for cell in book.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "execute it top to bottom"
    assert not [out for out in outputs(book) if out.output_type == "error" or out.get("name") == "stderr"]
    assert all("execution" not in cell.metadata for cell in book.cells), "execution timestamps"
    assert book.metadata.get("language_info") == {"name": "python"}, "the kernel's version and paths"
    assert all(len(image) < MAX_PNG_BYTES for image in pngs(book))
    if name == "compare_providers.ipynb":  # run live on the README's config: chat routes and an embedding route
        check_compare(book, routes={"gpu1": "chat", "gpu2": "chat", "embed1": "embedding"}, live=True)
    else:
        check_rag(text_of(book))


@pytest.mark.live
def test_compare_providers_live_on_the_readmes_mixed_config(
    llama_servers: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's config: two chat routes and a route of ``kind: embedding`` (a pooling server's stand-in).

    Results show inline only: nothing is written into docs/ unless ``ANORAG_FIGURES`` asks for it.
    """
    before = {name: (DOCS / name).stat().st_mtime_ns for name in WRITTEN_BEFORE}
    with FaultServer("minilm") as pooling:
        routes: dict[str, Any] = {
            f"gpu{i + 1}": {"base_url": s.base_url, "model": s.alias} for i, s in enumerate(llama_servers)
        }
        routes["embed1"] = {"base_url": pooling.base_url, "model": "minilm", "kind": "embedding"}
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"llm": {"routes": routes, "lb_policy": "least_outstanding"}}))
        monkeypatch.setenv("ANORAG_CONFIG", str(config))
        monkeypatch.delenv("ANORAG_FIGURES", raising=False)
        book = execute("compare_providers.ipynb")
    out = text_of(book)
    assert f"config {config}: every chat route answers: LIVE run" in out  # this run's, not the committed outputs
    assert "(c) skipped: no llm.ollama section" in out
    check_compare(book, routes={"gpu1": "chat", "gpu2": "chat", "embed1": "embedding"}, live=True)
    assert {name: (DOCS / name).stat().st_mtime_ns for name in WRITTEN_BEFORE} == before


def test_compare_providers_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server answers: the notebook still runs, from the committed bench results; ``ANORAG_FIGURES`` saves them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"llm": {"routes": {"gone": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}}})
    )
    monkeypatch.setenv("ANORAG_CONFIG", str(config))
    monkeypatch.setenv("ANORAG_FIGURES", str(tmp_path))
    book = execute("compare_providers.ipynb")
    assert f"config {config}: a chat route does not answer: OFFLINE from" in text_of(book)
    check_compare(book, routes={"gone": "chat"}, live=False)
    assert (tmp_path / "bench_offline.png").stat().st_size > 10_000
    assert not (tmp_path / "compare_providers.png").exists()


@pytest.mark.live
def test_rag_pipeline_runs_on_the_fleet_and_survives_a_route_going_down(vllm_room: None) -> None:
    """The notebook starts two vLLM chat servers and a pooling server (``vllm_room`` makes room for them)."""
    pytest.importorskip("sentence_transformers")
    check_rag(text_of(execute("rag_pipeline.ipynb")))

"""Execute notebooks headless and save them with their outputs, less what changes from run to run.

    ANORAG_CONFIG=config.yaml python notebooks/save_executed.py compare_providers.ipynb
    python notebooks/save_executed.py rag_pipeline.ipynb       # starts its own vLLM servers

Run it with the servers a notebook needs answering (``compare_providers``: every chat route of the
config, e.g. after ``anorag-llm servers start cpu --embeddings``). Kept: every output, inline pictures
included. Left out: nbclient's execution timestamps and the kernel's version details. Nothing else is
written: ``ANORAG_FIGURES=DIR`` in the environment also saves ``compare_providers``' figures into DIR
(``ANORAG_FIGURES=docs`` renews the pictures the docs show). ``tests/test_notebooks.py`` checks the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
TIMEOUT_S = 600
"""The longest one cell may run (``rag_pipeline`` waits for three vLLM servers to load)."""


def save_executed(path: Path) -> None:
    """Run ``path`` top to bottom in a fresh kernel, in its own folder, and write it back with its outputs."""
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    book.metadata["language_info"] = {"name": "python"}
    for cell in book.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(book, path)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["compare_providers.ipynb", "rag_pipeline.ipynb"]:
        save_executed(HERE / name)
        print("saved", HERE / name)

"""``python -m anorag_integrations.cli`` runs the ``anorag-llm`` console script."""

from __future__ import annotations

from . import run

run()

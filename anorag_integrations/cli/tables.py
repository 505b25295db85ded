"""Plain-text tables for the health and stats views (no extra dependency)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *, key: str = "route") -> str:
    """Rows keyed by route name, one column per requested field, aligned."""
    header = [key, *columns]
    body = [[name, *(_cell(row.get(col)) for col in columns)] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


HEALTH_COLUMNS = ("healthy", "state", "kind", "latency_ms", "serves", "max_model_len", "url")
STATS_COLUMNS = (
    "requests",
    "successes",
    "failures",
    "in_flight",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "tokens_per_s",
)

"""What both framework adapters take from a router call: request keywords, reasoning text, call facts."""

from __future__ import annotations

from typing import Any

from .router import CallInfo

ADAPTER_PARAMS = ("temperature", "max_tokens", "top_p", "timeout", "max_retries", "route")
"""Adapter fields passed to the router as they are (when set)."""


def router_params(adapter: object, *, model: str | None) -> dict[str, Any]:
    """The router keywords an adapter's own fields give (unset ones left to the config)."""
    params = {name: getattr(adapter, name) for name in ADAPTER_PARAMS}
    params["model"] = model
    return {key: value for key, value in params.items() if value is not None}


def reasoning_text(obj: Any) -> str | None:
    """vLLM's reasoning text on a message or delta: ``reasoning`` (current) or ``reasoning_content`` (older)."""
    extra = getattr(obj, "model_extra", None) or {}
    value = extra.get("reasoning") or extra.get("reasoning_content")
    return value if isinstance(value, str) and value else None


def call_metadata(info: CallInfo | None) -> dict[str, Any]:
    """How the router served a call: route, attempts, failed routes, latency, time to first token."""
    if info is None:
        return {}
    return {
        "route": info.route,
        "attempts": len(info.attempts) + 1,
        "failed_routes": [a.route for a in info.attempts],
        "latency_s": info.latency_s,
        "ttft_s": info.ttft_s,
    }

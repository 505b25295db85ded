"""What both framework adapters share: the router they use, request keywords, reasoning text, call facts."""

from __future__ import annotations

import os
from os import PathLike
from typing import Any

from openai.types import CreateEmbeddingResponse
from pydantic import SecretStr

from .router import CallInfo, Router

API_KEY_ENV = "VLLM_API_KEY"
"""The default route's key (applied by the config loader), and the key of a single ``base_url`` server."""
ADAPTER_PARAMS = ("temperature", "max_tokens", "top_p", "timeout", "max_retries", "route")
"""Adapter fields passed to the router as they are (when set)."""
FRAMEWORK_EXTRAS = {
    "langchain_core": ("langchain-core", "langchain"),
    "llama_index": ("llama-index-core", "llama-index"),
}
"""Each framework an adapter builds on, by its top-level module: its package, and the extra that installs it."""


def framework_missing(error: ModuleNotFoundError, needed_by: str) -> ModuleNotFoundError | None:
    """The error to raise instead of ``error`` when the missing module is an adapter's framework: it names the extra.

    The base install is the router alone, so ``No module named 'langchain_core'`` is what a user meets
    first; ``None`` when another module is missing, whose error stays as it is.
    """
    top = (error.name or "").partition(".")[0]
    if top not in FRAMEWORK_EXTRAS:
        return None
    package, extra = FRAMEWORK_EXTRAS[top]
    return ModuleNotFoundError(
        f"{needed_by} needs {package}, which is not installed: pip install 'anorag-integrations[{extra}]'",
        name=error.name,
    )


def router_params(adapter: object, *, model: str | None) -> dict[str, Any]:
    """The router keywords an adapter's own fields give (unset ones left to the config)."""
    params = {name: getattr(adapter, name) for name in ADAPTER_PARAMS}
    params["model"] = model
    return {key: value for key, value in params.items() if value is not None}


def shared_router(
    config_path: str | PathLike[str] | None,
    *,
    base_url: str | None,
    model: str | None,
    api_key: SecretStr | None,
    kind: str = "chat",
) -> Router:
    """The process-wide router of an adapter; ``api_key``, passed explicitly, replaces every route's key.

    ``$VLLM_API_KEY`` is not passed on as an every-route key: the config loader gives it to the default
    route only, and adapters built from one config share one router. With ``base_url`` the single
    server is the default route, so the variable is its key.
    """
    key = api_key.get_secret_value() if api_key is not None else None
    if base_url is not None and key is None:
        key = os.environ.get(API_KEY_ENV) or None
    return Router.shared(config_path, base_url=base_url, model=model, api_key=key, kind=kind)


def embedding_route(router: Router, route: str | None) -> str | None:
    """Check that ``route`` (when given) is an embedding route of ``router``; ValueError naming the choices."""
    if route is None:
        return None
    names = router.config.route_names("embedding")
    if route not in names:
        raise ValueError(f"route {route!r} is not among the embedding routes ({', '.join(names) or 'none'})")
    return route


def embedding_model(router: Router, route: str | None, model: str | None) -> str:
    """The model an embeddings adapter names: its own, else its route's, else the default embedding route's."""
    config = router.config
    name = route or config.default_route_of("embedding")
    return model or (config.routes[name].model if name is not None else "")


def embedding_params(adapter: object, *, model: str | None, batch_size: int | None) -> dict[str, Any]:
    """The router keywords of an embeddings adapter's call: its fields that are set."""
    params = {name: getattr(adapter, name) for name in ("route", "timeout", "max_retries", "truncate")}
    params.update(model=model, batch_size=batch_size)
    return {key: value for key, value in params.items() if value is not None}


def vectors(response: CreateEmbeddingResponse) -> list[list[float]]:
    """The response's vectors as plain lists, in input order."""
    return [list(item.embedding) for item in response.data]


def reasoning_text(obj: Any) -> str | None:
    """vLLM's reasoning text on a message or delta: ``reasoning`` (current) or ``reasoning_content`` (older)."""
    extra = getattr(obj, "model_extra", None) or {}
    value = extra.get("reasoning") or extra.get("reasoning_content")
    return value if isinstance(value, str) and value else None


def call_metadata(info: CallInfo | None) -> dict[str, Any]:
    """How the router served a call: route, attempts, failed routes, latency, time to first token, and the
    model: the one asked for, the one that served (sent to the route), and why they differ when they do."""
    if info is None:
        return {}
    metadata: dict[str, Any] = {
        "route": info.route,
        "attempts": len(info.attempts) + 1,
        "failed_routes": [a.route for a in info.attempts],
        "latency_s": info.latency_s,
        "ttft_s": info.ttft_s,
        "requested_model": info.requested_model,
        "served_model": info.model,
    }
    if info.fallback_reason:
        metadata["model_fallback"] = info.fallback_reason
        metadata["models_tried"] = list(info.models_tried)
    return metadata

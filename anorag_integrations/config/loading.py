"""From a parsed document to a validated ``Config``: both layouts, env overrides, errors as key paths.

Either ``llm:`` layout, ``fallback_to_ollama`` (a route built from the ``llm.ollama`` section), the
``VLLM_*`` overrides of the default route, and pydantic's errors turned into key paths that never
echo a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..router.errors import ConfigError
from ..router.secrets import clip, is_secret_key, preview
from .files import read_document
from .model import Config

ENV_ROUTE_OVERRIDES = {"VLLM_BASE_URL": "base_url", "VLLM_MODEL": "model", "VLLM_API_KEY": "api_key"}
OTHER_PROVIDER_SECTIONS = frozenset({"ollama", "multi_ollama", "openai"})
"""Sibling sections under ``llm:`` that belong to other providers; the router leaves them alone."""
ROUTER_KEYS = frozenset(
    {
        "routes",
        "default_route",
        "fallback_route",
        "default_embedding_route",
        "fallback_embedding_route",
        "fallbacks",
        "context_window_fallbacks",
        "embedding",
        "lb_policy",
        "params",
        "health",
        "fallback_to_ollama",
        "prefix_affinity",
        "prefix_aware",
        "least_queue",
        "hedge",
        "observability",
        "state",
    }
)
OLLAMA_FALLBACK_ROUTE = "ollama"
"""Name of the route ``fallback_to_ollama: true`` builds from the ``llm.ollama`` section."""


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path``, else ``$ANORAG_CONFIG``, else ``./config.yaml``; apply env overrides; validate."""
    env = os.environ if env is None else env
    data, source = read_document(path, env=env)
    return config_from_dict(data, source=source, env=env)


def config_from_dict(data: object, *, source: str = "<dict>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed config document (the whole file, with its ``llm:`` key)."""
    env = os.environ if env is None else env
    section, prefix = _router_section(data, source)
    section = dict(section)
    if section.pop("fallback_to_ollama", False):
        _add_ollama_fallback(section, data, prefix, source)
    from_env = _apply_env(section, prefix, env)
    try:
        return Config.model_validate({**section, "source": source})
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err, prefix, from_env) for err in exc.errors()]) from None


def _router_section(data: object, source: str) -> tuple[dict[str, Any], str]:
    """Find the router's keys in either layout; return them and their key-path prefix."""
    if data is None:
        raise ConfigError(source, [("llm", "missing: the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    llm = data.get("llm")
    if not isinstance(llm, dict):
        got = "missing" if llm is None else f"expected a mapping, got {type(llm).__name__}"
        raise ConfigError(source, [("llm", got)])
    problems = [
        (
            f"llm.{clip(str(key))}",
            f"unknown key; expected one of {', '.join(sorted(ROUTER_KEYS | {'provider', 'vllm_openai'}))}",
        )
        for key in llm
        if key not in ROUTER_KEYS | OTHER_PROVIDER_SECTIONS | {"provider", "vllm_openai"}
    ]
    if "vllm_openai" in llm:
        nested = llm["vllm_openai"]
        if not isinstance(nested, dict):
            problems.append(("llm.vllm_openai", f"expected a mapping, got {type(nested).__name__}"))
        problems += [
            (f"llm.{clip(str(key))}", "with the llm.vllm_openai layout this key belongs under llm.vllm_openai")
            for key in llm
            if key in ROUTER_KEYS
        ]
        if problems:
            raise ConfigError(source, problems)
        section = {k: v for k, v in nested.items()}
        if "provider" in llm:
            section.setdefault("provider", llm["provider"])
        return section, "llm.vllm_openai"
    if problems:
        raise ConfigError(source, problems)
    return {k: v for k, v in llm.items() if k not in OTHER_PROVIDER_SECTIONS}, "llm"


def _add_ollama_fallback(section: dict[str, Any], data: Any, prefix: str, source: str) -> None:
    """``fallback_to_ollama: true``: the ``llm.ollama`` host becomes the route tried when no vLLM route is."""
    ollama = data["llm"].get("ollama")
    if not isinstance(ollama, dict) or not ollama.get("model"):
        raise ConfigError(
            source, [(f"{prefix}.fallback_to_ollama", "needs an llm.ollama section with at least model:")]
        )
    route = {"api": "ollama", "base_url": ollama.get("base_url", "http://localhost:11434"), "model": ollama["model"]}
    route.update({k: ollama[k] for k in ("options", "keep_alive", "timeout") if k in ollama})
    routes = section.get("routes")
    section["routes"] = {**(routes if isinstance(routes, dict) else {}), OLLAMA_FALLBACK_ROUTE: route}
    section.setdefault("fallback_route", OLLAMA_FALLBACK_ROUTE)


def _apply_env(section: dict[str, Any], prefix: str, env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Write VLLM_* overrides into the default (chat) route; return {key path: env var} for error messages."""
    overrides = {key: env[var] for var, key in ENV_ROUTE_OVERRIDES.items() if env.get(var)}
    routes = section.get("routes")
    if not overrides or not isinstance(routes, dict) or not routes:
        return {}
    name = section.get("default_route")
    if not isinstance(name, str) or name not in routes:
        chat = [n for n, r in routes.items() if not (isinstance(r, dict) and r.get("kind") == "embedding")]
        name = next(iter(chat or routes))
    route = routes[name]
    if route is None:
        route = {}
    if not isinstance(route, dict):
        return {}
    section["routes"] = {**routes, name: {**route, **overrides}}
    by_key = {key: var for var, key in ENV_ROUTE_OVERRIDES.items()}
    return {("routes", name, key): by_key[key] for key in overrides}


def _describe(err: Any, prefix: str, from_env: dict[tuple[str, ...], str]) -> tuple[str, str]:
    """One pydantic error as (key path, message); secrets are never echoed back."""
    loc = tuple(str(part) for part in err["loc"])
    message: str = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    kind = err["type"]
    if kind == "missing":
        message = "missing (required)"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "too_short" and loc == ("routes",):
        message = "no routes defined; add at least one under routes:"
    elif not any(is_secret_key(part) for part in loc) and not kind.startswith("value_error") and "input" in err:
        message = f"{message} (got {preview(err['input'])})"
    key = ".".join((prefix, *map(clip, loc))) if loc else prefix
    if loc[:3] in from_env:
        key += f" (from ${from_env[loc[:3]]})"
    # A model-level check (default_route, fallback_route) names its own key in the message.
    if not loc and ":" in message:
        field, _, message = message.partition(": ")
        key = f"{prefix}.{field}"
    return key, message

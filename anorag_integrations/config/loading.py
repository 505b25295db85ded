"""From a parsed document to a validated ``Config``: both layouts, env overrides, errors as key paths.

Either ``llm:`` layout, ``fallback_to_ollama`` (a route built from the ``llm.ollama`` section), the
``VLLM_*`` overrides of the default route, and pydantic's errors turned into key paths that never
echo a secret.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

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
        "discovery",
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
        "admission",
        "retry_budget",
    }
)
MAX_MISSPELLING = 64
"""Longest unknown key matched against the known ones for a "did you mean": a longer one is no typo."""
OLLAMA_FALLBACK_ROUTE = "ollama"
"""Name of the route ``fallback_to_ollama: true`` builds from the ``llm.ollama`` section."""


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path``, else ``$ANORAG_CONFIG``, else ``./config.yaml``; apply env overrides; validate."""
    env = os.environ if env is None else env
    data, source = read_document(path, env=env)
    return config_from_dict(data, source=source, env=env)


def config_from_dict(data: object, *, source: str = "<dict>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed config document (the whole file, with its ``llm:`` key).

    Every problem found is reported in one ``ConfigError``: an unknown key does not hide the others.
    """
    env = os.environ if env is None else env
    problems: list[tuple[str, str]] = []
    section, prefix = _router_section(data, source, problems)
    if section.pop("fallback_to_ollama", False):
        _add_ollama_fallback(section, data, prefix, problems)
    from_env = _apply_env(section, prefix, env)
    try:
        config = Config.model_validate({**section, "source": source})
    except ValidationError as exc:
        problems += validation_problems(exc, prefix=prefix, from_env=from_env, root=Config)
    if problems:
        raise ConfigError(source, problems)
    return config


def _router_section(data: object, source: str, problems: list[tuple[str, str]]) -> tuple[dict[str, Any], str]:
    """Find the router's keys in either layout; return them and their key-path prefix.

    Unknown or misplaced keys are added to ``problems`` and left out, so the rest is still checked;
    only a document with no router section to check raises here.
    """
    if data is None:
        raise ConfigError(source, [("llm", "missing: the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    llm = data.get("llm")
    if not isinstance(llm, dict):
        got = "missing" if llm is None else f"expected a mapping, got {type(llm).__name__}"
        raise ConfigError(source, [("llm", got)])
    known = ROUTER_KEYS | OTHER_PROVIDER_SECTIONS | {"provider", "vllm_openai"}
    problems += [
        (f"llm.{clip(str(key))}", unknown_key(str(key), known, shown=ROUTER_KEYS | {"provider", "vllm_openai"}))
        for key in llm
        if key not in known
    ]
    if "vllm_openai" not in llm:
        return {k: v for k, v in llm.items() if k in ROUTER_KEYS | {"provider"}}, "llm"
    nested = llm["vllm_openai"]
    problems += [
        (f"llm.{clip(str(key))}", "with the llm.vllm_openai layout this key belongs under llm.vllm_openai")
        for key in llm
        if key in ROUTER_KEYS
    ]
    if not isinstance(nested, dict):
        raise ConfigError(source, [*problems, ("llm.vllm_openai", f"expected a mapping, got {type(nested).__name__}")])
    section = dict(nested)
    if "provider" in llm:
        section.setdefault("provider", llm["provider"])
    return section, "llm.vllm_openai"


def unknown_key(key: str, known: Collection[str], *, shown: Collection[str] | None = None) -> str:
    """The message for an unknown ``key``: the known key it likely misspells, else the keys ``shown`` (all known)."""
    close = difflib.get_close_matches(key, list(known), n=1) if len(key) <= MAX_MISSPELLING else []
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of {clip(', '.join(sorted(known if shown is None else shown)))}"


def _add_ollama_fallback(section: dict[str, Any], data: Any, prefix: str, problems: list[tuple[str, str]]) -> None:
    """``fallback_to_ollama: true``: the ``llm.ollama`` host becomes the route tried when no vLLM route is."""
    ollama = data["llm"].get("ollama")
    if not isinstance(ollama, dict) or not ollama.get("model"):
        problems.append((f"{prefix}.fallback_to_ollama", "needs an llm.ollama section with at least model:"))
        return
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


def validation_problems(
    exc: ValidationError,
    *,
    prefix: str = "",
    from_env: Mapping[tuple[str, ...], str] | None = None,
    root: type[BaseModel] | None = None,
) -> list[tuple[str, str]]:
    """Pydantic's errors as (key path, message) pairs under ``prefix``; secrets are never echoed back.

    With ``root`` (the model validated), an unknown key gets the known key it likely misspells.
    """
    return [_describe(err, prefix, from_env or {}, root) for err in exc.errors()]


def _describe(
    err: Any, prefix: str, from_env: Mapping[tuple[str, ...], str], root: type[BaseModel] | None
) -> tuple[str, str]:
    """One pydantic error as (key path, message); secrets are never echoed back."""
    loc = tuple(str(part) for part in err["loc"])
    message: str = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    kind = err["type"]
    if kind == "missing":
        message = "missing (required)"
    elif kind == "extra_forbidden":
        known = _keys_at(root, loc[:-1]) if root is not None else []
        message = unknown_key(loc[-1], known) if known else "unknown key"
    elif kind == "too_short" and loc == ("routes",):
        message = "no routes defined; add at least one under routes:"
    elif (
        not any(is_secret_key(part) for part in loc)
        and not kind.startswith("value_error")
        and "input" in err
        and not (loc[:1] == ("routes",) and len(loc) == 2)  # a whole route given as text may hold its key
    ):
        message = f"{message} (got {preview(err['input'])})"
    key = _key_path(prefix, *map(clip, loc))
    if loc[:3] in from_env:
        key += f" (from ${from_env[loc[:3]]})"
    # A model-level check (default_route, fallback_route) names its own key in the message.
    if not loc and ":" in message:
        field, _, message = message.partition(": ")
        key = _key_path(prefix, field)
    return key, message


def _key_path(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _keys_at(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The keys the section at ``loc`` (a path under ``root``) takes; [] when ``loc`` is not a section."""
    annotation: Any = root
    for part in (*loc, None):
        annotation = _section_type(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part is None:
                return [name for name, field in annotation.model_fields.items() if not field.exclude]
            field = annotation.model_fields.get(part)
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict and part is not None:
            annotation = typing.get_args(annotation)[1]  # a mapping of sections (routes): the key is a name
        else:
            return []
    return []


def _section_type(annotation: Any) -> Any:
    """``X | None`` as ``X``; any other annotation as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation

"""What both framework adapters share: the router they use, request keywords, reasoning text, call facts."""

from __future__ import annotations

import base64
import difflib
import json
import os
import struct
import sys
import warnings
from collections.abc import Collection
from os import PathLike
from typing import Any

from openai.types import CreateEmbeddingResponse
from pydantic import SecretStr, ValidationError

from .config.loading import validation_problems
from .router import CallInfo, ConfigError, Router, RouterError
from .router.secrets import clip, is_secret_key

API_KEY_ENV = "VLLM_API_KEY"
"""The default route's key (applied by the config loader), and the key of a single ``base_url`` server."""
ADAPTER_PARAMS = ("temperature", "max_tokens", "top_p", "timeout", "max_retries", "route", "priority")
"""Adapter fields passed to the router as they are (when set)."""
FRAMEWORK_EXTRAS = {
    "langchain_core": ("langchain-core", "langchain"),
    "llama_index": ("llama-index-core", "llama-index"),
}
"""Each framework an adapter builds on, by its top-level module: its package, and the extra that installs it."""


SENT_ARGUMENTS = frozenset({"temperature", "max_tokens", "top_p", "stop", "stop_sequences", "model", "model_name"})
"""Adapter arguments the server receives: an unknown argument that looks like one of them is sent on (with a
warning), as ``ChatOpenAI`` does; one that looks like any other argument is a misspelling, and refused."""
REQUEST_PARAMETERS = frozenset(
    {
        "top_k", "min_p", "seed", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
        "top_logprobs", "logit_bias", "user", "min_tokens", "max_completion_tokens", "stop_token_ids", "ignore_eos",
        "response_format", "reasoning_effort", "chat_template_kwargs", "structured_outputs", "priority", "cache_salt",
        "truncate_prompt_tokens", "use_activation", "dimensions", "encoding_format", "session_id", "deadline",
    }
)  # fmt: skip
"""Request parameters of OpenAI's and vLLM's APIs (and the router's ``session_id``, ``deadline``): sent on with the
warning, but never taken for a misspelling (``top_k`` is not a misspelt ``top_p``)."""
MEANT_ARGUMENTS = {
    "config": "config_path",
    "config_file": "config_path",
    "api_base": "base_url",
    "openai_api_base": "base_url",
    "openai_api_key": "api_key",
}
"""Names other clients use, and the argument they mean here (``difflib`` finds closer misspellings)."""
MISSPELLING_CUTOFF = 0.75
"""How alike (``difflib``'s ratio) an unknown argument and a known one must be to be taken for its misspelling:
``timout`` and ``api_kye`` are, ``cache_salt`` (vLLM's) and ``cache`` (LangChain's) are not."""
_CALLER_PACKAGES = frozenset({"anorag_integrations", "pydantic", "pydantic_core", "langchain_core", "llama_index"})
"""Packages between a user's constructor call and the validator that warns: the warning names the user's line."""


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


def arguments_source(adapter: str) -> str:
    """What a ``ConfigError`` about an adapter's constructor arguments names instead of a file."""
    return f"{adapter} arguments"


def chat_route(adapter: str, router: Router, route: str | None) -> None:
    """Check that ``route`` (when given) is a route of ``router``; ``ConfigError`` naming the choices."""
    if route is not None and route not in router.routes:
        problem = f"route {clip(repr(route))} is not among the routes ({clip(', '.join(router.routes))})"
        raise ConfigError(arguments_source(adapter), [("", problem)])


def embedding_route(adapter: str, router: Router, route: str | None) -> str | None:
    """Check that ``route`` (when given) is an embedding route of ``router``; ``ConfigError`` naming the choices."""
    if route is None:
        return None
    names = router.config.route_names("embedding")
    if route not in names:
        problem = f"route {clip(repr(route))} is not among the embedding routes ({clip(', '.join(names)) or 'none'})"
        raise ConfigError(arguments_source(adapter), [("", problem)])
    return route


def arguments_error(adapter: str, exc: ValidationError) -> RouterError:
    """What an adapter raises for pydantic's ``exc``: the router's own error when a validator raised one (a
    config file's ``ConfigError``, ``NoRouteOfKindError``), else a ``ConfigError`` naming each bad argument."""
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, RouterError):
            return cause
    return ConfigError(arguments_source(adapter), validation_problems(exc))


def sort_arguments(adapter: str, data: dict[str, Any], known: Collection[str], extra: str) -> dict[str, Any]:
    """``data`` with each argument ``adapter`` does not take moved into its ``extra`` dict, sent to the server.

    As ``ChatOpenAI`` does, each one moved is warned of (by name: a value may be a secret). Raises a
    ``ConfigError`` listing the arguments that cannot be meant for the server: a likely misspelling of an
    argument that is not sent (``config=`` for ``config_path``), a name for a secret, a value that is not
    JSON, one given both ways.
    """
    unknown = [name for name in data if isinstance(name, str) and name not in known]
    given = data.get(extra)
    if not isinstance(given, dict | None):  # a bad extra= itself is pydantic's to report
        return data
    problems = _extra_problems(adapter, given or {}, known, extra)
    if not unknown and not problems:
        return data
    moved = dict(given or {})
    warned: list[str] = []
    for name in unknown:
        value = data[name]
        meant = MEANT_ARGUMENTS.get(name) or _misspells(name, known)
        if meant is not None and meant not in SENT_ARGUMENTS:
            problems.append((clip(name), _misspelt(adapter, name, meant, value)))
        elif _secret(name):
            problems.append((clip(name), f"not an argument of {adapter}; a secret is never sent (the key: api_key)"))
        elif "header" in name.lower():
            problems.append((clip(name), f"not an argument of {adapter}: headers are not set per adapter"))
        elif name in moved:
            problems.append((clip(name), f"given twice: as an argument and in {extra}"))
        elif not _json(value):
            kind = type(value).__name__
            problems.append((clip(name), f"not an argument of {adapter}, and a {kind} cannot be sent to the server"))
        else:
            moved[name] = value
            warned.append(f"{name!r}" + (f" (did you mean {meant!r}?)" if meant else ""))
    if problems:
        raise ConfigError(arguments_source(adapter), problems)
    if not warned:
        return data
    warnings.warn(
        f"{adapter}: {clip(', '.join(warned))} {'is not an argument' if len(warned) == 1 else 'are not arguments'}; "
        f"sent to the server with every request as {extra} (pass {extra}={{...}} to say so)",
        UserWarning,
        stacklevel=_callers_level(),
    )
    return {**{k: v for k, v in data.items() if k in known}, extra: moved}


def _extra_problems(adapter: str, given: dict[Any, Any], known: Collection[str], extra: str) -> list[tuple[str, str]]:
    """What is wrong in ``model_kwargs`` / ``additional_kwargs`` themselves: an argument of the adapter (pass it as
    one: it is checked there), a secret (it would go in the request body), a header."""
    problems = []
    for name in given:
        where = f"{extra}.{clip(str(name))}"
        if name in known:
            problems.append((where, f"an argument of {adapter}: pass {name}= itself (it is checked there)"))
        elif _secret(str(name)) or "header" in str(name).lower():
            problems.append(
                (where, "a secret or header would be sent in the request body; never sent (the key: api_key)")
            )
    return problems


def _secret(name: str) -> bool:
    """Whether an argument's name names a secret (``access_token``; not ``max_tokens`` or ``max_token``)."""
    return name not in REQUEST_PARAMETERS and not name.lower().startswith(("max_", "min_")) and is_secret_key(name)


def _misspells(name: str, known: Collection[str]) -> str | None:
    """The known argument ``name`` likely misspells; None for a request parameter (``top_k`` is not ``top_p``)."""
    if name in REQUEST_PARAMETERS:
        return None
    close = difflib.get_close_matches(name, known, n=1, cutoff=MISSPELLING_CUTOFF)
    return close[0] if close else None


def _misspelt(adapter: str, name: str, meant: str, value: object) -> str:
    """The problem of an argument ``name`` that stands for ``meant``, an argument the server never sees."""
    text = f"not an argument of {adapter}; did you mean {meant}?"
    if meant == "config_path" and isinstance(value, dict):
        text += f" (a config already read: {adapter}(router=Router.from_config({{...}})))"
    return text


def _json(value: object) -> bool:
    """Whether ``value`` can go in a JSON request body as it is."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _callers_level() -> int:
    """``warnings.warn``'s stacklevel that names the first caller outside this package and the frameworks."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _CALLER_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


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
    return [_floats(item.embedding) for item in response.data]


def _floats(embedding: object) -> list[float]:
    """One vector as floats: as sent, or decoded from the base64 text ``encoding_format="base64"`` asks for
    (little-endian float32, as vLLM and OpenAI send it): a framework's vector is never a string's characters."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return [float(value) for value in embedding]  # type: ignore[attr-defined]


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


def given_router(adapter: str, router: object) -> Router | None:
    """The ``router=`` an adapter was given (None: none), or ConfigError when it is no Router (a path given as the
    first argument: ``VLLMRouted("config.yaml")`` means ``config_path=``)."""
    if router is None or isinstance(router, Router):
        return router
    hint = " (a config file: config_path=...)" if isinstance(router, str | os.PathLike) else ""
    raise ConfigError(arguments_source(adapter), [("router", f"expected a Router, got {type(router).__name__}{hint}")])

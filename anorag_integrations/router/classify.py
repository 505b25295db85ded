"""How a failed call becomes a typed error: the openai SDK's exceptions and HTTP statuses mapped onto ``errors.py``.

The router acts on the class it gets back (fail over, raise at once, count against the breaker), so
one place decides it for every API a route speaks: ``classify`` for an exception from the SDK (or
from parsing its answer), ``status_error`` for a bare HTTP status (Ollama's native API), and
``trips_breaker`` for whether the failure is the route's own. ``Retry-After`` is read here too.

A 404 is one of two things: the server does not serve the model (an OpenAI error object; the route
leaves that model's group), or it has no such path (FastAPI's ``{"detail": "Not Found"}``: most often a
``base_url`` without ``/v1``), an ``EndpointNotFoundError`` that names the path and the likely fix.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    AuthenticationError,
    BadRequestError,
    ContextOverflowError,
    EndpointNotFoundError,
    MalformedResponse,
    ModelNotFoundError,
    RouteError,
    TransientRouteError,
    UnprocessableEntityError,
)
from .secrets import clip

_OVERFLOW_MARKERS = (
    "maximum context length",  # vLLM, OpenAI
    "exceed_context_size",  # llama.cpp's error type
    "exceeds the available context size",  # llama.cpp
    "exceeds the context length",  # Ollama's /api/embed
)
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
_NO_SUCH_PATH = frozenset({"not found", "404: not found", "404 page not found"})
"""404 bodies that say the path has no handler, whatever the model: FastAPI's ``{"detail": "Not Found"}`` (vLLM,
llama-cpp-python), aiohttp's and Go's plain text. A server's 404 for a model is an OpenAI error object instead."""


def _error_fields(body: object) -> tuple[str | None, str | None, int | None]:
    """(message, type, code) from an OpenAI/vLLM error body, whichever nesting it uses."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None, None, None
    code = body.get("code")
    message, kind = body.get("message"), body.get("type")
    return (
        message if isinstance(message, str) else None,
        kind if isinstance(kind, str) else None,
        code if isinstance(code, int) else None,
    )


def parse_retry_after(headers: object) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date), if present and sane.

    Negative values count as 0; ``inf`` and values past a day count as a day (the router caps them
    further with ``params.max_retry_after``); ``nan`` and garbage are ignored.
    """
    import email.utils
    import math
    import time

    get = getattr(headers, "get", None)
    if get is None:
        return None

    def bounded(seconds: float) -> float | None:
        if math.isnan(seconds):
            return None
        return min(max(0.0, seconds), RETRY_AFTER_CEILING_S)

    raw_ms = get("retry-after-ms")
    if raw_ms:
        try:
            return bounded(float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = get("retry-after")
    if not raw:
        return None
    try:
        return bounded(float(raw))
    except ValueError:
        try:
            parsed = email.utils.parsedate_tz(raw)
            return None if parsed is None else bounded(email.utils.mktime_tz(parsed) - time.time())
        except (ValueError, OverflowError, TypeError):
            return None


REFUSED = "its port refuses connections (the server stopped or is restarting)"
"""Why a route's attempts in flight are cut when a request or probe finds nothing listening there."""
RETRY_AFTER_CEILING_S = 86400.0
"""No ``Retry-After`` is taken as longer than a day, whatever the server says."""


def classify(exc: BaseException, *, route: str, url: str, model: str, timeout: float | None) -> RouteError:
    """Turn an exception from one call to a route into the typed error the router acts on."""
    import openai

    if isinstance(exc, RouteError):
        return exc
    where: dict[str, Any] = {"route": route, "url": url}
    if isinstance(exc, openai.APITimeoutError):
        return TransientRouteError(
            f"timed out after {timeout}s" if timeout else "timed out",
            hint="the server may be overloaded or hung; raise this route's `timeout` (or params.timeout) "
            "if long generations are expected",
            error_class="timeout",
            **where,
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        if "Connect" in type(cause).__name__:  # httpx ConnectError: refused, unreachable, DNS
            return TransientRouteError(
                f"cannot connect: {cause}",
                hint=f"is the server started and listening at {url}? check host and port "
                f"(try: curl {url.rstrip('/')}/models)",
                error_class="connect_error",
                **where,
            )
        return TransientRouteError(
            f"connection dropped: {type(cause).__name__}: {cause}",
            hint="the server closed or reset the connection mid-request; check its logs (crash, restart, proxy)",
            error_class="connection_dropped",
            **where,
        )
    if isinstance(exc, openai.APIStatusError):
        message, kind, _ = _error_fields(exc.body)
        retry_after = parse_retry_after(exc.response.headers)
        return status_error(
            exc.status_code,
            message or exc.message,
            kind=kind,
            retry_after=retry_after,
            model=model,
            body=exc.body,
            path=_request_path(exc),
            **where,
        )
    if isinstance(exc, openai.APIError):
        # An error event inside an HTTP 200 stream: vLLM puts the status in body.code.
        message, kind, code = _error_fields(exc.body)
        message = message or str(exc)
        if code is not None:
            return status_error(code, f"error event in stream: {message}", kind=kind, model=model, **where)
        return TransientRouteError(
            f"error event in stream: {message}", hint="server-side error", error_class="error_event", **where
        )
    if isinstance(exc, ValueError | TypeError | AttributeError | KeyError | IndexError):
        return MalformedResponse(
            f"unusable response: {type(exc).__name__}: {_short(exc)}",
            hint="the server (or a proxy in front of it) answered something that is not an OpenAI-shaped "
            "completion; check what is listening at this URL",
            **where,
        )
    return TransientRouteError(f"{type(exc).__name__}: {_short(exc)}", **where)


def _request_path(exc: Any) -> str | None:
    """The path the failed request asked for (``/v1/chat/completions``), when the SDK kept the request."""
    try:
        return str(exc.response.request.url.path) or None
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for a response built without a request
        return None


def no_such_path(body: object) -> bool:
    """Whether a 404's body says the server has no handler for the path (not that it lacks a model)."""
    if isinstance(body, dict):
        body = body.get("detail") if set(body) == {"detail"} else None
    return isinstance(body, str) and body.strip().lower() in _NO_SUCH_PATH


_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/models")
"""Endpoint paths a ``base_url`` sometimes ends with by mistake (it is the API's root)."""


def endpoint_not_found(route: str, url: str, path: str | None) -> EndpointNotFoundError:
    """The error for a path 404: what the server lacks, and the ``base_url`` that likely fixes it."""
    missing = f"the server has no {clip(path)}" if path else "the server has no such endpoint"
    root = url.rstrip("/")
    endpoint = next((tail for tail in _ENDPOINTS if root.endswith(tail)), None)
    if endpoint is not None:
        hint = f"base_url is the API's root, not an endpoint: base_url: {root.removesuffix(endpoint)}"
    elif root.endswith("/v1"):
        hint = (
            "check base_url: it is the OpenAI API's root (vLLM: http://host:8000/v1), and the server must offer "
            "this endpoint (chat: a generate model; embeddings: vLLM --runner pooling)"
        )
    else:
        hint = f"does base_url end with /v1? vLLM serves the API under /v1: base_url: {root}/v1"
    return EndpointNotFoundError(missing, route=route, url=url, status=404, hint=hint)


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception's text, capped: a parser's error can quote a whole response body."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def status_error(
    status: int,
    message: str,
    *,
    route: str,
    url: str,
    model: str,
    kind: str | None = None,
    retry_after: float | None = None,
    not_found_hint: str | None = None,
    body: object = None,
    path: str | None = None,
) -> RouteError:
    """The typed error for an HTTP error status, whichever API answered it.

    ``body`` is the error body as parsed, when the API has one to read: a 404 whose body says the path
    has no handler (:func:`no_such_path`) is the route's ``base_url`` at fault, not the model.
    """
    where: dict[str, Any] = {"route": route, "url": url, "status": status}
    if status in _TRANSIENT_STATUSES or status >= 500:
        hint = "the server asks to slow down" if status == 429 else "server-side error; retried elsewhere"
        return TransientRouteError(message, hint=hint, retry_after=retry_after, **where)
    if status in (401, 403):
        hint = "check this route's api_key (or VLLM_API_KEY); it must match the server's --api-key"
        return AuthenticationError(message, hint=hint, **where)
    if status == 404 and (no_such_path(body) or "model" not in message.lower()):
        return endpoint_not_found(route, url, path)  # a model 404 names the model (vLLM, OpenAI, Ollama alike)
    if status == 404:
        hint = not_found_hint or (
            f"the server does not serve model {model!r}: compare the route's `model` with the "
            "server's --served-model-name (GET /v1/models lists them)"
        )
        return ModelNotFoundError(message, hint=hint, **where)
    if status == 422:
        return UnprocessableEntityError(message, hint="check the request parameters", **where)
    lowered = f"{kind or ''} {message}".lower()
    if status == 400 and any(marker in lowered for marker in _OVERFLOW_MARKERS):
        hint = "shorten the prompt or lower max_tokens (embeddings: split the text, or truncate=True)"
        return ContextOverflowError(message, hint=hint, **where)
    return BadRequestError(message, hint="check the request parameters", **where)


def trips_breaker(error: RouteError) -> bool:
    """Whether an error counts against the route's circuit breaker."""
    return isinstance(error, TransientRouteError | AuthenticationError | EndpointNotFoundError)


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a refused connection: nothing listens on the server's port."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False

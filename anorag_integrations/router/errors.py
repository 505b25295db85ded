"""Exceptions raised by the router and the config loader.

Catch ``RouterError`` for everything; the tree says what else you can tell apart::

    RouterError
    ├── ConfigError                 config.yaml (or env) is invalid; names file and key path
    ├── RouteError                  one route answered with an error (route, url, status, hint)
    │   ├── TransientRouteError     timeouts, refused/reset connections, 408/409/429/5xx, cut streams;
    │   │                           the router fails over on these, callers usually see them only
    │   │                           inside AllRoutesFailed.attempts
    │   │   ├── StreamCut          a stream ended without a finish reason (connection closed early)
    │   │   └── MalformedResponse  HTTP 200 the router cannot use (HTML, bad JSON, no choices, ...)
    │   └── PermanentRouteError     raised at once, never retried on another route
    │       ├── BadRequestError            400 (and other 4xx without a class below)
    │       │   └── ContextOverflowError   400: prompt + max_tokens exceed the context window
    │       │       └── InputTooLongError  an embedding input is clearly past the route's
    │       │                              max_model_len: refused before sending (also an
    │       │                              InvalidRequestError)
    │       ├── AuthenticationError        401 / 403: wrong or missing api_key
    │       ├── ModelNotFoundError         404: the route does not serve that model
    │       └── UnprocessableEntityError   422: the body failed the server's validation
    ├── StreamInterruptedError      a stream broke after text was delivered; says how much
    ├── AllRoutesFailed             every route (and retry round) failed; .attempts lists them
    ├── RouterClosed                the router was closed before or while the call ran
    └── InvalidRequestError         the caller's request is unusable (bad bound, unknown route,
        │                           a message that cannot be sent); also a ValueError
        └── NoRouteOfKindError      no route serves the call's kind (embed() with no
                                    kind: embedding route, chat() with only those)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class RouterError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RouterError, ValueError):
    """The configuration is invalid: each problem names the file and the key path."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: {key}: {msg}" if key else f"{source}: {msg}" for key, msg in self.problems]
        head = "invalid configuration" if len(lines) == 1 else f"{len(lines)} problems in configuration"
        super().__init__(f"{head}\n  " + "\n  ".join(lines))


class RouteError(RouterError):
    """A route answered with (or failed with) an error.

    ``error_class`` names the kind of failure in a few bounded values, for metrics and traces (OpenTelemetry's
    ``error.type``): the HTTP status as text ("503", "429", "400"), else "timeout", "connect_error",
    "connection_dropped", "error_event", "stream_cut", "malformed_response" or "transient".
    """

    default_class = "transient"
    """The ``error_class`` of an error that has no status and was given none."""

    def __init__(
        self,
        message: str,
        *,
        route: str,
        url: str,
        status: int | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
        error_class: str | None = None,
    ) -> None:
        self.route = route
        self.url = url
        self.status = status
        self.hint = hint
        self.retry_after = retry_after
        self.message = message
        self.error_class = error_class or (str(status) if status is not None else self.default_class)
        text = f"route {route!r} ({url})"
        if status is not None:
            text += f" HTTP {status}"
        text += f": {message}"
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)


class TransientRouteError(RouteError):
    """A failure worth retrying on another route (or later on this one)."""


class PermanentRouteError(RouteError):
    """A failure that no other route would fix: raised to the caller at once."""

    default_class = "permanent"


class BadRequestError(PermanentRouteError):
    """HTTP 400: the request itself is wrong."""


class ContextOverflowError(BadRequestError):
    """HTTP 400: the prompt plus ``max_tokens`` do not fit the model's context window."""


class AuthenticationError(PermanentRouteError):
    """HTTP 401/403: the route rejected the api key."""


class ModelNotFoundError(PermanentRouteError):
    """HTTP 404: the route does not serve the requested model."""


class UnprocessableEntityError(PermanentRouteError):
    """HTTP 422: the server could not validate the request body."""


class StreamInterruptedError(RouterError):
    """A stream failed after part of the answer had been delivered to the caller.

    ``delivered_text`` is exactly what the caller already received, so it can be shown, kept, or
    used to continue the answer elsewhere; nothing was repeated or dropped.
    """

    def __init__(
        self,
        *,
        route: str,
        url: str,
        delivered_chunks: int,
        delivered_text: str,
        cause: BaseException,
        continuation: str = "",
    ) -> None:
        self.route = route
        self.url = url
        self.delivered_chunks = delivered_chunks
        self.delivered_text = delivered_text
        self.continuation = continuation
        """Why the stream was not continued on another route (empty when it was not tried)."""
        self.__cause__ = cause
        super().__init__(
            f"stream from route {route!r} ({url}) broke after {delivered_chunks} chunks "
            f"({len(delivered_text)} characters) had been delivered: {cause}"
            + (f"; not continued elsewhere: {continuation}" if continuation else "")
        )

    def not_continued(self, reason: str) -> StreamInterruptedError:
        """The same error, saying why the stream was not continued on another route."""
        return StreamInterruptedError(
            route=self.route,
            url=self.url,
            delivered_chunks=self.delivered_chunks,
            delivered_text=self.delivered_text,
            cause=self.__cause__ or self,
            continuation=reason,
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of one request on one route."""

    route: str
    error: RouteError
    elapsed_s: float
    round: int


class AllRoutesFailed(RouterError):
    """No route could serve the request; ``attempts`` holds each try in order."""

    def __init__(self, attempts: Sequence[Attempt], reason: str) -> None:
        self.attempts = list(attempts)
        self.reason = reason
        lines = [f"round {a.round}, {a.elapsed_s * 1000:.0f} ms: {a.error}" for a in self.attempts]
        body = ("\n  " + "\n  ".join(lines)) if lines else ""
        super().__init__(f"all routes failed ({reason}); {len(self.attempts)} attempts{body}")


# --- mapping the openai SDK's exceptions onto this tree -------------------------------------------

_OVERFLOW_MARKERS = (
    "maximum context length",  # vLLM, OpenAI
    "exceed_context_size",  # llama.cpp's error type
    "exceeds the available context size",  # llama.cpp
    "exceeds the context length",  # Ollama's /api/embed
)
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


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
            exc.status_code, message or exc.message, kind=kind, retry_after=retry_after, model=model, **where
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
) -> RouteError:
    """The typed error for an HTTP error status, whichever API answered it."""
    where: dict[str, Any] = {"route": route, "url": url, "status": status}
    if status in _TRANSIENT_STATUSES or status >= 500:
        hint = "the server asks to slow down" if status == 429 else "server-side error; retried elsewhere"
        return TransientRouteError(message, hint=hint, retry_after=retry_after, **where)
    if status in (401, 403):
        hint = "check this route's api_key (or VLLM_API_KEY); it must match the server's --api-key"
        return AuthenticationError(message, hint=hint, **where)
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
    return isinstance(error, TransientRouteError | AuthenticationError | ModelNotFoundError)


class StreamCut(TransientRouteError):
    """The stream ended without a finish reason: the connection was closed early."""

    default_class = "stream_cut"


class MalformedResponse(TransientRouteError):
    """HTTP 200 with a body the router cannot use: an HTML page, bad JSON, no choices, ..."""

    default_class = "malformed_response"


class InvalidRequestError(RouterError, ValueError):
    """The caller's request cannot be sent as given; no route is blamed for it."""


class RouterClosed(RouterError):
    """The router was closed: calls made after ``close()``, or cut short by it, raise this."""

    def __init__(self, message: str = "the router is closed; build a new one (Router.from_config)") -> None:
        super().__init__(message)


class NoRouteOfKindError(InvalidRequestError):
    """The configuration has no route of the kind the call needs (``chat`` or ``embedding``)."""

    def __init__(self, kind: str, source: str) -> None:
        self.kind = kind
        self.source = source
        call = "embed()" if kind == "embedding" else "chat() and stream()"
        super().__init__(
            f"{source} has no route of kind {kind}, which {call} needs; add one under routes: "
            f"with `kind: {kind}`" + (" (a vLLM server started with --runner pooling)" if kind == "embedding" else "")
        )


class MixedEmbeddingsError(RouterError):
    """An embed call's batches came back with vectors of different lengths: its routes serve different models.

    Raised instead of mixing two vector spaces in one answer; ``dimensions`` maps each length to a
    route that answered with it.
    """

    def __init__(self, dimensions: dict[int, str]) -> None:
        self.dimensions = dict(dimensions)
        seen = ", ".join(f"{length} from route {route!r}" for length, route in sorted(dimensions.items()))
        super().__init__(
            f"the batches of one embed call came back with vectors of different lengths ({seen}): the "
            "embedding routes serve different models; give each model its own routes (pin one with route=...)"
        )


class InputTooLongError(ContextOverflowError, InvalidRequestError):
    """An embedding input is clearly longer than the route's ``max_model_len``: refused before sending.

    ``index`` is the input's position, ``estimate`` the fewest tokens it can have (see
    ``router/embeddings.py``) and ``limit`` the context window. ``embedding.truncate: true`` lets the
    server cut such inputs instead. A server's own 400 for an input that only just overflows is a
    plain ``ContextOverflowError``.
    """

    def __init__(self, *, route: str, url: str, index: int, estimate: int, limit: int) -> None:
        self.index, self.estimate, self.limit = index, estimate, limit
        super().__init__(
            f"input {index} has at least {estimate} tokens, past the model's maximum context length of {limit} "
            "tokens; nothing was sent",
            route=route,
            url=url,
            hint="split the text into smaller chunks, or set embedding.truncate: true (or truncate=True) to let "
            "the server cut it to the context window",
            error_class="input_too_long",
        )

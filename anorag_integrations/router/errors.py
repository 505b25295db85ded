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
    │       ├── EndpointNotFoundError      404 for the path, not the model: the server has no
    │       │                              such endpoint (a base_url without /v1?); counts
    │       │                              against the route's breaker, as a 401 does
    │       ├── ModelNotFoundError         404: the route does not serve that model
    │       │   └── UnknownModelError      no route serves the call's model: refused before
    │       │                              sending, naming the served ones (also an
    │       │                              InvalidRequestError)
    │       └── UnprocessableEntityError   422: the body failed the server's validation
    ├── StreamInterruptedError      a stream broke after text was delivered; says how much
    ├── AllRoutesFailed             every route (and retry round) failed; .attempts lists them
    │   ├── FleetSaturatedError     every route was busy and the call could not be served in time:
    │   │                           shed at once, with a suggested .retry_after (no route failed)
    │   └── RetryBudgetExhausted    an attempt failed and retries are over the retry budget: the
    │                               call ends at that failure (.attempts has it)
    ├── RouterClosed                the router was closed before or while the call ran
    └── InvalidRequestError         the caller's request is unusable (bad bound, unknown route,
        │                           a message that cannot be sent); also a ValueError
        └── NoRouteOfKindError      no route serves the call's kind (embed() with no
                                    kind: embedding route, chat() with only those)

Which of these an SDK exception or HTTP status becomes is decided in ``classify.py`` beside this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


class EndpointNotFoundError(PermanentRouteError):
    """HTTP 404 for the path itself (FastAPI's ``{"detail": "Not Found"}``): the route's ``base_url`` is wrong.

    Most often a vLLM ``base_url`` without ``/v1`` (``http://host:8000``). Not a ``ModelNotFoundError``:
    the route is misconfigured for every model, so it does not leave a model's group but counts
    against its breaker, as a 401 does.
    """


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


class FleetSaturatedError(AllRoutesFailed):
    """The fleet is saturated: every route of the call's model was at its concurrency limit and the call could not
    be served within its time (or the queue was full), so it was shed before waiting out a timeout.

    ``retry_after`` is a suggested wait in seconds (the queue's expected drain time); ``why`` is "queue_full",
    "wait" (the expected wait passes the call's time), "timeout" (it waited its whole time) or "priority" (pushed
    out by calls of a higher priority); ``priority`` the call's; ``waited_s`` how long it waited.
    """

    def __init__(
        self,
        attempts: Sequence[Attempt],
        *,
        why: str,
        retry_after: float,
        priority: int,
        waited_s: float,
        queued: int,
    ) -> None:
        self.why, self.retry_after, self.priority, self.waited_s, self.queued = (
            why,
            retry_after,
            priority,
            waited_s,
            queued,
        )
        reasons = {
            "queue_full": "the queue of calls waiting for a route is full",
            "wait": "the expected wait for a route is longer than the call's time left",
            "timeout": "no route had room within the call's time",
            "priority": "calls of a higher priority took its place",
        }
        super().__init__(
            attempts,
            f"fleet saturated: {reasons.get(why, why)} (priority {priority}, waited {waited_s * 1000:.0f} ms, "
            f"{queued} waiting); retry in about {retry_after:.1f}s",
        )


class RetryBudgetExhausted(AllRoutesFailed):
    """An attempt failed and retries plus failovers are over the retry budget (``retry_budget:``), so the call
    ends with that failure instead of adding load: neither another round nor a fallback model is tried."""


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


class UnknownModelError(ModelNotFoundError, InvalidRequestError):
    """No route of the fleet serves the requested model: raised before any request is sent.

    ``served`` lists the names the fleet's routes of that kind serve, ``closest`` the likeliest meant one.
    """

    default_class = "unknown_model"

    def __init__(
        self, model: str, kind: str, served: Sequence[str], closest: Sequence[str], fixes: Sequence[str] = ()
    ) -> None:
        self.model, self.kind, self.served = model, kind, list(served)
        self.closest = closest[0] if closest else None
        self.route, self.url, self.status, self.retry_after = "", "", None, None
        self.error_class = self.default_class
        shown = ", ".join(repr(name) for name in self.served[:20]) + (" ..." if len(self.served) > 20 else "")
        self.message = f"no {kind} route serves model {model!r}; the fleet serves: {shown or 'nothing yet'}"
        self.hint = (
            f"did you mean {self.closest!r}?"
            if self.closest
            else "; ".join(
                ["add a route serving it, an alias (routes.<name>.aliases), or load the adapter on a server", *fixes]
            )
        )
        Exception.__init__(self, f"{self.message} (hint: {self.hint})")

"""OpenTelemetry spans of calls and attempts; the API only, and next to free while no provider is set.

Each public call is one span named by the GenAI semantic conventions (``chat {model}``, kind
CLIENT: ``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``server.address`` of the route that served it).
Each attempt on a route is a child span (``attempt {route}``) that says the route, its outcome and,
on failure, its error class (``error.type``) with an error status, so a failover reads as two
children in a trace. The attempt's W3C ``traceparent`` is sent to the server as a header, so vLLM's
own spans (``--otlp-traces-endpoint``) join the same trace.

Parents are passed explicitly, never through the current context across an ``await`` or a stream's
``yield``: concurrent calls, hedged copies in their own tasks and streams read from other tasks keep
their parent. Only the send of an attempt runs with its span current (same frame, same task), so an
HTTP instrumentation or a log handler sees it.

Cost: while OpenTelemetry has no global tracer provider (and the router was given none), starting a
call is one read of a module attribute; when a provider samples a call out, one ``start_span``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from .errors import (
    AllRoutesFailed,
    InvalidRequestError,
    PermanentRouteError,
    RouteError,
    RouterClosed,
    StreamInterruptedError,
)

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion

    from .call import Call
    from .lease import Lease

INSTRUMENTATION = "anorag_integrations"
OPERATION = "chat"
REQUEST_PARAMS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                  "top_p": "top_p", "seed": "seed"}  # fmt: skip
"""Request keywords recorded on a call's span, as ``gen_ai.request.<name>``."""
DESCRIPTION_CHARS = 500
"""Longest error description on a span (an AllRoutesFailed lists every attempt)."""

_GLOBAL_SET = getattr(otel_trace, "_TRACER_PROVIDER", ...) is not ...
"""Whether this OpenTelemetry keeps its global provider where :func:`_no_global_provider` reads it."""


def _no_global_provider() -> bool:
    """True while nobody has set OpenTelemetry's global tracer provider (one attribute read).

    ``trace.get_tracer_provider()`` answers the same but reads ``os.environ`` on every call (1.4 us);
    an OpenTelemetry without the attribute is asked through ``start_span`` instead.
    """
    return _GLOBAL_SET and otel_trace._TRACER_PROVIDER is None


class Tracing:
    """The router's tracer: its own provider's, or the global one (followed when it is set later)."""

    __slots__ = ("follows_global", "tracer")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.follows_global = provider is None
        if provider is None:
            provider = otel_trace.get_tracer_provider()  # also loads one named by $OTEL_PYTHON_TRACER_PROVIDER
        self.tracer = provider.get_tracer(INSTRUMENTATION, _version())

    def start_call(self, call: Call) -> Span | None:
        """The span of a public call, or None when it would not be recorded (no provider, sampled out)."""
        if self.follows_global and _no_global_provider():
            return None
        span = self.tracer.start_span(OPERATION, kind=SpanKind.CLIENT)
        if not span.is_recording():
            return None
        if call.model:
            span.update_name(f"{OPERATION} {call.model}")
        span.set_attributes(_request_attributes(call, call.model))
        span.set_attribute("anorag.stream", call.stream)
        return span


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anorag-integrations")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None


def _request_attributes(call: Call, model: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"gen_ai.operation.name": OPERATION}
    if model:
        attributes["gen_ai.request.model"] = model
    body = call.body
    for key, name in REQUEST_PARAMS.items():
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def answered(span: Span, response: ChatCompletion) -> None:
    """Record what a completion says about itself on ``span``: model, id, finish reasons, usage."""
    reasons = [choice.finish_reason for choice in response.choices if choice.finish_reason]
    usage = response.usage
    response_attributes(
        span,
        response.model,
        response.id,
        reasons,
        usage.prompt_tokens if usage is not None else None,
        usage.completion_tokens if usage is not None else None,
    )


def response_attributes(
    span: Span,
    model: str | None,
    response_id: str | None,
    finish_reasons: Sequence[str],
    input_tokens: int | None,
    output_tokens: int | None,
) -> None:
    """The ``gen_ai.response.*`` and ``gen_ai.usage.*`` attributes; missing values are left out."""
    attributes: dict[str, Any] = {}
    if model:
        attributes["gen_ai.response.model"] = model
    if response_id:
        attributes["gen_ai.response.id"] = response_id
    if finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = list(finish_reasons)
    if isinstance(input_tokens, int):
        attributes["gen_ai.usage.input_tokens"] = input_tokens
    if isinstance(output_tokens, int):
        attributes["gen_ai.usage.output_tokens"] = output_tokens
    span.set_attributes(attributes)


def outcome(exc: BaseException | None) -> str:
    """How a call ended, in one word (the ``outcome`` label of ``anorag_requests_total``).

    success; rejected (a route answered a permanent error: 400, 401, 404, 422); exhausted (every
    route and round failed, or the deadline passed); interrupted (a stream broke after delivery);
    closed (``Router.close()``); invalid (the request could not be sent); cancelled (the caller
    cancelled its task or closed its stream early); error (anything else).
    """
    if exc is None:
        return "success"
    if isinstance(exc, PermanentRouteError):
        return "rejected"
    if isinstance(exc, AllRoutesFailed):
        return "exhausted"
    if isinstance(exc, StreamInterruptedError):
        return "interrupted"
    if isinstance(exc, RouterClosed):
        return "closed"
    if isinstance(exc, InvalidRequestError):
        return "invalid"
    if not isinstance(exc, Exception):  # CancelledError, GeneratorExit, KeyboardInterrupt
        return "cancelled"
    return "error"


def end_call(call: Call, span: Span, ended: str, exc: BaseException | None) -> None:
    """End a call's span: the route that served it, what the attempts were, the error if any."""
    lease = call.ctl.lease
    if lease is not None and lease.span is not None:  # an attempt nobody settled: never leave its span open
        end_attempt(lease, "abandoned")
    info = call.info
    attributes: dict[str, Any] = {
        "anorag.outcome": ended,
        "anorag.rounds": info.rounds,
        "anorag.failed_attempts": len(info.attempts),
    }
    route = call.router.routes.get(info.route) if info.route else None
    if route is not None:
        attributes["anorag.route"] = route.name
        attributes["server.address"], attributes["server.port"] = route.address
        if not call.model:
            span.update_name(f"{OPERATION} {route.model}")
            attributes["gen_ai.request.model"] = route.model
    if info.hedge:
        attributes["anorag.hedge_route"] = info.hedge
    if info.continued:
        attributes["anorag.continued"] = info.continued
    if exc is not None and ended != "cancelled":
        attributes["error.type"] = exc.error_class if isinstance(exc, RouteError) else type(exc).__qualname__
        text = str(exc)[:DESCRIPTION_CHARS]
        for known in call.router.routes.values():
            text = known.masked(text)
        span.set_status(Status(StatusCode.ERROR, text))
    span.set_attributes(attributes)
    span.end()


def start_attempt(lease: Lease, parent: Span) -> Span | None:
    """The child span of one attempt, or None when the provider does not record it."""
    call, route = lease.call, lease.route
    span = _tracer_of(call).start_span(
        f"attempt {route.name}", context=otel_trace.set_span_in_context(parent), kind=SpanKind.CLIENT
    )
    if not span.is_recording():
        return None
    attributes = _request_attributes(call, call.model or route.model)
    attributes["anorag.route"] = route.name
    attributes["server.address"], attributes["server.port"] = route.address
    attributes["anorag.round"] = call.info.rounds
    attributes["anorag.attempt.role"] = call.role
    span.set_attributes(attributes)
    return span


def _tracer_of(call: Call) -> otel_trace.Tracer:
    tracing = call.router.tracing
    assert tracing is not None  # a call span exists only when tracing does
    return tracing.tracer


def end_attempt(lease: Lease, ended: str, error: RouteError | None = None, *, output_tokens: int | None = None) -> None:
    """End an attempt's span (once): its outcome, and on a failure the error class and an error status."""
    span, lease.span = lease.span, None
    if span is None:
        return
    attributes: dict[str, Any] = {"anorag.outcome": ended}
    if isinstance(output_tokens, int):
        attributes["gen_ai.usage.output_tokens"] = output_tokens
    if error is not None:
        attributes["error.type"] = error.error_class
        span.set_status(Status(StatusCode.ERROR, lease.route.masked(error.message[:DESCRIPTION_CHARS])))
    span.set_attributes(attributes)
    span.end()


def carrier(span: Span) -> dict[str, str]:
    """The propagation headers of ``span`` (W3C ``traceparent``, with the globally configured propagator)."""
    headers: dict[str, str] = {}
    propagate.inject(headers, context=otel_trace.set_span_in_context(span))
    return headers


@contextmanager
def current(span: Span) -> Iterator[None]:
    """``span`` as the current span while an attempt is sent (the same frame attaches and detaches)."""
    token = otel_context.attach(otel_trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def with_headers(body: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """``body`` whose ``extra_headers`` (the openai SDK's keyword) also carry ``headers``."""
    return {**body, "extra_headers": {**(body.get("extra_headers") or {}), **headers}}

"""OpenTelemetry spans of calls and attempts; the API only, and next to free while no provider is set.

Each public call is one span named by the GenAI semantic conventions (``chat {model}``, or
``embeddings {model}`` for ``embed``; kind
CLIENT: ``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``server.address`` of the route that served it).
Each attempt on a route is a child span (``attempt {route}``) that says the route and, unless it
succeeded (the common case, kept cheap), its outcome; on failure also its error class
(``error.type``) with an error status. A failover reads as two children in a trace. The
attempt's W3C ``traceparent`` is sent to the server as a header, so vLLM's own spans
(``--otlp-traces-endpoint``) join the same trace; the caller's OpenTelemetry baggage only to a
route whose ``propagate`` names it (:func:`carrier`): baggage often carries user data.

Parents are passed explicitly, never through the current context across an ``await`` or a stream's
``yield``: concurrent calls, hedged copies in their own tasks and streams read from other tasks keep
their parent. Only the send of an attempt runs with its span current (same frame, same task), so an
HTTP instrumentation or a log handler sees it.

Cost: while OpenTelemetry has no global tracer provider (and the router was given none), starting a
call is one read of a module attribute; when a provider samples a call out, one ``start_span`` (and
no ``traceparent`` is sent). A recorded call costs what the SDK charges for two spans, plus their
attributes and the propagation (``benchmarks/observability.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..errors import (
    AllRoutesFailed,
    FleetSaturatedError,
    InvalidRequestError,
    PermanentRouteError,
    RouteError,
    RouterClosed,
    StreamInterruptedError,
)

if TYPE_CHECKING:
    from contextvars import Token

    from openai.types.chat import ChatCompletion
    from opentelemetry.context import Context

    from ..call import Call
    from ..lease import Lease

INSTRUMENTATION = "anorag_integrations"
REQUEST_PARAMS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                  "top_p": "top_p", "seed": "seed"}  # fmt: skip
"""Request keywords recorded on a call's span, as ``gen_ai.request.<name>``."""
DESCRIPTION_CHARS = 500
"""Longest error description on a span (an AllRoutesFailed lists every attempt)."""
PROPAGATORS: dict[str, TextMapPropagator] = {
    "traceparent": TraceContextTextMapPropagator(),
    "baggage": W3CBaggagePropagator(),
}
"""What each name in a route's ``propagate`` injects: ``traceparent`` (with ``tracestate`` when the trace
has one: W3C trace context, what vLLM reads) and ``baggage`` (the caller's OpenTelemetry baggage)."""


class _Unknown:
    _TRACER_PROVIDER = True  # an OpenTelemetry that keeps it elsewhere: always ask start_span


otel_global: Any = otel_trace if hasattr(otel_trace, "_TRACER_PROVIDER") else _Unknown
"""``otel_global._TRACER_PROVIDER is None`` while nobody has set OpenTelemetry's global tracer provider:
one attribute read, where ``trace.get_tracer_provider()`` reads ``os.environ`` on every call (1.4 us)."""


class Tracing:
    """The router's tracer: its own provider's, or the global one (followed when it is set later)."""

    __slots__ = ("follows_global", "tracer")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.follows_global = provider is None
        """No provider of its own: while ``otel_global._TRACER_PROVIDER is None``, calls are not traced."""
        if provider is None:
            provider = otel_trace.get_tracer_provider()  # also loads one named by $OTEL_PYTHON_TRACER_PROVIDER
        self.tracer = provider.get_tracer(INSTRUMENTATION, _version())

    def start_call(self, call: Call) -> Span | None:
        """The span of a public call, or None when it is not recorded (sampled out)."""
        model = requested_model(call)
        attributes = _request_attributes(call, model)
        attributes["anorag.stream"] = call.stream
        name = f"{call.operation} {model}" if model else call.operation
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        return span if span.is_recording() else None


def requested_model(call: Call) -> str:
    """The model a call asks for (``gen_ai.request.model``): the caller's, else the default route's (a call
    pinned to a route without a model asks for that route's)."""
    if call.requested_model is None and call.pinned is not None:
        return call.pinned.model
    return call.requested_model or call.model


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anorag-integrations")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None


def _request_attributes(call: Call, model: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"gen_ai.operation.name": call.operation}
    if model:
        attributes["gen_ai.request.model"] = model
    body = call.body
    for key, name in REQUEST_PARAMS.items():
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def answered(call: Call, response: ChatCompletion) -> None:
    """Keep what a completion says about itself (model, id, finish reasons, usage) for the call's span."""
    reasons = [choice.finish_reason for choice in response.choices if choice.finish_reason]
    usage = response.usage
    call.said = response_attributes(
        response.model,
        response.id,
        reasons,
        usage.prompt_tokens if usage is not None else None,
        usage.completion_tokens if usage is not None else None,
    )


def response_attributes(
    model: str | None,
    response_id: str | None,
    finish_reasons: Sequence[str],
    input_tokens: int | None,
    output_tokens: int | None,
) -> dict[str, Any]:
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
    return attributes


def outcome(exc: BaseException | None) -> str:
    """How a call ended, in one word (the ``outcome`` label of ``anorag_requests_total``).

    success; rejected (a route answered a permanent error: 400, 401, 404, 422); shed (the fleet was
    saturated: ``FleetSaturatedError``); exhausted (every route and round failed, or the deadline passed);
    interrupted (a stream broke after delivery); closed (``Router.close()``); invalid (the request could not
    be sent); cancelled (the caller cancelled its task or closed its stream early); error (anything else).
    """
    if exc is None:
        return "success"
    if isinstance(exc, InvalidRequestError):  # before PermanentRouteError: an input refused before sending
        return "invalid"
    if isinstance(exc, PermanentRouteError):
        return "rejected"
    if isinstance(exc, FleetSaturatedError):
        return "shed"
    if isinstance(exc, AllRoutesFailed):
        return "exhausted"
    if isinstance(exc, StreamInterruptedError):
        return "interrupted"
    if isinstance(exc, RouterClosed):
        return "closed"
    if not isinstance(exc, Exception):  # CancelledError, GeneratorExit, KeyboardInterrupt
        return "cancelled"
    return "error"


def end_call(call: Call, span: Span, ended: str, exc: BaseException | None) -> None:
    """End a call's span: the route that served it, what the attempts were, the error if any."""
    tracing = call.router.tracing
    assert tracing is not None  # a call span exists only when tracing does
    lease = call.ctl.lease
    if lease is not None and lease.span is not None:  # an attempt nobody settled: never leave its span open
        end_attempt(lease, "abandoned")
    info = call.info
    attributes: dict[str, Any] = call.said or {}
    attributes["anorag.outcome"] = ended
    if info.rounds > 1:
        attributes["anorag.rounds"] = info.rounds
    if info.attempts:
        attributes["anorag.failed_attempts"] = len(info.attempts)
    route = call.router.routes.get(info.route) if info.route else None
    if route is not None:
        attributes["anorag.route"] = route.name
        attributes["server.address"], attributes["server.port"] = route.address
    if info.fallback_reason:
        attributes["anorag.model_fallback"] = info.fallback_reason
        attributes["anorag.models_tried"] = info.models_tried
    if info.hedge:
        attributes["anorag.hedge_route"] = info.hedge
    if info.continued:
        attributes["anorag.continued"] = info.continued
    if info.queued_s:
        attributes["anorag.queued_ms"] = round(info.queued_s * 1000, 3)
    if info.shed:
        attributes["anorag.shed"] = info.shed
    if call.priority:
        attributes["anorag.priority"] = call.priority
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
    address, port = route.address
    attributes: dict[str, Any] = {
        "anorag.route": route.name,
        "server.address": address,
        "server.port": port,
        "gen_ai.request.model": call.sent_model(route),
    }
    if call.role != "request":
        attributes["anorag.attempt.role"] = call.role
    if call.info.rounds > 1:
        attributes["anorag.round"] = call.info.rounds
    span = _tracer_of(call).start_span(
        f"attempt {route.name}",
        context=otel_trace.set_span_in_context(parent),
        kind=SpanKind.CLIENT,
        attributes=attributes,
    )
    return span if span.is_recording() else None


def _tracer_of(call: Call) -> otel_trace.Tracer:
    tracing = call.router.tracing
    assert tracing is not None  # a call span exists only when tracing does
    return tracing.tracer


def end_attempt(lease: Lease, ended: str, error: RouteError | None = None) -> None:
    """End an attempt's span (once): how it ended unless it succeeded (the common case, kept cheap), and on
    a failure the error class and an error status."""
    span, lease.span = lease.span, None
    if span is None:
        return
    if ended == "success":
        span.end()
        return
    attributes: dict[str, Any] = {"anorag.outcome": ended}
    if error is not None:
        attributes["error.type"] = error.error_class
        span.set_status(Status(StatusCode.ERROR, lease.route.masked(error.message[:DESCRIPTION_CHARS])))
    span.set_attributes(attributes)
    span.end()


def carrier(span: Span, propagate: Sequence[str] = ("traceparent",)) -> dict[str, str]:
    """The propagation headers of ``span`` a route gets: only those its ``propagate`` names (``PROPAGATORS``).

    Each name has its own W3C propagator, whatever propagator is configured globally: the global one
    (``tracecontext,baggage`` by default) would also send the caller's baggage, often user data
    (``user.email=...``), to every route, third parties included. ``()`` sends nothing.
    """
    headers: dict[str, str] = {}
    if propagate:
        context = otel_trace.set_span_in_context(span)
        for name in propagate:
            PROPAGATORS[name].inject(headers, context=context)
    return headers


def attach(span: Span) -> Token[Context]:
    """Make ``span`` current while an attempt is sent; the same frame gives the token to :func:`detach`."""
    return otel_context.attach(otel_trace.set_span_in_context(span))


def detach(token: Token[Context]) -> None:
    otel_context.detach(token)


def with_headers(body: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """``body`` whose ``extra_headers`` (the openai SDK's keyword) also carry ``headers``."""
    return {**body, "extra_headers": {**(body.get("extra_headers") or {}), **headers}}

"""OpenTelemetry spans from the real SDK: a call and its attempts, failover, streams, hedges, cancellation.

Each test gives its router its own ``TracerProvider`` (in-memory exporter); none sets the global
provider, so the rest of the session runs with tracing off, as most users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler
from llama_index.core.llms import ChatMessage
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from anorag_integrations import AllRoutesFailed, BadRequestError, Router, VLLMRouted
from anorag_integrations.config import config_from_dict
from anorag_integrations.langchain import ChatVLLMRouted
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config


class OpenSpans(SpanProcessor):
    """Spans started and not yet ended: empty whenever no call is running, or a span leaked."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}
        self.started = 0

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self.open[span.context.span_id] = span.name
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.pop(span.context.span_id, None)


class Traced:
    """A tracer provider of the test's own, what it exported, and routers built on it."""

    def __init__(self, servers: dict[str, FaultServer]) -> None:
        self.servers = servers
        self.exporter = InMemorySpanExporter()
        self.open = OpenSpans()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self.open)
        self.routers: list[Router] = []

    def router(self, *names: str, **llm: Any) -> Router:
        chosen = {n: self.servers[n] for n in (names or ("a", "b"))}
        router = Router(make_config(chosen, **llm), tracer_provider=self.provider, start_prober=False)
        self.routers.append(router)
        return router

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        assert parent.context is not None
        found = [s for s in self.spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]
        return sorted(found, key=lambda s: s.start_time or 0)

    def only_call(self) -> tuple[ReadableSpan, list[ReadableSpan]]:
        [call] = [s for s in self.spans() if not s.name.startswith("attempt ")]
        return call, self.children(call)


@pytest.fixture
def traced(servers: dict[str, FaultServer]) -> Iterator[Traced]:
    made = Traced(servers)
    yield made
    for router in made.routers:
        router.close()
    assert made.open.open == {}, f"spans never ended: {made.open.open}"


def traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{int(span.context.trace_flags):02x}"


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_failover_is_two_attempt_spans_under_one_call(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a", "b", params={"max_tokens": 7, "temperature": 0.5})
    servers["a"].set_fault(Fault.STATUS, status=503, times=1)
    assert router.chat(USER).choices[0].message.content == "from b"
    call, (first, second) = traced.only_call()
    assert call.name == f"chat {MODEL}" and call.status.status_code is StatusCode.UNSET
    assert attrs(call) | {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.max_tokens": 7,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": 1,
        "gen_ai.usage.output_tokens": 2,
        "server.address": "127.0.0.1",
        "server.port": servers["b"].port,
        "anorag.route": "b",
        "anorag.outcome": "success",
        "anorag.failed_attempts": 1,
    } == attrs(call)
    assert first.name == "attempt a" and first.status.status_code is StatusCode.ERROR
    assert attrs(first)["error.type"] == "503" and attrs(first)["anorag.outcome"] == "failure"
    assert attrs(first)["server.port"] == servers["a"].port
    assert second.name == "attempt b" and second.status.status_code is StatusCode.UNSET
    assert "anorag.outcome" not in attrs(second) and "anorag.attempt.role" not in attrs(second)  # succeeded
    assert first.context is not None and call.context is not None
    assert first.context.trace_id == second.context.trace_id == call.context.trace_id  # type: ignore[union-attr]
    # each server received the traceparent of the attempt sent to it: its spans join this trace
    assert servers["a"].traceparents == [traceparent(first)]
    assert servers["b"].traceparents == [traceparent(second)]


def test_in_a_fleet_of_several_models_the_call_is_named_by_the_model_that_answered(traced: Traced) -> None:
    with FaultServer("other", reply="from x") as other:
        config = make_config({"a": traced.servers["a"], "x": other}, route_overrides={"x": {"model": "other"}})
        with Router(config, tracer_provider=traced.provider, start_prober=False) as router:
            router.chat(USER, route="x")
    call, _ = traced.only_call()
    assert call.name == "chat other" and attrs(call)["gen_ai.request.model"] == "other"


def test_concurrent_async_calls_keep_their_own_parents(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a", "b")
    servers["a"].latency = servers["b"].latency = 0.05  # all in flight together

    async def many() -> None:
        await asyncio.gather(*(router.achat(USER) for _ in range(8)))

    asyncio.run(many())
    calls = [s for s in traced.spans() if not s.name.startswith("attempt ")]
    assert len(calls) == 8 and len({c.context.trace_id for c in calls}) == 8  # type: ignore[union-attr]
    sent = set(servers["a"].traceparents + servers["b"].traceparents)
    for call in calls:
        [attempt] = traced.children(call)
        assert attempt.context.trace_id == call.context.trace_id  # type: ignore[union-attr]
        assert attrs(attempt)["anorag.route"] == attrs(call)["anorag.route"]
        assert traceparent(attempt) in sent


def test_the_callers_current_span_is_the_calls_parent(traced: Traced) -> None:
    router = traced.router("a")
    with traced.provider.get_tracer("app").start_as_current_span("handle request") as app:
        router.chat(USER)
    [call] = [s for s in traced.spans() if s.name.startswith("chat")]
    assert call.parent is not None and call.parent.span_id == app.get_span_context().span_id


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_a_stream_span_ends_with_the_stream_and_records_its_usage(traced: Traced, mode: str) -> None:
    router = traced.router("a")
    if mode == "stream":
        chunks = list(router.stream(USER))
    else:

        async def read() -> list[Any]:
            return [chunk async for chunk in router.astream(USER)]

        chunks = asyncio.run(read())
    assert chunks
    call, [attempt] = traced.only_call()
    assert attrs(call)["anorag.stream"] is True and attrs(call)["anorag.outcome"] == "success"
    assert attrs(call)["gen_ai.usage.output_tokens"] == 2 and attrs(call)["gen_ai.response.finish_reasons"] == ("stop",)
    assert attempt.status.status_code is StatusCode.UNSET and "anorag.outcome" not in attrs(attempt)


def test_a_stream_closed_early_ends_both_spans_as_cancelled(traced: Traced) -> None:
    router = traced.router("a")
    chunks = router.stream(USER)
    next(iter(chunks))
    assert len(traced.open.open) == 2  # the call and its attempt are in progress
    chunks.close()  # type: ignore[attr-defined]
    call, [attempt] = traced.only_call()
    assert attrs(call)["anorag.outcome"] == "cancelled" and call.status.status_code is StatusCode.UNSET
    assert attrs(attempt)["anorag.outcome"] == "cancelled"


def test_a_cancelled_async_stream_ends_its_spans(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a")
    servers["a"].set_fault(Fault.STALL, after_chunks=1)

    async def go() -> None:
        got_one = asyncio.Event()

        async def read() -> None:
            async for _ in router.astream(USER):
                got_one.set()

        task = asyncio.create_task(read())
        await got_one.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(go())
    servers["a"].set_fault(None)
    call, [attempt] = traced.only_call()
    assert attrs(call)["anorag.outcome"] == "cancelled" and attrs(attempt)["anorag.outcome"] == "cancelled"


def test_errors_set_an_error_status_on_the_call(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a", "b")
    servers["a"].set_fault(Fault.STATUS, status=400, times=1)
    with pytest.raises(BadRequestError):
        router.chat(USER)
    call, [attempt] = traced.only_call()
    assert call.status.status_code is StatusCode.ERROR and attrs(call)["error.type"] == "400"
    assert attrs(call)["anorag.outcome"] == "rejected" and attrs(attempt)["error.type"] == "400"
    traced.exporter.clear()
    servers["a"].set_fault(Fault.REFUSE)
    servers["b"].set_fault(Fault.STATUS, status=502)
    with pytest.raises(AllRoutesFailed):
        router.chat(USER)
    call, attempts = traced.only_call()
    assert call.status.status_code is StatusCode.ERROR and attrs(call)["error.type"] == "AllRoutesFailed"
    assert sorted(attrs(a)["error.type"] for a in attempts) == ["502", "connect_error"]
    assert all(a.status.status_code is StatusCode.ERROR for a in attempts)


def test_a_hedged_call_shows_both_copies(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a", "b", hedge={"after_ms": 50})
    servers["a"].set_fault(Fault.DELAY, delay=5.0, times=1)
    assert router.chat(USER).choices[0].message.content == "from b"
    call, attempts = traced.only_call()
    by_route = {attrs(a)["anorag.route"]: a for a in attempts}
    assert attrs(by_route["a"])["anorag.outcome"] == "cancelled"
    assert attrs(by_route["b"])["anorag.attempt.role"] == "hedge" and "anorag.outcome" not in attrs(by_route["b"])
    assert attrs(call)["anorag.route"] == "b" and attrs(call)["anorag.hedge_route"] == "b"


def test_a_continued_stream_shows_the_cut_and_the_continuation(traced: Traced, servers: dict[str, FaultServer]) -> None:
    overrides = {"a": {"continue_streams": True}, "b": {"continue_streams": True}}
    router = traced.router("a", "b", route_overrides=overrides)
    servers["a"].set_fault(Fault.CUT, after_chunks=1, times=1)
    assert "".join(c.choices[0].delta.content or "" for c in router.stream(USER) if c.choices).startswith("from")
    call, (cut, rest) = traced.only_call()
    assert attrs(cut)["anorag.outcome"] == "failure" and cut.status.status_code is StatusCode.ERROR
    assert attrs(rest)["anorag.attempt.role"] == "continuation" and rest.status.status_code is StatusCode.UNSET
    assert attrs(call)["anorag.continued"] == 1 and attrs(call)["anorag.outcome"] == "success"
    assert servers["b"].traceparents == [traceparent(rest)]


def test_close_ends_the_spans_of_a_call_in_flight(traced: Traced, servers: dict[str, FaultServer]) -> None:
    router = traced.router("a")
    servers["a"].set_fault(Fault.HANG)

    async def go() -> None:
        task = asyncio.create_task(router.achat(USER))
        while not traced.open.open:  # the call span starts on the task's first step
            await asyncio.sleep(0)
        while servers["a"].hits == 0:
            await asyncio.sleep(0.001)
        await router.aclose()
        with contextlib.suppress(Exception):
            await task

    asyncio.run(go())
    servers["a"].set_fault(None)
    call, [attempt] = traced.only_call()
    assert attrs(call)["anorag.outcome"] == "closed" and attrs(attempt)["anorag.outcome"] == "closed"


def test_nothing_is_traced_or_sent_when_sampled_out_or_switched_off(servers: dict[str, FaultServer]) -> None:
    exporter = InMemorySpanExporter()
    sampled_out = TracerProvider(sampler=ALWAYS_OFF)
    sampled_out.add_span_processor(SimpleSpanProcessor(exporter))
    with Router(make_config({"a": servers["a"]}), tracer_provider=sampled_out, start_prober=False) as router:
        router.chat(USER)
    on = TracerProvider()
    on.add_span_processor(SimpleSpanProcessor(exporter))
    config = make_config({"a": servers["a"]}, observability={"tracing": False})
    with Router(config, tracer_provider=on, start_prober=False) as router:
        assert router.tracing is None
        list(router.stream(USER))
    assert exporter.get_finished_spans() == () and servers["a"].traceparents == [None, None]


NO_PROVIDER_THEN_ONE = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import FaultServer

with FaultServer("m") as server:
    config = config_from_dict({"llm": {"routes": {"a": {"base_url": server.base_url, "model": "m"}}}}, env={})
    with Router(config, start_prober=False) as router:
        router.chat([{"role": "user", "content": "hi"}])
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)  # set after the router was built: it follows
        router.chat([{"role": "user", "content": "hi"}])
    print(server.traceparents[0], sorted(s.name for s in exporter.get_finished_spans()), server.traceparents[1][:3])
"""


def test_the_global_provider_is_followed_once_it_is_set() -> None:
    result = subprocess.run([sys.executable, "-c", NO_PROVIDER_THEN_ONE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "['attempt", "a',", "'chat", "m']", "00-"]


class Ended(BaseCallbackHandler):
    def __init__(self) -> None:
        self.ends = 0

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends += 1


def test_framework_callbacks_keep_working_beside_the_spans(traced: Traced) -> None:
    router = traced.router("a")
    ended = Ended()
    assert ChatVLLMRouted(router=router).invoke("hi", config={"callbacks": [ended]}).content == "from a"
    debug = LlamaDebugHandler()
    llm = VLLMRouted(router=router, callback_manager=CallbackManager([debug]))
    assert llm.chat([ChatMessage(role="user", content="hi")]).message.content == "from a"
    assert ended.ends == 1 and len(debug.get_llm_inputs_outputs()) == 1
    assert len([s for s in traced.spans() if s.name.startswith("chat")]) == 2


def test_no_secret_reaches_a_span(traced: Traced, servers: dict[str, FaultServer]) -> None:
    url = servers["a"].base_url.replace("http://", "http://alice:hunter2pw@")
    routes = {"a": {"base_url": url, "model": MODEL, "api_key": "sk-77secret"}}
    config = config_from_dict({"llm": {"routes": routes, "params": {"max_retries": 0}}}, env={})
    with Router(config, tracer_provider=traced.provider, start_prober=False) as router:
        router.chat(USER)
        servers["a"].set_fault(Fault.STATUS, status=401, message="bad key sk-77secret")
        with contextlib.suppress(Exception):
            router.chat(USER)
    dumped = " ".join(span.to_json() for span in traced.spans())
    assert "bad key ***" in dumped  # the server's echo of the key is masked
    assert not any(secret in dumped for secret in ("alice", "hunter2pw", "sk-77secret"))
    assert servers["a"].last_authorization == "Basic YWxpY2U6aHVudGVyMnB3"  # alice:hunter2pw, in a header only


# --- the invariants machine, traced: whatever the schedule, no span stays open once the router is idle ---


def test_no_span_stays_open_under_random_schedules(servers: dict[str, FaultServer]) -> None:
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    from .test_invariants import RouterMachine

    open_spans = OpenSpans()
    provider = TracerProvider()
    provider.add_span_processor(open_spans)

    class TracedMachine(RouterMachine):
        def _build(self) -> Router:
            return Router(super()._build().config, tracer_provider=provider, start_prober=False)

        def _idle(self) -> None:
            super()._idle()
            assert open_spans.open == {}, f"spans never ended: {open_spans.open}"

    run_state_machine_as_test(
        lambda: TracedMachine(servers),
        settings=settings(max_examples=8, stateful_step_count=10, deadline=None,
                          suppress_health_check=list(HealthCheck), derandomize=bool(os.environ.get("CI"))),
    )  # fmt: skip
    assert open_spans.started > 0  # the schedules were traced


# --- what goes to each route: traceparent by default, baggage only where a route opts in ---


def _headers_received(servers: dict[str, FaultServer]) -> dict[str, list[dict[str, str]]]:
    """Per server, the headers of each chat request it receives from now on (lower-case names)."""
    seen: dict[str, list[dict[str, str]]] = {name: [] for name in servers}
    for name, server in servers.items():
        received = server._received

        def keep(request: Any, body: Any, name: str = name, received: Any = received) -> Any:
            seen[name].append({k.lower(): v for k, v in request.headers.items()})
            return received(request, body)

        server._received = keep  # type: ignore[method-assign]
    return seen


def _ask_with_baggage(router: Router, names: str) -> None:
    """A sync and an async call on each named route, with ``user.email`` in the caller's baggage."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    token = otel_context.attach(baggage.set_baggage("user.email", "alice@example.com"))
    try:
        for name in names:
            router.chat(USER, route=name)
            asyncio.run(router.achat(USER, route=name))
    finally:
        otel_context.detach(token)


def test_the_callers_baggage_is_not_sent_by_default(traced: Traced, servers: dict[str, FaultServer]) -> None:
    """Issue 25 item 12: the caller's baggage (``user.email=...``) went with ``traceparent`` to every route."""
    seen = _headers_received(servers)
    _ask_with_baggage(traced.router("a", "b"), "ab")
    for name in "ab":
        assert len(seen[name]) == 2
        for headers in seen[name]:
            assert headers["traceparent"].startswith("00-") and "baggage" not in headers
    sent = {h["traceparent"] for name in "ab" for h in seen[name]}
    assert sent == {traceparent(s) for s in traced.spans() if s.name.startswith("attempt ")}


def test_baggage_goes_only_to_routes_that_opt_in(traced: Traced, servers: dict[str, FaultServer]) -> None:
    seen = _headers_received(servers)
    overrides = {"b": {"propagate": ["traceparent", "baggage"]}, "c": {"propagate": []}}
    router = Router(
        make_config(servers, route_overrides=overrides), tracer_provider=traced.provider, start_prober=False
    )
    traced.routers.append(router)
    _ask_with_baggage(router, "abc")
    assert [len(seen[name]) for name in "abc"] == [2, 2, 2]
    for headers in seen["a"]:  # the default: traceparent alone
        assert headers["traceparent"].startswith("00-") and "baggage" not in headers
    for headers in seen["b"]:  # opted in
        assert headers["traceparent"].startswith("00-") and "user.email=alice%40example.com" in headers["baggage"]
    for headers in seen["c"]:  # propagate: [] sends nothing
        assert not {"traceparent", "tracestate", "baggage"} & set(headers)
    assert len([s for s in traced.spans() if s.name == "attempt c"]) == 2  # still traced here, just not sent


@pytest.mark.parametrize("value", [["traceparent", "tracestate"], ["Baggage"], "baggage", [None]])
def test_propagate_takes_only_known_header_names(value: Any) -> None:
    from anorag_integrations.config import ConfigError

    routes = {"a": {"base_url": "http://127.0.0.1:1/v1", "model": MODEL, "propagate": value}}
    with pytest.raises(ConfigError, match=r"routes\.a\.propagate"):
        config_from_dict({"llm": {"routes": routes}}, env={})
    routes["a"]["propagate"] = ["baggage", "traceparent"]
    assert config_from_dict({"llm": {"routes": routes}}, env={}).routes["a"].propagate == ("baggage", "traceparent")
    del routes["a"]["propagate"]
    assert config_from_dict({"llm": {"routes": routes}}, env={}).routes["a"].propagate == ("traceparent",)


def test_a_fallback_call_names_the_requested_model_and_each_attempt_the_model_it_sent(traced: Traced) -> None:
    with FaultServer("small", reply="from small") as small:
        config = make_config(
            {"a": traced.servers["a"], "s": small},
            route_overrides={"s": {"model": "small", "aliases": ["tiny"]}},
            fallbacks={MODEL: ["small"]},
        )
        traced.servers["a"].set_fault(Fault.STATUS, status=503)
        with Router(config, tracer_provider=traced.provider, start_prober=False) as router:
            router.chat(USER)
    call, attempts = traced.only_call()
    assert attrs(call)["gen_ai.request.model"] == MODEL and attrs(call)["gen_ai.response.model"] == "small"
    assert (attrs(call)["anorag.model_fallback"], attrs(call)["anorag.models_tried"]) == ("fallbacks", (MODEL,))
    assert [(attrs(a)["anorag.route"], attrs(a)["gen_ai.request.model"]) for a in attempts] == [
        ("a", MODEL),
        ("s", "small"),
    ]

"""Real vLLM joins our trace: started with ``--otlp-traces-endpoint``, its request span carries our trace id.

The session's vLLM servers (SmolLM2-135M on CPU, their own virtualenv) export their spans over
OTLP/HTTP to a receiver the session holds (``tests/spans.py``); the router's attempt span is the
parent vLLM names. The spans are protobuf:
the receiver looks for the 16 bytes of our trace id and the 8 of our attempt's span id in them, so
no OTLP decoder is needed here. Skips (locally) when vLLM's environment is missing; skips, also
under CI, only when that environment cannot export spans at all (no OpenTelemetry SDK/exporter).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from anorag_integrations import Router

from .conftest import USER, real_config
from .spans import SpanReceiver


@pytest.mark.live
def test_vllms_request_span_joins_the_attempts_trace(vllm_server: Any, vllm_spans: SpanReceiver) -> None:
    server, receiver = vllm_server, vllm_spans
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with Router(real_config([server], "vllm", {}), tracer_provider=provider, start_prober=False) as router:
        router.chat(USER, max_tokens=4)
    [attempt] = [s for s in exporter.get_finished_spans() if s.name.startswith("attempt ")]
    assert attempt.context is not None
    trace_id = attempt.context.trace_id.to_bytes(16, "big")
    parent_id = attempt.context.span_id.to_bytes(8, "big")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(trace_id in body for body in receiver.bodies):
        time.sleep(0.2)  # vLLM's batch processor exports on its own schedule (200 ms here)
    ours = [body for body in receiver.bodies if trace_id in body]
    assert ours, f"no span of trace {trace_id.hex()} among {len(receiver.bodies)} exports from vLLM"
    assert any(parent_id in body for body in ours)  # vLLM's span names our attempt as its parent

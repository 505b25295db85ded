"""Real vLLM joins our trace: started with ``--otlp-traces-endpoint``, its request span carries our trace id.

One vLLM server (SmolLM2-135M on CPU, its own virtualenv) exports its spans over OTLP/HTTP to a
receiver in this test; the router's attempt span is the parent vLLM names. The spans are protobuf:
the receiver looks for the 16 bytes of our trace id and the 8 of our attempt's span id in them, so
no OTLP decoder is needed here. Skips (locally) when vLLM's environment is missing; skips, also
under CI, only when that environment cannot export spans at all (no OpenTelemetry SDK/exporter).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from anorag_integrations import Router
from anorag_integrations.cli.servers import free_port, running

from .conftest import USER, real_config

OTEL_IN_VLLM = "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http.trace_exporter"


class Receiver:
    """An OTLP/HTTP endpoint on loopback that keeps every export request's body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _why_not() -> str | None:
    """None when vLLM can run and export spans here; else why not (and whether CI may skip for it)."""
    from anorag_integrations.cli import vllm

    if (missing := vllm.available()) is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        return missing
    check = subprocess.run([str(vllm.python()), "-c", OTEL_IN_VLLM], capture_output=True, text=True, timeout=120)
    if check.returncode != 0:  # the one reason CI skips for: vLLM itself cannot export spans
        return f"vLLM's environment cannot export spans (no OpenTelemetry SDK / OTLP exporter): {check.stderr[-300:]}"
    return None


@pytest.fixture(scope="module")
def traced_vllm() -> Iterator[tuple[Any, Receiver]]:
    """One vLLM server exporting its spans to a receiver of this test (OTLP/HTTP, batches every 200 ms)."""
    if (reason := _why_not()) is not None:
        pytest.skip(reason)
    from anorag_integrations.cli.vllm import VllmServer, chat_model

    class TracedVllm(VllmServer):
        def environment(self) -> dict[str, str]:
            return {**super().environment(), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                    "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip

    chat_model()
    receiver = Receiver()
    try:
        server = TracedVllm(free_port(), extra_args=("--otlp-traces-endpoint", receiver.url))
        with running([server]) as started:
            yield started[0], receiver
    finally:
        receiver.close()


@pytest.mark.live
def test_vllms_request_span_joins_the_attempts_trace(traced_vllm: tuple[Any, Receiver]) -> None:
    server, receiver = traced_vllm
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

"""An OTLP/HTTP span receiver, and whether vLLM's environment can export spans to one.

The session's vLLM pair exports its spans here (``conftest.vllm_on``), so ``test_vllm_tracing`` needs
no server of its own (one more vLLM start was half a minute of the suite).
"""

from __future__ import annotations

import gzip
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OTEL_IN_VLLM = "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http.trace_exporter"


class SpanReceiver:
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


def why_vllm_cannot_export() -> str | None:
    """None when vLLM's environment can export spans; else why not (the one reason a CI run may skip for)."""
    from anorag_integrations.cli import vllm

    check = subprocess.run([str(vllm.python()), "-c", OTEL_IN_VLLM], capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        return f"vLLM's environment cannot export spans (no OpenTelemetry SDK / OTLP exporter): {check.stderr[-300:]}"
    return None


def traced_vllm(port: int, receiver: SpanReceiver) -> Any:
    """A (not yet started) vLLM server exporting its spans to ``receiver`` (OTLP/HTTP, batches every 200 ms)."""
    from anorag_integrations.cli.vllm import VllmServer

    class TracedVllm(VllmServer):
        def environment(self) -> dict[str, str]:
            return {**super().environment(), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                    "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip

    return TracedVllm(port, extra_args=("--otlp-traces-endpoint", receiver.url))

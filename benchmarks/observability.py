"""Cost of observability: requests per client CPU-second with metrics and tracing on vs off.

Off: a router with no Prometheus registry and no tracer provider (OpenTelemetry's API answers with
its no-op). On: the same router registered in a Prometheus registry (scraped once per round) and
given an SDK ``TracerProvider`` whose ``BatchSpanProcessor`` exports to an exporter that drops
spans: every call and attempt span is built, attributed, ended and batched, and every attempt sends
its ``traceparent``. A third setting puts the SDK's own price in view: the router off, each request
wrapped in two empty SDK spans on the same provider (a call and an attempt, nothing else). A fourth
samples one call in ten (``ParentBased(TraceIdRatioBased(0.1))``), as busy services often do. One
vLLM-shaped server in its own process; the settings run interleaved, their order rotating from
round to round, median of the rounds. Target: on / off >= 0.95. A second table gives the router's
own cost per call with the HTTP layer stubbed (as ``pure_overhead.py``), where a span's price shows.
Run: ``.venv/bin/python benchmarks/observability.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

from _common import MODEL, fault_server, pin_client, save
from _measure import PROMPT, Call, drain, median_of, throughput

TARGET = 0.95
MESSAGES = [{"role": "user", "content": PROMPT}]
ON, OFF, FLOOR, SAMPLED = "metrics + tracing", "off", "two empty SDK spans", "metrics + tracing 10 %"
SETTINGS = (OFF, ON, FLOOR, SAMPLED)


def provider(ratio: float = 1.0) -> Any:
    """An SDK tracer provider that batches every sampled span and drops it at export (that cost is the backend's)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    traced = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    traced.add_span_processor(BatchSpanProcessor(Dropping()))
    return traced


def routers(url: str) -> dict[str, tuple[Any, Any]]:
    """Each setting's router, with the Prometheus registry it is scraped from (None: no metrics)."""
    from prometheus_client import CollectorRegistry

    from anorag_integrations import Router
    from anorag_integrations.config import config_from_dict

    config = config_from_dict({"llm": {"routes": {"s0": {"base_url": url, "model": MODEL}}}}, env={})
    off = Router(config, start_prober=False)
    on = Router(config, start_prober=False, tracer_provider=provider())
    sampled = Router(config, start_prober=False, tracer_provider=provider(0.1))
    registries = CollectorRegistry(), CollectorRegistry()
    on.register_metrics(registries[0])
    sampled.register_metrics(registries[1])
    return {OFF: (off, None), ON: (on, registries[0]), SAMPLED: (sampled, registries[1])}


def scrape(registry: Any) -> None:
    from prometheus_client import generate_latest

    if registry is not None:
        generate_latest(registry)


async def measure(url: str, stream: bool, concurrency: int, requests: int, rounds: int) -> list[dict[str, Any]]:
    from opentelemetry import trace

    made = routers(url)
    empty = provider().get_tracer("floor")

    def call(router: Any) -> Call:
        return (lambda: drain(router.astream(MESSAGES))) if stream else (lambda: router.achat(MESSAGES))

    async def in_two_spans() -> None:
        outer = empty.start_span("call")
        inner = empty.start_span("attempt", context=trace.set_span_in_context(outer))
        await call(made[OFF][0])()
        inner.end()
        outer.end()

    calls = {OFF: call(made[OFF][0]), ON: call(made[ON][0]), FLOOR: in_two_spans, SAMPLED: call(made[SAMPLED][0])}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for name in SETTINGS:  # warm up: connections, clients, first spans
        await throughput(calls[name], 50, concurrency)
    for turn in range(rounds):
        first = turn % len(SETTINGS)
        for name in SETTINGS[first:] + SETTINGS[:first]:  # no setting always runs first
            runs[name].append(await throughput(calls[name], requests, concurrency))
        for _, registry in made.values():
            scrape(registry)  # once a round, as Prometheus would every 15 s or so
    for router, _ in made.values():
        await router.aclose()
    rows = {name: {"setting": name, "stream": stream, "concurrency": concurrency, **median_of(runs[name])}
            for name in SETTINGS}  # fmt: skip
    for name in (ON, FLOOR, SAMPLED):
        rows[name]["ratio"] = round(rows[name]["per_cpu_s"] / rows[OFF]["per_cpu_s"], 3)
    rows[ON]["met"] = rows[ON]["ratio"] >= TARGET
    return list(rows.values())


async def stubbed_us(calls: int) -> list[dict[str, Any]]:
    """The router's own CPU us per call with the HTTP layer stubbed, off vs on (``pure_overhead.py``'s stub)."""
    from openai.types.chat import ChatCompletion
    from pure_overhead import RESPONSE

    response = ChatCompletion.model_validate(RESPONSE)

    async def acreate(body: dict[str, Any], timeout: float) -> ChatCompletion:
        return response

    made = routers("http://127.0.0.1:9/v1")
    rows = []
    for name, (router, _) in made.items():
        for route in router.routes.values():
            route.acreate = acreate
        for _ in range(200):
            await router.achat(MESSAGES)
        samples = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(calls):
                await router.achat(MESSAGES)
            samples.append((time.process_time() - started) / calls * 1e6)
        rows.append({"setting": name, "us_per_call": round(statistics.median(samples), 1)})
        await router.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600, help="requests per round and setting")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3000, help="calls per sample of the stubbed measure")
    args = parser.parse_args()
    cores = pin_client()
    rows: list[dict[str, Any]] = []
    with fault_server() as server:
        for stream in (False, True):
            rows += asyncio.run(measure(server.url, stream, args.concurrency, args.requests, args.rounds))
    stubbed = asyncio.run(stubbed_us(args.calls))
    for row in rows:
        kind = "astream" if row["stream"] else "achat"
        extra = f"  ratio {row['ratio']:.3f}" if "ratio" in row else ""
        print(f"{kind:8} {row['setting']:24} {row['per_cpu_s']:7.0f} req/CPU-s {row['rps']:7.0f} req/s{extra}")
    for row in stubbed:
        print(f"stubbed  {row['setting']:24} {row['us_per_call']:7.1f} us per call")
    path = save("observability", {"rows": rows, "stubbed": stubbed}, cores, requests=args.requests,
                rounds=args.rounds, concurrency=args.concurrency, target=TARGET)  # fmt: skip
    print("written to", path)


if __name__ == "__main__":
    main()

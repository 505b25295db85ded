"""``anorag-llm bench``: the seed's load test, through the router (all routes) or one URL.

The JSON keeps the seed's sections (``benchmark_config``, ``summary``, ``latency_ms``) and adds
``ttft_ms`` and ``output_tokens_per_s`` for streams; ``--sweep`` repeats it over concurrencies and
plots throughput and p95 latency against concurrency.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import config_from_dict
from ..router import Router, RouterError
from ..router.telemetry.stats import percentile

DEFAULT_PROMPT = "Explain in one sentence what a KV cache is."
PROGRESS_AFTER = 50
"""Show a progress bar when a run has at least this many requests."""


@dataclass
class BenchOptions:
    base_url: str | None = None
    model: str | None = None
    concurrency: int = 8
    requests: int = 64
    max_tokens: int = 32
    stream: bool = False
    prompt: str = DEFAULT_PROMPT
    config_path: str | None = None
    sweep: list[int] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: Any) -> BenchOptions:
        """Arguments, else the seed script's env vars (VLLM_BASE, VLLM_MODEL, CONC, NREQ), else defaults."""
        env = os.environ if env is None else env
        fallback: dict[str, Any] = {"base_url": env.get("VLLM_BASE"), "model": env.get("VLLM_MODEL")}
        if env.get("CONC"):
            fallback["concurrency"] = int(env["CONC"])
        if env.get("NREQ"):
            fallback["requests"] = int(env["NREQ"])
        values = {
            **{k: v for k, v in fallback.items() if v is not None},
            **{k: v for k, v in given.items() if v is not None},
        }
        options = cls(**values)
        if options.concurrency < 1 or options.requests < 1 or any(c < 1 for c in options.sweep):
            raise ValueError("concurrency, requests and every --sweep value must be at least 1")
        return options


def build_router(options: BenchOptions) -> Router:
    """One route for ``--base-url`` (model required), else every route of the config."""
    if options.base_url is None:
        return Router.from_config(options.config_path, start_prober=False)
    if not options.model:
        raise ValueError("--base-url needs --model (or VLLM_MODEL): the server's --served-model-name")
    route = {"base_url": options.base_url, "model": options.model}
    return Router(config_from_dict({"llm": {"routes": {"bench": route}}}, source="--base-url", env={}))


async def _one(router: Router, options: BenchOptions) -> tuple[float, float | None, int]:
    """Latency, time to first token (streams) and output tokens of one request."""
    messages = [{"role": "user", "content": options.prompt}]
    params: dict[str, Any] = {"max_tokens": options.max_tokens, "max_retries": 0}
    if options.model:
        params["model"] = options.model
    started = time.perf_counter()
    if not options.stream:
        response = await router.achat(messages, **params)
        tokens = response.usage.completion_tokens if response.usage else 0
        return time.perf_counter() - started, None, tokens
    ttft, tokens, pieces = None, 0, 0
    async for chunk in router.astream(messages, **params):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - started
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - started, ttft, tokens or pieces


async def run_once(router: Router, options: BenchOptions, concurrency: int) -> dict[str, Any]:
    """One load test at ``concurrency``: the seed's JSON sections."""
    semaphore = asyncio.Semaphore(concurrency)
    results: list[tuple[float, float | None, int]] = []
    errors: list[str] = []
    bar = _progress(options.requests, f"c={concurrency}")

    async def worker() -> None:
        async with semaphore:
            try:
                results.append(await _one(router, options))
            except RouterError as exc:
                errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            finally:
                if bar is not None:
                    bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(options.requests)))
    total = time.perf_counter() - started
    if bar is not None:
        bar.close()
    report = _report(options, concurrency, total, results, errors)
    report["benchmark_config"]["routes"] = {name: route.base_url for name, route in router.routes.items()}
    report["benchmark_config"]["model"] = options.model or sorted({route.model for route in router.routes.values()})
    return report


def _report(
    options: BenchOptions,
    concurrency: int,
    total: float,
    results: list[tuple[float, float | None, int]],
    errors: list[str],
) -> dict[str, Any]:
    ok = len(results)
    latencies = sorted(r[0] * 1000 for r in results)
    report: dict[str, Any] = {
        "benchmark_config": {
            "base_url": options.base_url or f"router ({options.config_path or 'config.yaml'})",
            "model": options.model,
            "concurrency": concurrency,
            "total_requests": options.requests,
            "max_tokens": options.max_tokens,
            "stream": options.stream,
        },
        "summary": {
            "total_requests": options.requests,
            "successful_requests": ok,
            "failed_requests": len(errors),
            "success_rate": round(ok / options.requests, 4),
            "total_time_seconds": round(total, 3),
            "requests_per_second": round(options.requests / total, 3),
            "successful_rps": round(ok / total, 3),
        },
        "latency_ms": _distribution(latencies),
    }
    if options.stream:
        ttfts = sorted(r[1] * 1000 for r in results if r[1] is not None)
        rates = [r[2] / (r[0] - (r[1] or 0)) for r in results if r[2] and r[0] > (r[1] or 0)]
        report["ttft_ms"] = _distribution(ttfts)
        report["output_tokens_per_s"] = {
            "mean_per_request": round(statistics.fmean(rates), 2) if rates else None,
            "aggregate": round(sum(r[2] for r in results) / total, 2),
        }
    if errors:
        report["errors"] = sorted(set(errors))[:10]
    return report


def _distribution(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(("min", "max", "mean", "median", "p95", "p99"))
    return {
        "min": round(values[0], 2),
        "max": round(values[-1], 2),
        "mean": round(statistics.fmean(values), 2),
        "median": round(statistics.median(values), 2),
        "p95": round(percentile(list(values), 95) or 0.0, 2),
        "p99": round(percentile(list(values), 99) or 0.0, 2),
    }


def _progress(total: int, label: str) -> Any:
    if total < PROGRESS_AFTER:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", leave=False)


def run(options: BenchOptions, *, out: str | None = None, plot: str | None = None) -> dict[str, Any]:
    """The whole command: one run, or a sweep over concurrencies; writes JSON and the plot."""

    async def main() -> dict[str, Any]:
        async with build_router(options) as router:
            if not options.sweep:
                return await run_once(router, options, options.concurrency)
            runs = [await run_once(router, options, c) for c in options.sweep]
            return {"benchmark_config": {**runs[0]["benchmark_config"], "sweep": options.sweep}, "runs": runs}

    report = asyncio.run(main())
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    if plot:
        plot_sweep(report, plot)
    return report


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """Throughput and p95 latency against concurrency (needs the ``plot`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'anorag-integrations[plot]'") from None
    runs = report.get("runs") or [report]
    xs = [r["benchmark_config"]["concurrency"] for r in runs]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(xs, [r["summary"]["successful_rps"] for r in runs], "o-", color="tab:blue", label="requests/s")
    left.set_xlabel("concurrency")
    left.set_ylabel("successful requests/s", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    right = left.twinx()
    right.plot(xs, [r["latency_ms"]["p95"] for r in runs], "s--", color="tab:red", label="p95 latency")
    right.set_ylabel("p95 latency (ms)", color="tab:red")
    left.set_title(f"anorag-llm bench: {report['benchmark_config']['base_url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(report: dict[str, Any]) -> str:
    runs = report.get("runs") or [report]
    lines = []
    for r in runs:
        s, lat = r["summary"], r["latency_ms"]
        line = (
            f"concurrency {r['benchmark_config']['concurrency']:>3}: "
            f"{s['successful_requests']}/{s['total_requests']} ok, {s['successful_rps']:.1f} req/s, "
            f"latency p50 {lat['median']} ms, p95 {lat['p95']} ms"
        )
        if "ttft_ms" in r:
            line += f", ttft p50 {r['ttft_ms']['median']} ms, {r['output_tokens_per_s']['aggregate']} tok/s"
        lines.append(line)
    return "\n".join(lines)

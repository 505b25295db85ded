"""Report sections on what a client costs: CPU per request with and without the network, memory, tracing, embeddings."""

from __future__ import annotations

from typing import Any

from _report_common import cell_name, machine, table


def overhead(data: dict[str, Any]) -> list[str]:
    meta, rows, ratios = data["meta"], data["results"]["rows"], data["results"]["ratios"]
    cells = list(dict.fromkeys(cell_name(r) for r in rows))
    clients = list(dict.fromkeys(r["client"] for r in rows))
    per_cpu = {(cell_name(r), r["client"]): r["per_cpu_s"] for r in rows}
    rps = {(cell_name(r), r["client"]): r["rps"] for r in rows}
    body = [[c, *(f"{per_cpu[c, name]:.0f}" if (c, name) in per_cpu else "-" for name in clients)] for c in cells]
    wall = [[c, *(f"{rps[c, name]:.0f}" if (c, name) in rps else "-" for name in clients)] for c in cells]
    targets = [
        [
            cell_name(r),
            f"{r['client']} / {r['peer']}",
            f"{r['ratio']:.2f}x",
            f"{r['target']}x",
            "yes" if r["met"] else "**no**",
        ]
        for r in ratios
    ]
    failed = sum(r["failures"] for r in rows)
    return [
        "## 1. Client overhead",
        "",
        f"Requests per client CPU-second (higher is better), median of {meta['rounds']} interleaved rounds per cell; "
        f"requests per round by concurrency: {meta['requests_per_level']}; {failed} failed requests in all. "
        "Streams read every chunk; every client asks for usage on streams (ours does by default), so all read "
        "the same chunks. Clients without routing take the servers in turn. The streaming variant of each row: "
        "`create(stream=True)`, `Router.astream`, `astream`, `astream_chat`, `acompletion(stream=True)`.",
        "",
        table(["cell", *clients], body),
        "",
        "Wall-clock requests per second in the same runs:",
        "",
        table(["cell", *clients], wall),
        "",
        "Targets (ratio of requests per client CPU-second, same cell, same run):",
        "",
        table(["cell", "client / peer", "ratio", "target", "met"], targets),
        "",
        machine(meta) + (f" Peers missing: {meta['peers_missing']}" if meta.get("peers_missing") else ""),
        "",
        "![overhead](plots/overhead.png)",
    ]


def pure_overhead(data: dict[str, Any]) -> list[str]:
    rows = [[r["client"], r["us_per_call"], f"{r['vs_chat_openai']}x"] for r in data["results"]]
    return [
        "## 1b. Client overhead without the network (HTTP stubbed; CPU us per call, lower is better)",
        "",
        "Each client gets the same prebuilt response where it would call the openai SDK, so only its own work is "
        "left: routing, statistics, conversions, callbacks. `Router.achat` here is the router's whole cost per "
        "request; the adapters' rows include it.",
        "",
        table(["client", "us per call", "vs ChatOpenAI.ainvoke"], rows),
        "",
        machine(data["meta"]),
    ]


def memory(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        [r["client"], r["rss_after_first_mb"], r["rss_after_total_mb"], r["growth_mb"], "yes" if r["met"] else "**no**"]
        for r in data["results"]
    ]
    return [f"## 5. Memory (RSS after {meta['total']:,} requests minus after {meta['first']:,}; target < "
            f"{meta['target_mb']} MB)", "", table(["client", "RSS MB after first", "RSS MB after all", "growth MB",
            "met"], rows), "", machine(meta)]  # fmt: skip


def observability(data: dict[str, Any]) -> list[str]:
    meta, rows, stubbed = data["meta"], data["results"]["rows"], data["results"]["stubbed"]
    body = [
        ["astream" if r["stream"] else "achat", r["setting"], f"{r['per_cpu_s']:.0f}", f"{r['rps']:.0f}",
         f"{r['ratio']:.3f}x" if "ratio" in r else "-", ("yes" if r["met"] else "**no**") if "met" in r else ""]
        for r in rows
    ]  # fmt: skip
    header = ["call", "setting", "req per CPU-s", "req/s", "vs off", f"met (target >= {meta['target']}x)"]
    return [
        f"## 12. Observability overhead (one server, {meta['requests']} requests per round at concurrency "
        f"{meta['concurrency']}, median of {meta['rounds']} rounds, order rotating)",
        "",
        "Off: no registry, no tracer provider (OpenTelemetry's no-op API). On: metrics registered and scraped once "
        "a round, and an SDK `TracerProvider` with a `BatchSpanProcessor` whose exporter drops the spans: a span per "
        "call and per attempt, attributes, `traceparent` sent. The SDK's own floor: the router off, each request "
        "wrapped in two empty spans of the same provider. 10 %: the same as on, the provider sampling one call in "
        "ten (`ParentBased(TraceIdRatioBased(0.1))`). The gap between the on row and the floor row is the router's "
        "own tracing work (attributes, propagation); the floor is the SDK's price for two spans per request.",
        "",
        table(header, body),
        "",
        "The router's own CPU per call with the HTTP layer stubbed:",
        "",
        table(["setting", "us per call"], [[r["setting"], r["us_per_call"]] for r in stubbed]),
        "",
        machine(meta),
    ]


def embeddings(data: dict[str, Any]) -> list[str]:
    meta, rows, ratios = data["meta"], data["results"]["rows"], data["results"]["ratios"]
    body = [[r["client"], r["chunks_per_s"], r["seconds"], r.get("min_cosine_vs_ours", "-")] for r in rows]
    killed = rows[-1]
    return [
        f"## 13. Embeddings ({meta['model']}; two servers, one core each; {meta['chunks']:,} chunks of "
        f"{meta['tokens_per_chunk']} tokens, batches of {meta['batch_size']}, best of {meta['rounds']} turns each)",
        "",
        "Ours and the raw SDK send up to "
        f"{meta['concurrency']} batches at once; LangChain's `OpenAIEmbeddings(check_embedding_ctx_length=False)` "
        "and LlamaIndex's `OpenAILikeEmbedding` send theirs one after another, as they do by default, to one "
        "server (they have no fleet). Every client's vectors are checked against ours on a sample of chunks.",
        "",
        table(["client", "chunks/s", "seconds", "min cosine vs ours"], body),
        "",
        f"Ours vs the raw `AsyncOpenAI` SDK on one server: {ratios['ours_vs_raw_sdk']}x (target >= 0.95x); vs "
        f"`OpenAIEmbeddings` {ratios['ours_vs_openai_embeddings']}x and `OpenAILikeEmbedding` "
        f"{ratios['ours_vs_openai_like']}x (target >= 1.0x). Over two servers: "
        f"{ratios['ours_two_servers_vs_openai_embeddings']}x and {ratios['ours_two_servers_vs_openai_like']}x "
        f"(target >= 1.5x). One of the two servers SIGKILLed at 30 %: {data['results']['failed_chunks_with_kill']} "
        f"failed chunks; the killed route failed {killed['killed_route_failures']} attempt(s) before its breaker "
        f"opened and had answered {killed['killed_route_batches']} batches. {machine(meta)}",
    ]

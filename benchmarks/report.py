"""Write benchmarks/README.md and plots/*.png from results/*.json: tables are generated, never typed by hand.

Run: ``.venv/bin/python benchmarks/report.py`` (after the benchmarks it reports on).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def load(name: str) -> dict[str, Any] | None:
    path = HERE / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("n/a" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(meta: dict[str, Any]) -> str:
    versions = {**meta.get("versions", {}), **meta.get("peer_versions", {})}
    return f"Machine: {meta['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."


def cell_name(row: dict[str, Any]) -> str:
    kind = "stream" if row["stream"] else "plain"
    return f"{row['servers']} srv, {kind}, c={row['concurrency']}"


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


def selection(data: dict[str, Any]) -> list[str]:
    rows = [[r["routes"], r["policy"], r["us_per_pick"]] for r in data["results"]]
    return ["## 2. Route selection cost (target < 20 us per pick at 1,000 routes)", "",
            table(["routes", "policy", "us per pick"], rows), "", machine(data["meta"])]  # fmt: skip


def balancing(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    fast, slow = meta["fast_s"] * 1000, meta["slow_s"] * 1000
    title = f"## 3. Balancing quality (fast {fast:.0f} ms vs slow {slow:.0f} ms server, "
    title += f"{meta['requests']} requests at concurrency {meta['concurrency']})"
    rows = [
        [r["policy"], r["mean_ms"], r["p95_ms"], f"{r['p95_vs_round_robin']}x", f"{r['slow_share']:.1%}"]
        for r in data["results"]
    ]
    header = ["policy", "mean ms", "p95 ms", "p95 vs round_robin (target <= 0.6x)", "slow route share"]
    return [title, "", table(header, rows), "", machine(meta)]


def failover(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        [r["client"], r["failed"], r["p99_ms"], r["p99_no_fault_ms"], f"{r['p99_vs_no_fault']}x",
         r["killed_route_attempts_after"], r["killed_route_last_attempt_s"], r["hung_route_attempts_after"],
         r["hung_route_last_attempt_s"], r["duration_s"]]
        for r in data["results"]
    ]  # fmt: skip
    header = ["client", "failed (target 0)", "p99 ms", "p99 ms, no fault", "p99 vs no fault",
              "attempts on killed route after kill", "last one (s after kill)", "attempts on hung route after hang",
              "last one (s after hang)", "run s"]  # fmt: skip
    return [
        f"## 4. Failover cost ({meta['requests']} requests at concurrency {meta['concurrency']} over three servers "
        f"answering in {meta['delay_s'] * 1000:.0f} ms; one killed at 30 %, one hung at 60 %)",
        "",
        f"Every client: per-attempt timeout {meta['timeout_s']} s, {meta['retries']} retries; ChatOpenAI with "
        "`max_retries=0` inside `.with_fallbacks([...])` as LangChain advises. Attempts are failed tries the "
        "client made on the faulted server (when the last one ended); n/a where the client does not report them "
        "(LiteLLM's failure callback did not name the deployment in this run).",
        "",
        table(header, rows),
        "",
        machine(meta),
        "",
        "![failover](plots/failover.png)",
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


def engine_of(meta: dict[str, Any], before: str) -> str:
    """The engine a result was measured on (files from before the engine was recorded: ``before``)."""
    return str(meta.get("engine", before))


def servers_text(meta: dict[str, Any]) -> str:
    """How the two real servers ran: vLLM one core each, or llama.cpp with its slots."""
    if engine_of(meta, "llamacpp") == "vllm":
        return f"{meta['model']}, one core per server"
    return f"{meta['model']}, llama.cpp, {meta['parallel_slots']} slots per server"


def real_engine(data: dict[str, Any]) -> list[str]:
    meta, rows, ratios = data["meta"], data["results"]["rows"], data["results"]["ratios"]
    number = "6" if engine_of(meta, "llamacpp") == "vllm" else "6b"
    body = [[r["servers"], r["requests_per_s"], r["output_tokens_per_s"], r["ttft_p50_ms"], r["ttft_p95_ms"],
             r["latency_p50_ms"], json.dumps(r["served"])] for r in rows]  # fmt: skip
    return [
        f"## {number}. Real engine ({servers_text(meta)}; "
        f"{meta['requests']} streamed requests at concurrency {meta['concurrency']}, {meta['max_tokens']} tokens)",
        "",
        table(["servers", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "latency p50 ms", "served"], body),
        "",
        f"Two servers through the router vs one alone: throughput {ratios['throughput_two_vs_one']}x, "
        f"TTFT p50 {ratios['ttft_p50_two_vs_one']}x. {machine(meta)}",
    ]


def prefix_affinity(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        [r["policy"], r["ttft_mean_ms"], r["ttft_p50_ms"], r["ttft_p95_ms"], f"{r['ttft_mean_vs_round_robin']}x",
         f"{r['cached_prompt_share']:.1%}", r["prompt_tokens_per_request"], json.dumps(r["served"]), r["wall_s"]]
        for r in data["results"]
    ]  # fmt: skip
    header = ["policy", "TTFT mean ms", "TTFT p50 ms", "TTFT p95 ms", "mean vs round_robin (target <= 0.6x)",
              "prompt tokens from cache", "prompt tokens per request", "served", "run s"]  # fmt: skip
    vllm = engine_of(meta, "llamacpp") == "vllm"
    cache = (
        f"KV cache {meta['kv_cache_tokens']:,} tokens each"
        if vllm
        else f"{meta['parallel_slots']} slots each, host prompt cache {meta['cache_ram_mib']} MiB"
    )
    return [
        f"## {'7' if vllm else '7b'}. Prefix affinity ({meta['model']}, two servers, {cache}; "
        f"{meta['docs']} contexts x {meta['questions_per_doc']} questions, shuffled, streamed at concurrency "
        f"{meta['concurrency']}; fresh servers per policy)",
        "",
        table(header, rows),
        "",
        machine(meta),
    ]


def prefix_routing(data: dict[str, Any]) -> list[str]:
    """prefix_affinity.json since prefix_aware: three workloads, five policies, the servers' own hit rates."""
    meta = data["meta"]
    if "workload" not in data["results"][0]:
        return prefix_affinity(data)

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    parts = [
        f"## 7. Prefix-aware routing ({meta['model']}, two servers each pinned to its own core, KV cache "
        f"{meta['kv_cache_tokens']:,} tokens each; streamed at concurrency {meta['concurrency']}; every server's "
        "prefix cache emptied before each policy)",
        "",
        f"rag: {meta['docs']} contexts of about 1,200 tokens x {meta['questions_per_doc']} questions, shuffled; "
        f"rag_many_questions: the same contexts x {meta.get('many_questions_per_doc')} questions; "
        f"rag_shared_system: a 600-token system prompt shared by all, {meta['shared_system_docs']} contexts x "
        f"{meta['questions_per_doc']} questions; unique: {meta['unique_requests']} prompts sharing nothing. "
        "prefix_affinity is today's hash ring (first 2,000 characters); prefix_affinity_tuned hashes the system "
        "prompt and 1,500 characters of the context. Hit rates are vLLM's own `prefix_cache_hits / queries` "
        "over the fleet; predicted is prefix_aware's index, per server; share is each server's share of requests.",
        "",
    ]
    header = ["workload", "policy", "TTFT mean ms", "TTFT p95 ms", "req/s", "hit rate (server)",
              "hit rate (predicted)", "share", "mean vs round_robin", "mean vs prefix_affinity",
              "mean vs prefix_affinity_tuned", "p95 vs least_outstanding", "hit rate vs round_robin"]  # fmt: skip
    body = []
    for r in data["results"]:
        predicted = r.get("hit_rate_predicted") or {}
        body.append([
            r["workload"], r["run"], r["ttft_mean_ms"], r["ttft_p95_ms"], r["requests_per_s"],
            rate(r.get("hit_rate_measured_fleet")),
            " / ".join(rate(v) for v in predicted.values()) if predicted else "-",
            " / ".join(f"{v:.0%}" for v in r["share"].values()),
            f"{r.get('ttft_mean_vs_round_robin', '-')}x",
            f"{r.get('ttft_mean_vs_prefix_affinity', '-')}x",
            f"{r.get('ttft_mean_vs_prefix_affinity_tuned', '-')}x",
            f"{r.get('ttft_p95_vs_least_outstanding', '-')}x",
            f"{r.get('hit_rate_vs_round_robin', '-')}x",
        ])  # fmt: skip
    verdicts = []
    by = {(r["workload"], r["run"]): r for r in data["results"]}

    def ratio(r: dict[str, Any], key: str, base: str) -> float:
        theirs = by[(r["workload"], base)][key]
        return round(r[key] / theirs, 3) if theirs else float("nan")

    for r in data["results"]:
        if r["run"] != "prefix_aware":
            continue
        if r["workload"] == "unique":
            p95 = ratio(r, "ttft_p95_ms", "least_outstanding")
            verdicts.append(
                f"unique: p95 {p95}x least_outstanding (target <= 1.05x: {'met' if p95 <= 1.05 else 'missed'})"
            )
            continue
        mean, ring = ratio(r, "ttft_mean_ms", "round_robin"), ratio(r, "ttft_mean_ms", "prefix_affinity")
        hit = ratio(r, "hit_rate_measured_fleet", "round_robin")
        verdicts.append(
            f"{r['workload']}: mean {mean}x round_robin (target <= 0.35x: {'met' if mean <= 0.35 else 'missed'}), "
            f"{ring}x prefix_affinity (<= 0.7x: {'met' if ring <= 0.7 else 'missed'}), hit rate {hit}x "
            f"round_robin's (>= 1.5x: {'met' if hit >= 1.5 else 'missed'})"
        )
    notes = ["Targets, prefix_aware: " + "; ".join(verdicts) + "."] if verdicts else []
    return [*parts, table(header, body), "", *notes, "", machine(meta)]


def prefix_index_memory(data: dict[str, Any]) -> list[str]:
    r = data["results"]
    return [
        f"## 7c. Prefix index memory ({r['requests']:,} requests routed by prefix_aware over two routes, then "
        f"{r['requests']:,} sessions; tracemalloc)",
        "",
        table(
            [
                "blocks held per route (cap)",
                "index MB (peak)",
                "bytes per block",
                "index cap MB",
                "sessions held (cap)",
                "sessions MB (peak)",
                "sessions cap MB",
                "us per pick (untraced)",
                "met",
            ],
            [
                [
                    json.dumps(r["index_blocks"]) + f" ({r['index_cap_blocks']:,})",
                    f"{r['index_mb']} ({r['index_peak_mb']})",
                    r["bytes_per_block"],
                    r["index_cap_mb"],
                    f"{r['sessions']:,} ({r['sessions_cap']:,})",
                    f"{r['sessions_mb']} ({r.get('sessions_peak_mb', '-')})",
                    r["sessions_cap_mb"],
                    r["pick_us"],
                    r["met"],
                ]
            ],
        ),
        "",
        machine(data["meta"]),
    ]


def least_queue(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        [r["policy"], r["mean_ms"], r["p95_ms"], f"{r['p95_vs_round_robin']}x", f"{r['p95_vs_least_outstanding']}x",
         f"{r['busy_share']:.1%}"]
        for r in data["results"]
    ]  # fmt: skip
    header = ["policy", "mean ms", "p95 ms", "p95 vs round_robin", "p95 vs least_outstanding", "share sent to busy"]
    if engine_of(meta, "fault") == "vllm":
        heading = f"## 8. Queue-aware balancing ({meta['model']}, two servers, one core each"
    else:
        slot_ms = meta["service_s"] * 1000
        heading = f"## 8b. Queue-aware balancing (two emulated servers, {meta['slots']} slots of {slot_ms:.0f} ms each"
    return [
        f"{heading}; another client keeps {meta['external_in_flight']} requests in flight on one; {meta['requests']} "
        f"requests at concurrency {meta['concurrency']})",
        "",
        table(header, rows),
        "",
        machine(meta),
    ]


def hedging(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        [r["setting"], r["p50_ms"], r["p99_ms"], r["max_ms"], f"{r['p99_vs_no_hedging']}x",
         f"{r['extra_requests']:.1%}"]
        for r in data["results"]
    ]  # fmt: skip
    header = ["setting", "p50 ms", "p99 ms", "max ms", "p99 vs no hedging", "extra requests (bound 5 %)"]
    return [
        f"## 9. Hedged requests (three servers at {meta['service_s'] * 1000:.0f} ms; one stalls "
        f"{meta['stall_s']} s on every {meta['stall_every']}th request it gets; {meta['requests']} requests at "
        f"concurrency {meta['concurrency']})",
        "",
        table(header, rows),
        "",
        machine(meta),
    ]


def continuation(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    rows = [
        ["on" if r["continue_streams"] else "off", r["complete"], r["failed"], r["garbled"], r["continued"],
         f"{r['complete_share']:.1%}", r["p50_ms"], r["p99_ms"]]
        for r in data["results"]
    ]  # fmt: skip
    header = ["continue_streams", "complete", "failed", "repeated or missing text", "continued", "complete share",
              "p50 ms", "p99 ms"]  # fmt: skip
    return [
        f"## 10. Stream continuation (three servers; one cuts every {meta['cut_every']}th stream after "
        f"{meta['cut_after_chunks']} chunks; {meta['requests']} streams at concurrency {meta['concurrency']})",
        "",
        table(header, rows),
        "",
        machine(meta),
    ]


def soak(data: dict[str, Any]) -> list[str]:
    meta, r = data["meta"], data["results"]
    rows = [[f"{r['requests']:,}", r["concurrency"], r["sync_threads"], r["fault_changes_on_c"],
             json.dumps(r["outcomes"]), r["lost"], json.dumps(r["in_flight_at_end"]),
             f"{r['before_router']['fds']} -> {r['after_router_closed']['fds']}",
             f"{r['before_router']['threads']} -> {r['after_router_closed']['threads']}", r["rss_growth_mb"],
             "yes" if r["passed"] else "**no**"]]  # fmt: skip
    header = ["requests", "async concurrency", "sync threads", "faults on c", "outcomes", "lost", "in flight after",
              "open files", "threads", "RSS growth MB", "passed"]  # fmt: skip
    return [
        "## 11. Soak (routes a and b healthy, c flapping through the whole fault corpus; open files and threads "
        "before the router and after its close, the one extra thread is the process-wide watchdog)",
        "",
        table(header, rows),
        "",
        machine(meta),
    ]


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


def shared_state(data: dict[str, Any]) -> list[str]:
    meta, res = data["meta"], data["results"]
    (kl, ks), pairs, (tl, ts), rk = res["kill"], res["balance"], res["throttle"], res["redis_kill"]
    r = res["ratios"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    after = r["dead_route_attempts_sent_after_kill_local_over_shared"]
    cpu = r["per_cpu_s_shared_over_local"]
    each = ", ".join(f"{c}x" for c in r["per_cpu_s_shared_over_local_each_pair"])
    rows = [
        ["kill: attempts that reached the dead route, requests sent after the kill",
         kl["dead_route_attempts_sent_after_kill"], ks["dead_route_attempts_sent_after_kill"], f"{after}x fewer",
         ">= 4x fewer", met((after or 0) >= 4)],
        ["kill: the same, with the requests in flight at the kill (they fail whatever the state)",
         kl["dead_route_attempts_with_in_flight_at_kill"], ks["dead_route_attempts_with_in_flight_at_kill"],
         f"{r['dead_route_attempts_with_in_flight_at_kill_local_over_shared']}x fewer", "", ""],
        ["kill: the same, requests sent after the fleet's first breaker opened",
         kl["dead_route_attempts_after_first_open"], ks["dead_route_attempts_after_first_open"],
         f"{r['dead_route_attempts_after_first_open_local_over_shared']}x fewer", "", ""],
        ["kill: failed requests", kl["failed"], ks["failed"], "", "0", met(kl["failed"] == ks["failed"] == 0)],
        ["balance: requests running per server (mean), first pair", pairs[0][0]["running_mean"],
         pairs[0][1]["running_mean"], "", "", ""],
        [f"balance: spread max/min (median of {len(pairs)} pairs)", r["spread_local"], r["spread_shared"], "",
         "closer to 1", met(r["spread_shared"] < r["spread_local"])],
        [f"balance: requests per client CPU-s (median of {len(pairs)} pairs; each: {each})",
         [p[0]["per_cpu_s"] for p in pairs], [p[1]["per_cpu_s"] for p in pairs], f"{cpu}x", ">= 0.95x",
         met(cpu >= 0.95)],
        ["balance: failed requests", sum(p[0]["failed"] for p in pairs), sum(p[1]["failed"] for p in pairs), "", "0",
         met(not any(p[0]["failed"] or p[1]["failed"] for p in pairs))],
        [f"throttle: requests to the route in the {meta['retry_after_s']:g} s after its first 429",
         tl["sent_in_window"], ts["sent_in_window"], "", "", ""],
        [f"throttle: the same, past the staleness bound ({meta['staleness_bound_s']:.2f} s)", tl["sent_after_bound"],
         ts["sent_after_bound"], "", "0", met(ts["sent_after_bound"] == 0)],
        ["throttle: failed requests", tl["failed"], ts["failed"], "", "0", met(tl["failed"] == ts["failed"] == 0)],
    ]  # fmt: skip
    kill_rows = [[rk["requests"], rk["failed"], rk["p50_before_ms"], rk["p50_after_ms"], rk["p95_before_ms"],
                  rk["p95_after_ms"]]]  # fmt: skip
    return [
        f"## 14. Shared state ({meta['apps']} app processes at concurrency {meta['concurrency']} each, "
        f"{meta['seconds']:g} s per run ({meta['kill_seconds']:g} s with a kill), three servers at "
        f"{meta['delay_s'] * 1000:.0f} ms; local state vs Redis)",
        "",
        "Each app process has its own Router; one real redis-server; servers in their own processes, fresh for each "
        "run. kill: the first server SIGKILLed at 30 % (breaker cool-down 1 s, so runs hold several half-open "
        "trials). balance: `least_outstanding`, the third server twice as slow, requests running sampled from each "
        f"server's `/metrics` every 20 ms; {len(pairs)} pairs of runs, local and shared alternating. throttle: the "
        f"third server answers 429 with `Retry-After: {meta['retry_after_s']:g}` to every "
        f"{meta['throttle_every']}th request it gets. Shared-state settings (the config's defaults): {meta['state']}.",
        "",
        table(["measure", "local", "shared (Redis)", "ratio", "target", "met"], rows),
        "",
        "Redis SIGKILLed at 40 % of a shared-state run (latency of requests started before and after the kill):",
        "",
        table(
            ["requests", "failed (target 0)", "p50 ms before", "p50 ms after", "p95 ms before", "p95 ms after"],
            kill_rows,
        ),
        "",
        machine(meta),
    ]


def plots(folder: Path) -> None:
    """Bar charts of the overhead and failover results (needs matplotlib, the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if data := load("overhead"):
        rows = data["results"]["rows"]
        cells = list(dict.fromkeys(cell_name(r) for r in rows))
        clients = list(dict.fromkeys(r["client"] for r in rows))
        fig, ax = plt.subplots(figsize=(14, 5.5))
        width = 0.85 / len(clients)
        for i, client in enumerate(clients):
            values = [
                next((r["per_cpu_s"] for r in rows if cell_name(r) == c and r["client"] == client), 0) for c in cells
            ]
            ax.bar([x + i * width for x in range(len(cells))], values, width, label=client)
        ax.set_xticks([x + 0.85 / 2 for x in range(len(cells))], cells, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("requests per client CPU-second")
        ax.set_title("Client overhead (higher is better)")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(folder / "overhead.png", dpi=90)
        plt.close(fig)
    if data := load("failover"):
        rows = data["results"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["client"] for r in rows]
        axes[0].bar(names, [r["p99_no_fault_ms"] for r in rows], 0.4, label="no fault")
        axes[0].bar([i + 0.4 for i in range(len(rows))], [r["p99_ms"] for r in rows], 0.4, label="kill + hang")
        axes[0].set_ylabel("p99 latency ms")
        axes[0].legend()
        attempts = [(r["killed_route_attempts_after"] or 0) + (r["hung_route_attempts_after"] or 0) for r in rows]
        axes[1].bar(names, attempts)
        axes[1].set_ylabel("failed attempts on faulted servers (0: not reported)")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle("Failover cost (lower is better)")
        fig.tight_layout()
        fig.savefig(folder / "failover.png", dpi=90)
        plt.close(fig)


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
    ("overhead", overhead),
    ("pure_overhead", pure_overhead),
    ("selection", selection),
    ("balancing", balancing),
    ("failover", failover),
    ("memory", memory),
    ("real_engine", real_engine),
    ("real_engine_llamacpp", real_engine),
    ("prefix_affinity", prefix_routing),
    ("prefix_affinity_llamacpp", prefix_affinity),
    ("memory_prefix_index", prefix_index_memory),
    ("least_queue", least_queue),
    ("least_queue_fault", least_queue),
    ("hedging", hedging),
    ("continuation", continuation),
    ("soak", soak),
    ("observability", observability),
    ("embeddings", embeddings),
    ("shared_state", shared_state),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=HERE, help="folder for README.md and plots/")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    parts = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/report.py` from `results/*.json`; do not edit by hand. Reproduce everything with",
        "`make bench` (it also creates `.venv-peers` for the peers that pin `openai<3`); each script also runs",
        "alone: `.venv/bin/python benchmarks/<name>.py`. Servers run in their own processes.",
    ]
    for name, section in SECTIONS:
        if data := load(name):
            parts += ["", *section(data)]
        else:
            parts += ["", f"## {name}: not measured yet (`.venv/bin/python benchmarks/{name}.py`)"]
    (args.out / "README.md").write_text("\n".join(parts) + "\n")
    if not args.no_plots:
        plots(args.out / "plots")
    print("written to", args.out / "README.md")


if __name__ == "__main__":
    main()

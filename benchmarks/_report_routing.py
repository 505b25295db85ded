"""Report sections on choosing a route: selection cost, balancing, real engines, prefix- and queue-aware routing."""

from __future__ import annotations

import json
from typing import Any

from _report_common import engine_of, machine, servers_text, table


def selection(data: dict[str, Any]) -> list[str]:
    rows = [[r["routes"], r["policy"], r["us_per_pick"]] for r in data["results"] if "models" not in r]
    many = [[r["routes"], r["models"], r["policy"], r["us_per_pick"], f"{r['vs_one_model']}x"]
            for r in data["results"] if "models" in r]  # fmt: skip
    lines = ["## 2. Route selection cost (target < 20 us per pick at 1,000 routes)", "",
             table(["routes", "policy", "us per pick"], rows), ""]  # fmt: skip
    if many:  # each call names one of the models: the pick is made within that model's group
        header = ["routes", "models", "policy", "us per pick", "vs one model, same run (target <= 1.5x)"]
        lines += ["Many models (each call names one of them):", "", table(header, many), ""]
    return [*lines, machine(data["meta"])]


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


FLEET_TARGET_SHARED, FLEET_TARGET_ONE = 0.4, 0.31
"""``prefix_fleet``'s targets: shared index at 4 and 8 replicas <= 0.4x round_robin; at one replica <= 0.31x."""


def prefix_fleet(data: dict[str, Any]) -> list[str]:
    meta, rows = data["meta"], data["results"]
    header = [
        "replicas",
        "fleet",
        "TTFT mean ms",
        "TTFT p95 ms",
        "req/s",
        "hit rate (server)",
        "hit rate (predicted)",
        "share",
        "mean vs round_robin",
        "p95 vs round_robin",
    ]
    body = [
        [
            r["replicas"],
            r["fleet"],
            r["ttft_mean_ms"],
            r["ttft_p95_ms"],
            r["requests_per_s"],
            _pct(r.get("hit_rate_measured_fleet")),
            _pct(r.get("hit_rate_predicted")),
            " / ".join(f"{v:.0%}" for v in r["share"].values()),
            f"{r.get('ttft_mean_vs_round_robin', '-')}x",
            f"{r.get('ttft_p95_vs_round_robin', '-')}x",
        ]
        for r in rows
    ]
    verdicts = []
    for r in rows:
        ratio = r.get("ttft_mean_vs_round_robin")
        if r["fleet"] != "prefix_aware_shared" or ratio is None:
            continue
        target = FLEET_TARGET_ONE if r["replicas"] == 1 else FLEET_TARGET_SHARED
        verdict = "met" if ratio <= target else "missed"
        verdicts.append(f"{r['replicas']} replica(s) {ratio}x (target <= {target}x: {verdict})")
    return [
        f"## 7d. Prefix-aware routing with many app replicas ({meta['model']}, two servers each "
        f"pinned to its own core, KV cache {meta['kv_cache_tokens']:,} tokens each; a 600-token system prompt, "
        f"{meta['docs']} documents of ~1,200 tokens x {meta['questions_per_doc']} questions, streamed at concurrency "
        f"{meta['concurrency']}; request i through replica i mod N; every server's prefix cache emptied before each "
        "fleet, then one warm-up pass)",
        "",
        "round_robin: the baseline; prefix_aware_local: each replica's own index (`state: local`); "
        "prefix_aware_shared: the fleet's index shared through Redis (`state: {backend: redis}`). Hit rates over "
        "warm-up and measured pass: vLLM's own counters over both servers, and the share of prompt blocks the "
        "replicas' indexes predicted cached.",
        "",
        table(header, body),
        "",
        "Targets, prefix_aware_shared: " + "; ".join(verdicts) + "." if verdicts else "",
        "",
        machine(meta),
    ]


def prefix_index_cost(data: dict[str, Any]) -> list[str]:
    r = data["results"]
    mem = r["memory"]
    return [
        "## 7e. Prefix index at fleet scale (per pick, per shared block, per sync at 1,000 routes; memory at "
        f"{mem['blocks']:,} blocks per route)",
        "",
        table(["routes", "us per pick"], [[p["routes"], p["pick_us"]] for p in r["picks"]]),
        "",
        table(
            [
                "hash a 10,000-char prompt us",
                "adopt a shared block us",
                "sync, 1,000 routes, idle ms",
                f"sync, 1,000 routes, one prompt pushed ({r['pushed_blocks']} blocks) ms",
                "local index MB (bytes/block)",
                "Redis MB (bytes/block)",
            ],
            [
                [
                    r["hash_us_10k_chars"],
                    r["adopt_us_per_block"],
                    r["sync_idle_ms_1000_routes"],
                    r["sync_push_ms_1000_routes"],
                    f"{mem['index_mb']} ({mem['index_bytes_per_block']})",
                    f"{mem['redis_mb']} ({mem['redis_bytes_per_block']})",
                ]
            ],
        ),
        "",
        machine(data["meta"]),
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"

"""Report sections on faults and the fleet: failover, hedging, stream continuation, soak, shared state, overload."""

from __future__ import annotations

import json
from typing import Any

from _report_common import machine, table


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


def membership(data: dict[str, Any]) -> list[str]:
    meta, r = data["meta"], data["results"]
    rows = [[kind, f"{r[kind]['calls']:,}", r[kind]["lost"], r[kind]["changes"], r[kind]["cpu_us_per_call"],
             r[kind]["p50_ms"]] for kind in ("static", "churn")]  # fmt: skip
    header = ["fleet", "calls", "lost", "route changes", "CPU µs per call", "p50 ms"]
    return [
        f"## 15. Membership changes under load (routes a, b, c; while churning a route is removed and another added "
        f"every {meta['period_s']:g} s; concurrency {meta['concurrency']}, {meta['rounds']} x {meta['phase_s']:g} s "
        "per fleet, phases alternated)",
        "",
        table(header, rows),
        "",
        f"CPU per call, churn over static: **{r['cpu_per_call_churn_over_static']:.2f}x**; median latency: "
        f"**{r['p50_churn_over_static']:.2f}x**; every removed route released: "
        f"{'yes' if r['all_released'] else '**no**'}.",
        "",
        machine(meta),
    ]


def overload(data: dict[str, Any]) -> list[str]:
    meta, r = data["meta"], data["results"]
    unloaded = r["unloaded"]

    def errors(row: dict[str, Any]) -> str:
        return ", ".join(f"{name} {count}" for name, count in row["errors"].items()) or "-"

    rows = [[row["client"], f"{row['load']:g}x", row["answers_per_s"], f"{row['vs_capacity']:.2f}x",
             row["attempts_per_request"], f"{row['failed']} of {row['offered']}", row["median_fail_s"],
             None if row["p50_vs_unloaded"] is None else f"{row['p50_vs_unloaded']:.2f}x",
             None if row["p95_vs_unloaded"] is None else f"{row['p95_vs_unloaded']:.2f}x", errors(row),
             "-" if row.get("breakers_opened") is None else row["breakers_opened"], row["client_late_s"]]
            for row in r["rows"]]  # fmt: skip
    header = ["client", "load", f"answers/s (capacity {r['capacity_per_s']:g})", "vs capacity (target ≥ 0.85x)",
              "attempts per call (target ≤ 1.2)", "failed", "median s to fail", "p50 vs unloaded (target ≤ 2x)",
              "p95 vs unloaded", "errors", "breakers opened", "client late s"]  # fmt: skip
    mix, below = r["priority_mix"], r["below_capacity"]
    off, on = below["Router, admission off"], below["Router, defaults"]
    today = "" if meta["admission_available"] else (
        " **Measured on a router without admission control**: both of our variants are the same router (today's), "
        "and the priority mix sends no priority."
    )  # fmt: skip
    peers = f" LiteLLM not measured: {meta['peers_missing']}." if meta.get("peers_missing") else ""
    return [
        f"## 16. Under overload ({meta['servers']} servers of {meta['slots']} slots x {meta['service_s']:g} s = "
        f"{r['capacity_per_s']:g} answers/s; calls arriving open loop at each load for {meta['duration_s']:g} s; "
        f"per-attempt timeout {meta['timeout_s']:g} s)",
        "",
        "Servers queue what they cannot run and abort a request whose client disconnects, as vLLM does (one process "
        "of their own, off the client's core). Calls arrive on a fixed schedule, each its own task; latency counts "
        "from when a call was due. Answers/s: answered calls over the run's wall time (last answer included); "
        "attempts per call: requests the servers received over calls offered. Raw SDK: `max_retries=2` (its "
        "default), servers taken in turn; LiteLLM `Router`: its defaults (retries, cool-downs) but the timeout; "
        f"ours: `round_robin`, `params.timeout` {meta['timeout_s']:g}. Unloaded latency (sequential calls on the "
        f"idle fleet): p50 {unloaded['p50_s'] * 1000:.0f} ms, p95 {unloaded['p95_s'] * 1000:.0f} ms. Client late: "
        "how far behind its schedule the client started a call at worst (a client short of CPU offers less than "
        f"the load).{today}{peers}",
        "",
        table(header, rows),
        "",
        *(_mix(m) for m in (mix, r.get("priority_mix_scheduled")) if m is not None),
        f"Below capacity ({below['load']:g}x, {below['rounds']} runs each, alternating): CPU per call with admission "
        f"control over without **{below['cpu_per_call_on_over_off']:.3f}x** (target ≤ 1.03x), p50 "
        f"**{below['p50_on_over_off']:.3f}x**, calls shed {on['shed']} (target 0); failed {off['failed']} without, "
        f"{on['failed']} with.",
        "",
        machine(meta),
    ]


def _mix(mix: dict[str, Any]) -> str:
    """The line of one priority-mix run (servers first come first served, or scheduling by priority)."""
    inter, batch = mix["interactive"], mix["batch"]
    servers = (
        "servers scheduling by priority, routes `send_priority: true`"
        if mix.get("server_priority")
        else "servers first come first served: the router's queue alone orders calls"
    )
    return (
        f"Priority mix at 2x (one call in five interactive, priority 0; the rest batch, priority 1; ours, defaults; "
        f"{servers}; priority sent: {'yes' if mix['priority_sent'] else 'no'}): interactive p95 "
        f"**{inter['p95_vs_unloaded']}x** the unloaded p95 over the whole run"
        + (
            f", **{inter['steady']['p95_vs_unloaded']}x** for calls due after the first {learnt:g} s"
            if (learnt := mix.get("learnt_s")) is not None and "steady" in inter
            else ""
        )
        + f" (target ≤ 1.5x), {inter['failed']} of "
        f"{inter['offered']} failed; batch {batch['answers_per_s']} answers/s, {batch['failed']} of "
        f"{batch['offered']} failed.\n"
    )


def overload_vllm(data: dict[str, Any]) -> list[str]:
    meta, r = data["meta"], data["results"]
    base = r["unloaded"]
    rows = [
        [run["client"], run["offered"], run["completed"], run["goodput_per_s"], f"{run['goodput_vs_capacity']:.2f}x",
         run["attempts_per_call"], run["failed"], ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "-",
         None if run["p50_vs_unloaded"] is None else f"{run['p50_vs_unloaded']:.2f}x",
         None if run["p95_vs_unloaded"] is None else f"{run['p95_vs_unloaded']:.2f}x",
         None if run["ttft_p95_vs_unloaded"] is None else f"{run['ttft_p95_vs_unloaded']:.2f}x"]
        for row in r["rows"] for run in row["runs"]
    ]  # fmt: skip
    header = ["client", "offered", "completed", "goodput /s", "vs capacity", "attempts per call", "failed",
              "errors", "p50 vs unloaded", "p95 vs unloaded", "TTFT p95 vs unloaded"]  # fmt: skip
    return [
        f"## 16{'c' if meta.get('tolerance') else 'b'}. Under overload on real vLLM"
        + (f", `admission.tolerance: {meta['tolerance']:g}`" if meta.get("tolerance") else "")
        + f" ({meta['model']}; streams of {meta['max_tokens']} tokens arriving "
        f"open loop at {meta['load']:g}x the measured capacity for {meta['duration_s']:g} s; per-attempt timeout "
        f"{meta['timeout_s']:g} s)",
        "",
        f"Capacity: {r['capacity_per_s']:.2f} streams/s at concurrency {meta['capacity_concurrency']} (closed loop). "
        f"Unloaded (sequential streams): p50 {base['p50_s']:.2f} s, TTFT p95 {base['ttft_p95_s'] * 1000:.0f} ms. "
        "Runs alternate, one row each; attempts from the routes' own counts.",
        "",
        table(header, rows),
        "",
        f"Median over the runs, with admission control over without: goodput **{r['goodput_on_over_off']}x**, "
        f"p95 latency of completed streams **{r['p95_on_over_off']}x**.",
        "",
        machine(meta),
    ]

"""Prometheus metrics: the exposition after scripted runs equals router.stats(), registration, serving, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anorag_integrations import AllRoutesFailed, ConfigError, Router, RouterError
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config, three_fault_servers

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels (parsed by prometheus_client's parser)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def matching(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and wanted <= key}


def assert_matches_stats(router: Router, samples: Samples, name: str = "default") -> None:
    """Every exported counter and gauge equals what router.stats() says, route by route."""
    stats = router.stats()
    for route, row in stats.items():
        labels = {"router": name, "route": route}
        assert value(samples, "anorag_attempts_total", **labels) == row["requests"]
        assert value(samples, "anorag_failovers_total", **labels) == row["failovers"]
        assert value(samples, "anorag_output_tokens_total", **labels) == row["output_tokens"]
        assert value(samples, "anorag_hedges_total", **labels) == row["hedges"]
        assert value(samples, "anorag_hedges_won_total", **labels) == row["hedges_won"]
        assert value(samples, "anorag_stream_continuations_total", **labels) == row["continuations"]
        assert value(samples, "anorag_requests_in_flight", **labels) == row["in_flight"]
        failures = matching(samples, "anorag_attempt_failures_total", **labels)
        assert {dict(key)["error_class"]: v for key, v in failures.items()} == row["errors"]
        assert sum(row["errors"].values()) == row["failures"]
        assert value(samples, "anorag_request_duration_seconds_count", **labels) == row["successes"]
        assert value(samples, "anorag_request_duration_seconds_bucket", le="+Inf", **labels) == row["successes"]
        ended = matching(samples, "anorag_requests_total", **labels)
        assert {dict(key)["outcome"]: v for key, v in ended.items()} == row["outcomes"]
        states = matching(samples, "anorag_breaker_state", **labels)
        assert {dict(key)["state"] for key, v in states.items() if v == 1} == {row["state"]}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_a_scripted_run_is_exported_as_stats_says(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    router = router_for("a", "b", route_overrides={"a": {"timeout": 0.5}, "b": {"timeout": 0.5}})
    router.register_metrics(registry)
    for _ in range(4):  # round robin: two each
        router.chat(USER)
    servers["a"].set_fault(Fault.STATUS, status=503)
    served = [router.chat(USER).choices[0].message.content for _ in range(4)]  # a fails 3 times, then its breaker opens
    assert served == ["from b"] * 4
    servers["a"].set_fault(None)
    streamed = "".join(c.choices[0].delta.content or "" for c in router.stream(USER) if c.choices)
    assert streamed == "from b"  # a's breaker is open for its cool-down (60 s)
    samples = scrape(registry)
    assert_matches_stats(router, samples)
    a, b = {"router": "default", "route": "a"}, {"router": "default", "route": "b"}
    assert value(samples, "anorag_attempt_failures_total", error_class="503", **a) == 3
    assert value(samples, "anorag_failovers_total", **a) == 3 and value(samples, "anorag_failovers_total", **b) == 0
    assert value(samples, "anorag_breaker_state", state="open", **a) == 1
    assert value(samples, "anorag_route_healthy", **a) == 0 and value(samples, "anorag_route_healthy", **b) == 1
    assert (
        value(samples, "anorag_requests_total", outcome="success", model="m", **b) == 7
    )  # 2 + 4 failed over + the stream
    assert value(samples, "anorag_requests_total", outcome="success", model="m", **a) == 2
    assert value(samples, "anorag_time_to_first_token_seconds_count", **b) == 1
    assert value(samples, "anorag_time_to_first_token_seconds_count", **a) == 0
    assert value(samples, "anorag_output_tokens_total", **b) == 14  # "from b": two tokens, seven answers
    assert value(samples, "anorag_route_info", model=MODEL, kind="chat", **a) == 1


def test_embedding_routes_are_exported_with_their_kind(
    router_for: Callable[..., Router], registry: CollectorRegistry
) -> None:
    router = router_for("a", "b", route_overrides={"b": {"kind": "embedding"}})
    router.register_metrics(registry)
    router.chat(USER)
    router.embed(["one", "two"])
    samples = scrape(registry)
    assert_matches_stats(router, samples)
    a, b = {"router": "default", "route": "a"}, {"router": "default", "route": "b"}
    assert value(samples, "anorag_route_info", model=MODEL, kind="chat", **a) == 1
    assert value(samples, "anorag_route_info", model=MODEL, kind="embedding", **b) == 1
    assert value(samples, "anorag_attempts_total", **a) == value(samples, "anorag_attempts_total", **b) == 1


def test_histogram_buckets_are_cumulative_and_sum_the_latencies(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    router = router_for("a")
    router.register_metrics(registry)
    servers["a"].latency = 0.06  # every answer lands between the 0.05 s and 0.1 s bounds (loopback adds little)
    for _ in range(3):
        router.chat(USER)
    samples = scrape(registry)
    labels = {"router": "default", "route": "a"}
    buckets = matching(samples, "anorag_request_duration_seconds_bucket", **labels)
    by_bound = sorted((float(dict(key)["le"]), v) for key, v in buckets.items())
    counts = [v for _, v in by_bound]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative, +Inf last
    assert dict(by_bound)[0.05] == 0 and dict(by_bound)[0.25] == 3
    total = value(samples, "anorag_request_duration_seconds_sum", **labels)
    assert total is not None and 0.18 <= total < 0.75


def test_failures_without_a_route_and_exhausted_calls_are_counted(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    router = router_for("a", health={"failure_threshold": 1})
    router.register_metrics(registry)
    servers["a"].set_fault(Fault.REFUSE)
    with pytest.raises(AllRoutesFailed):
        router.chat(USER)  # tried a and failed: ends on a
    with pytest.raises(AllRoutesFailed):
        router.chat(USER)  # a's breaker is open: no route tried
    samples = scrape(registry)
    assert value(samples, "anorag_requests_total", router="default", route="a", model="m", outcome="exhausted") == 1
    assert value(samples, "anorag_requests_total", router="default", route="", model="m", outcome="exhausted") == 1
    assert value(samples, "anorag_attempt_failures_total", router="default", route="a", error_class="connect_error")
    assert_matches_stats(router, samples)


def test_hedges_and_stream_continuations_are_exported(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    hedged = router_for("a", "b", hedge={"after_ms": 50})
    hedged.register_metrics(registry)
    servers["a"].set_fault(Fault.DELAY, delay=5.0, times=1)
    assert asyncio.run(hedged.achat(USER)).choices[0].message.content == "from b"
    samples = scrape(registry)
    b = {"router": "default", "route": "b"}
    assert value(samples, "anorag_hedges_total", **b) == 1 and value(samples, "anorag_hedges_won_total", **b) == 1
    assert value(samples, "anorag_requests_total", outcome="success", model="m", **b) == 1
    assert_matches_stats(hedged, samples)
    hedged.close()

    continuing = Router(
        make_config(
            {"c": servers["c"], "b": servers["b"]},
            route_overrides={"c": {"continue_streams": True}, "b": {"continue_streams": True}},
            observability={"name": "continuing"},
        )
    )
    try:
        continuing.register_metrics(registry)
        servers["c"].set_fault(Fault.CUT, after_chunks=1, times=1)  # round robin: the first stream goes to c
        text = "".join(chunk.choices[0].delta.content or "" for chunk in continuing.stream(USER) if chunk.choices)
        assert text.startswith("from")
        samples = scrape(registry)
        labels = {"router": "continuing", "route": "b"}
        assert value(samples, "anorag_stream_continuations_total", **labels) == 1
        assert value(
            samples, "anorag_attempt_failures_total", router="continuing", route="c", error_class="connection_dropped"
        )
        assert value(samples, "anorag_requests_total", outcome="success", model="m", **labels) == 1
        assert_matches_stats(continuing, samples, "continuing")
    finally:
        continuing.close()


def test_throttled_until_and_probe_latency_are_gauges(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    router = router_for("a", "b")
    router.register_metrics(registry)
    router.health()  # one probe of each route
    servers["a"].set_fault(Fault.STATUS, status=429, retry_after="30", times=1)
    router.chat(USER, route="b")
    with contextlib.suppress(RouterError):
        router.chat(USER, route="a")
    samples = scrape(registry)
    a = {"router": "default", "route": "a"}
    until = value(samples, "anorag_throttled_until_timestamp_seconds", **a)
    assert until is not None and time.time() + 25 < until < time.time() + 31
    assert value(samples, "anorag_throttled_until_timestamp_seconds", router="default", route="b") == 0
    assert value(samples, "anorag_route_healthy", **a) == 0
    probe = value(samples, "anorag_probe_duration_seconds", **a)
    assert probe is not None and 0 < probe < 2


# --- the invariant: after any sequence of outcomes, the export is stats() and nothing stays in flight -----

STEPS = [
    (None, {}),
    (Fault.STATUS, {"status": 503}),
    (Fault.STATUS, {"status": 400}),
    (Fault.CUT, {"after_chunks": 1}),
    (Fault.REFUSE, {}),
    (Fault.INVALID_JSON, {"after_chunks": 1}),
]
MODES = ["chat", "achat", "stream", "astream", "stream_closed"]


def _call(router: Router, mode: str) -> None:
    with contextlib.suppress(RouterError):
        if mode == "chat":
            router.chat(USER)
        elif mode == "achat":
            asyncio.run(router.achat(USER))
        elif mode == "stream":
            list(router.stream(USER))
        elif mode == "stream_closed":
            chunks = router.stream(USER)
            next(iter(chunks), None)
            chunks.close()  # type: ignore[attr-defined]
        else:

            async def read() -> None:
                async for _ in router.astream(USER):
                    pass

            asyncio.run(read())


@pytest.fixture(scope="module")
def three() -> Iterator[dict[str, FaultServer]]:
    with three_fault_servers() as started:
        yield started


@settings(
    max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=bool(os.environ.get("CI"))
)
@given(steps=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(STEPS), st.sampled_from(MODES)),
                      min_size=1, max_size=8))  # fmt: skip
def test_any_sequence_of_outcomes_is_exported_as_stats_says(
    three: dict[str, FaultServer], steps: list[tuple[str, tuple[Fault | None, dict[str, Any]], str]]
) -> None:
    for server in three.values():
        server.set_fault(None)
    router = Router(
        make_config(three, route_overrides={n: {"timeout": 0.5} for n in three}, health={"failure_threshold": 2}),
        start_prober=False,
    )
    registry = CollectorRegistry()
    try:
        router.register_metrics(registry)
        for name, (fault, options), mode in steps:
            three[name].set_fault(fault, **options)
            _call(router, mode)
        samples = scrape(registry)
        assert_matches_stats(router, samples)
        calls = sum(v for (name, _), v in samples.items() if name == "anorag_requests_total")
        assert calls == len(steps)  # each call counted once, whatever its outcome
        assert all(v == 0 for v in matching(samples, "anorag_requests_in_flight").values())
    finally:
        router.close()
        for server in three.values():
            server.set_fault(None)


# --- registration ------------------------------------------------------------------------------------


def test_routers_share_a_registry_by_name_and_leave_it_on_close(
    servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    first = Router(make_config({"a": servers["a"]}, observability={"name": "first"}), start_prober=False)
    second = Router(make_config({"a": servers["b"]}, observability={"name": "second"}), start_prober=False)
    clash = Router(make_config({"a": servers["c"]}, observability={"name": "first"}), start_prober=False)
    try:
        first.register_metrics(registry)
        first.register_metrics(registry)  # again: nothing changes
        second.register_metrics(registry)
        with pytest.raises(ValueError, match=r"observability\.name"):
            clash.register_metrics(registry)
        second.chat(USER)
        samples = scrape(registry)
        assert value(samples, "anorag_attempts_total", router="first", route="a") == 0
        assert value(samples, "anorag_attempts_total", router="second", route="a") == 1
        text = generate_latest(registry).decode()
        assert text.count("# TYPE anorag_attempts_total counter") == 1  # one family, two routers
        first.close()
        assert value(scrape(registry), "anorag_attempts_total", router="first", route="a") is None
        clash.register_metrics(registry)  # the name is free again
        second.close()
        clash.close()
        assert generate_latest(registry) == b""  # the collector left the registry with its last router
    finally:
        for router in (first, second, clash):
            router.close()


def test_a_router_dropped_without_close_leaves_the_registry(
    servers: dict[str, FaultServer], registry: CollectorRegistry
) -> None:
    import gc

    dropped = Router(make_config({"a": servers["a"]}, observability={"name": "dropped"}), start_prober=False)
    dropped.register_metrics(registry)
    assert value(scrape(registry), "anorag_attempts_total", router="dropped", route="a") == 0
    del dropped
    gc.collect()
    assert matching(scrape(registry), "anorag_attempts_total") == {}
    with Router(make_config({"a": servers["b"]}, observability={"name": "dropped"}), start_prober=False) as again:
        again.register_metrics(registry)  # the name is free: no clash with the collected one
        assert value(scrape(registry), "anorag_attempts_total", router="dropped", route="a") == 0


def test_prometheus_true_registers_in_the_global_registry(servers: dict[str, FaultServer]) -> None:
    router = Router(make_config({"a": servers["a"]}, observability={"prometheus": True, "name": "global_test"}))
    try:
        router.chat(USER)
        assert REGISTRY.get_sample_value("anorag_attempts_total", {"router": "global_test", "route": "a"}) == 1
    finally:
        router.close()
    assert REGISTRY.get_sample_value("anorag_attempts_total", {"router": "global_test", "route": "a"}) is None


def test_the_router_label_defaults_to_the_config_file_name(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    path = tmp_path / "fleet-eu.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": {"a": {"base_url": servers["a"].base_url, "model": MODEL}}}}))
    registry = CollectorRegistry()
    with Router.from_config(path, start_prober=False) as router:
        router.register_metrics(registry)
        assert value(scrape(registry), "anorag_attempts_total", router="fleet-eu", route="a") == 0


@pytest.mark.parametrize(
    ("section", "key"),
    [({"name": "has spaces"}, "llm.observability.name"), ({"prometheus": "maybe"}, "llm.observability.prometheus"),
     ({"grafana": True}, "llm.observability.grafana")],
)  # fmt: skip
def test_bad_observability_settings_name_the_key(section: dict[str, Any], key: str) -> None:
    routes = {"a": {"base_url": "http://127.0.0.1:9/v1", "model": MODEL}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"llm": {"routes": routes, "observability": section}}, source="fleet.yaml", env={})
    assert f"fleet.yaml: {key}:" in str(exc.value)


def test_no_secret_reaches_a_label(servers: dict[str, FaultServer], registry: CollectorRegistry) -> None:
    url = servers["a"].base_url.replace("http://", "http://alice:hunter2pw@") + "?key=qkey-77"
    config = config_from_dict({"llm": {"routes": {"a": {"base_url": url, "model": MODEL, "api_key": "sk-77secret"}}}},
                              env={})  # fmt: skip
    with Router(config, start_prober=False) as router:
        router.register_metrics(registry)
        with contextlib.suppress(RouterError):
            router.chat(USER)
        router.health()
        text = generate_latest(registry).decode()
    assert 'route="a"' in text
    assert not any(secret in text for secret in ("alice", "hunter2pw", "qkey-77", "sk-77secret", "127.0.0.1"))


# --- serving -----------------------------------------------------------------------------------------


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_serve_metrics_serves_until_close(servers: dict[str, FaultServer]) -> None:
    router = Router(make_config({"a": servers["a"]}), start_prober=False)
    port = router.serve_metrics(0)
    assert router.serve_metrics(0) == port  # one server per router
    router.chat(USER)
    samples = parse(get(f"http://127.0.0.1:{port}/metrics"))
    assert value(samples, "anorag_attempts_total", router="default", route="a") == 1
    router.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the server stops in a thread of its own
        try:
            get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            break
    else:
        pytest.fail("the metrics server still answers after close()")


def test_cli_metrics_serves_a_config_with_the_prober_running(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    path = tmp_path / "config.yaml"
    routes = {"a": {"base_url": servers["a"].base_url, "model": MODEL}, "b": {"base_url": servers["b"].base_url,
              "model": MODEL}}  # fmt: skip
    path.write_text(yaml.safe_dump({"llm": {"routes": routes}}))
    servers["b"].set_fault(Fault.REFUSE)
    command = [sys.executable, "-m", "anorag_integrations.cli", "metrics", "--config", str(path), "--port", "0",
               "--probe-interval", "0.2"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving metrics of 2 routes at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].strip()
        deadline, samples = time.monotonic() + 20, {}
        while time.monotonic() < deadline:  # wait for the prober's first round, seen through /metrics
            samples = parse(get(url))
            if value(samples, "anorag_probe_duration_seconds", router="config", route="b") is not None:
                break
        assert value(samples, "anorag_route_healthy", router="config", route="a") == 1
        assert value(samples, "anorag_route_healthy", router="config", route="b") == 0
        assert value(samples, "anorag_breaker_state", router="config", route="b", state="open") == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_metrics_reports_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "anorag_integrations.cli", "metrics", "--config",
                             str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("anorag-llm metrics: ") and "config file not found" in result.stderr
    assert "Traceback" not in result.stderr  # the config error as the other commands print it, no traceback


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_cli_metrics_exits_within_two_seconds_of_a_signal(
    signum: int, status: int, tmp_path: Path, servers: dict[str, FaultServer]
) -> None:
    """The promise to operators (Ctrl-C, ``kill``, a container's stop) is 2 s, however busy the machine.

    A generous bound on wall-clock time: the exit measured 0.1 s beside two CPU hogs (it was 1-3 s before
    the console script froze the heap on its way out, see ``test_cli.py``, which checks that cause exactly).
    """
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": {"a": {"base_url": servers["a"].base_url, "model": MODEL}}}}))
    proc = subprocess.Popen([sys.executable, "-m", "anorag_integrations.cli", "metrics", "--config", str(path),
                             "--port", "0", "--probe-interval", "0.2"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving metrics")
        proc.send_signal(signum)
        sent = time.monotonic()
        assert proc.wait(30) == status
        assert time.monotonic() - sent < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    with Router(make_config({"a": servers["a"]}), start_prober=False) as holder:
        port = holder.serve_metrics(0)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"llm": {"routes": {"a": {"base_url": servers["a"].base_url, "model": MODEL}}}}))
        result = subprocess.run([sys.executable, "-m", "anorag_integrations.cli", "metrics", "--config", str(path),
                                 "--port", str(port)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("anorag-llm metrics: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_grafana_dashboard_queries_only_exported_metrics_and_labels() -> None:
    import json
    import re

    from anorag_integrations.router.telemetry.prometheus import RouterCollector

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {f.name + s for f in RouterCollector().describe() for s in suffixes[f.type]}
    labels = {"router", "route", "outcome", "error_class", "state", "model", "le", "priority", "reason"}
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in re.findall(r"\banorag_[a-z_]+", expr)}
    assert used <= exported, used - exported
    assert used >= {n for n in exported if not n.endswith(("_sum", "_count"))} - {"anorag_attempts_total",
                                                                                   "anorag_route_info"}  # fmt: skip
    grouped = {label for expr in exprs for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(", ")}
    selected = {label for expr in exprs for label in re.findall(r"([a-z_]+)=~?\"", expr)}
    assert grouped | selected <= labels

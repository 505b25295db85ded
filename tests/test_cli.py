"""The anorag-llm console script: healthcheck, bench, servers, presets; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from anorag_integrations.cli import main, manage, presets
from anorag_integrations.config import ConfigError
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, free_port


def write_config(tmp_path: Path, servers: dict[str, FaultServer]) -> Path:
    routes = {name: {"base_url": s.base_url, "model": MODEL, "timeout": 2} for name, s in servers.items()}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"provider": "vllm_openai", "routes": routes, "default_route": "a"}}))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anorag_integrations.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


# --- healthcheck -------------------------------------------------------------------------------------


def test_healthcheck_text_all_healthy(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config(tmp_path, servers)), "healthcheck"]) == 0
    out = capsys.readouterr().out
    assert "default route: a" in out and "total routes:  3" in out
    for name in "abc":
        assert f"[OK] {name}" in out and servers[name].base_url in out
    assert f"serves:  {MODEL} (max_model_len 4096)" in out and "kind:    chat" in out
    assert out.rstrip().endswith("3/3 routes healthy")


def test_healthcheck_json_and_failing_exit_status(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    servers["b"].set_fault(Fault.REFUSE)
    path = write_config(tmp_path, servers)
    assert main(["--config", str(path), "healthcheck", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["healthy"], data["total"]) == (2, 3)
    assert data["routes"]["b"]["healthy"] is False and "cannot connect" in data["routes"]["b"]["error"]
    assert main(["--config", str(path), "healthcheck"]) == 1
    out = capsys.readouterr().out
    assert "[DOWN] b" in out and "error:   route 'b'" in out and "2/3 routes healthy" in out


@pytest.mark.parametrize("body", ["html", "null", "invalid"])
def test_healthcheck_shows_the_table_when_a_route_answers_malformed_models(
    tmp_path: Path, servers: dict[str, FaultServer], body: str
) -> None:
    servers["b"].models_fault = body
    result = run_cli("--config", str(write_config(tmp_path, servers)), "healthcheck")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "[DOWN] b" in result.stdout and "[OK] a" in result.stdout and "[OK] c" in result.stdout
    assert "2/3 routes healthy" in result.stdout


def test_healthcheck_watch_repeats(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, servers)
    assert main(["--config", str(path), "healthcheck", "--watch", "0.01", "--count", "3"]) == 0
    assert capsys.readouterr().out.count("3/3 routes healthy") == 3


def test_bad_config_is_one_clear_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("llm:\n  routes:\n    a: {base_url: 'gpu1:8000', model: x}\n")
    result = run_cli("--config", str(path), "healthcheck")
    assert result.returncode == 2
    assert f"{path}: llm.routes.a.base_url: not an http(s) URL" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError):  # --debug: the traceback instead
        main(["--debug", "--config", str(path), "healthcheck"])


def test_global_options_after_the_command(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, servers)
    assert main(["healthcheck", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"] == 3
    # given on both sides, the one after the command wins; given before only, it is not reset
    assert main(["--config", str(tmp_path / "missing.yaml"), "healthcheck", "--config", str(path)]) == 0
    assert main(["--config", str(path), "healthcheck", "--json"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm:\n  routes:\n    a: {base_url: 'gpu1:8000', model: x}\n")
    with pytest.raises(ConfigError):  # --debug after the command still means: the traceback
        main(["healthcheck", "--config", str(bad), "--debug"])


@pytest.mark.parametrize(
    "argv",
    [
        ["servers", "status", "--config", "c.yaml", "--debug", "--json"],
        ["servers", "--config", "c.yaml", "--debug", "status", "--json"],
        ["--config", "c.yaml", "--debug", "servers", "status", "--json"],
        ["--debug", "servers", "status", "--config", "c.yaml", "--json"],
    ],
    ids=["after_action", "after_command", "before", "split"],
)
def test_global_options_anywhere_in_a_subcommand(argv: list[str]) -> None:
    from anorag_integrations.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.command, args.action, args.config) == ("servers", "status", "c.yaml")
    assert args.debug is True and args.json is True


# --- bench -------------------------------------------------------------------------------------------

SEED_SECTIONS = {
    "summary": {"total_requests", "successful_requests", "failed_requests", "success_rate", "total_time_seconds",
                "requests_per_second", "successful_rps"},
    "latency_ms": {"min", "max", "mean", "median", "p95", "p99"},
}  # fmt: skip


def test_bench_through_the_router_writes_the_seed_json(
    tmp_path: Path, servers: dict[str, FaultServer], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(["--config", str(write_config(tmp_path, servers)), "bench", "--requests", "30", "--concurrency", "6",
                 "--max-tokens", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {"benchmark_config", "summary", "latency_ms"}
    for section, keys in SEED_SECTIONS.items():
        assert set(report[section]) == keys
    assert report["summary"]["successful_requests"] == 30 and report["summary"]["success_rate"] == 1.0
    assert report["benchmark_config"]["concurrency"] == 6 and set(report["benchmark_config"]["routes"]) == {
        "a",
        "b",
        "c",
    }
    assert sum(s.hits for s in servers.values()) == 30  # spread over all routes
    assert min(s.hits for s in servers.values()) > 0
    assert servers["a"].requests[-1]["max_tokens"] == 3
    assert "30/30 ok" in capsys.readouterr().out


def test_bench_one_url_from_the_seed_env_vars_streaming(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    out = tmp_path / "bench.json"
    env = {"VLLM_BASE": servers["b"].base_url, "VLLM_MODEL": MODEL, "CONC": "3", "NREQ": "9"}
    result = run_cli("bench", "--stream", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    config = report["benchmark_config"]
    assert (config["base_url"], config["model"], config["concurrency"], config["total_requests"]) == (
        servers["b"].base_url, MODEL, 3, 9)  # fmt: skip
    assert servers["b"].hits == 9 and servers["a"].hits == 0
    assert report["ttft_ms"]["median"] > 0 and report["output_tokens_per_s"]["aggregate"] > 0


def test_bench_sweep_with_plot(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["--config", str(write_config(tmp_path, servers)), "bench", "--sweep", "1,2,4", "--requests", "8",
                 "--out", str(out), "--plot", str(plot)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["benchmark_config"]["concurrency"] for r in report["runs"]] == [1, 2, 4]
    assert all(r["summary"]["successful_requests"] == 8 for r in report["runs"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_counts_failures_and_exits_1(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    servers["a"].set_fault(Fault.STATUS, status=400, message="bad")
    out = tmp_path / "bench.json"
    code = main(["bench", "--base-url", servers["a"].base_url, "--model", MODEL, "--requests", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["summary"]["failed_requests"] == 4 and "BadRequestError" in report["errors"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --model"),
        (["bench", "--plot", "x.png"], "--plot needs --sweep"),
        (["bench", "--requests", "0"], "at least 1"),
        (["servers", "start", "tiny"], "vLLM is not installed here"),
        (["servers", "start", "custom"], "the custom preset needs --model"),
        (["servers", "logs", "nothing-here"], "no server named or preset 'nothing-here'"),
    ],
)
def test_errors_are_one_line_with_the_fix(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(*args, env={"ANORAG_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- presets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "large"])
def test_preset_command_lines(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presets.shutil, "which", lambda cmd: "/usr/bin/vllm" if cmd == "vllm" else None)
    preset = presets.resolve(name)
    command = presets.vllm_command(preset)
    assert command[:3] == ["vllm", "serve", preset.model]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--served-model-name": preset.served_model_name,
        "--dtype": "auto",
        "--max-model-len": str(preset.max_model_len),
        "--gpu-memory-utilization": str(preset.gpu_memory_utilization),
        "--tensor-parallel-size": str(preset.tensor_parallel_size),
        "--host": "0.0.0.0",
        "--port": "8000",
    }


def test_custom_preset_and_overrides_without_the_vllm_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presets.shutil, "which", lambda cmd: None)
    preset = presets.resolve("custom", model="meta-llama/Llama-3.1-8B-Instruct", port=8100, max_model_len=None)
    command = presets.vllm_command(preset, extra_args=("--enable-prefix-caching",))
    assert command[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", preset.model]
    assert command[command.index("--served-model-name") + 1] == "Llama-3.1-8B-Instruct"
    assert command[command.index("--port") + 1] == "8100" and command[-1] == "--enable-prefix-caching"
    assert presets.resolve("medium", tensor_parallel_size=4).tensor_parallel_size == 4


def test_presets_refuse_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presets.importlib.util, "find_spec", lambda name: object())  # pretend vLLM is installed
    monkeypatch.setattr(presets, "gpu_count", lambda: 0)
    with pytest.raises(presets.PresetError, match="no NVIDIA GPU found"):
        presets.check_can_run(presets.resolve("tiny"))
    monkeypatch.setattr(presets, "gpu_count", lambda: 1)
    with pytest.raises(presets.PresetError, match="tensor parallel size 2 needs 2 GPUs; found 1"):
        presets.check_can_run(presets.resolve("large"))
    presets.check_can_run(presets.resolve("small"))  # one GPU is enough for small


# --- servers (real vLLM and llama.cpp processes) -------------------------------------------------------


@pytest.fixture
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory of the test's own; whatever the test started there is stopped even when it fails."""
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    yield tmp_path
    manage.stop(None)


@pytest.mark.live
def test_servers_start_cpu_runs_vllm_chat_and_embeddings(
    own_state: Path, capsys: pytest.CaptureFixture[str], vllm_room: None
) -> None:
    port, embed_port = free_port(), free_port()
    assert main(["servers", "start", "cpu", "--ports", str(port), "--embeddings", str(embed_port)]) == 0
    records = {r.name: r for r in manage.records()}
    assert set(records) == {f"cpu-{port}", f"cpu-{embed_port}"} and all(map(manage.running, records.values()))
    assert main(["servers", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 2)[2])
    assert [row["healthy"] for row in rows.values()] == [True, True]
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("smollm2", 4096)]
    embedded = httpx.post(f"http://127.0.0.1:{embed_port}/v1/embeddings", json={"model": "minilm", "input": ["hi"]})
    assert len(embedded.json()["data"][0]["embedding"]) == 384  # all-MiniLM-L6-v2's dimension
    assert main(["servers", "logs", f"cpu-{port}"]) == 0
    assert "vllm" in capsys.readouterr().out.lower()
    assert main(["servers", "start", "cpu", "--ports", str(port)]) == 2  # already running: refused
    assert "already running" in capsys.readouterr().err
    assert main(["servers", "stop", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"cpu-{port}: stopped" in out and f"cpu-{embed_port}: stopped" in out
    assert not any(map(manage.running, records.values())) and manage.records() == []


@pytest.mark.live
def test_servers_start_llamacpp_keeps_the_second_engine(
    own_state: Path, capsys: pytest.CaptureFixture[str], llama_servers: Any
) -> None:
    port = free_port()
    assert main(["servers", "start", "llamacpp", "--ports", str(port)]) == 0
    [record] = manage.records()
    assert record.name == f"llamacpp-{port}" and manage.running(record)
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "gemma3_270m"
    assert main(["servers", "start", "llamacpp", "--ports", str(port), "--embeddings"]) == 2
    assert "use the cpu preset" in capsys.readouterr().err  # the pooling server is vLLM's
    assert main(["servers", "stop", "llamacpp"]) == 0
    assert f"llamacpp-{port}: stopped" in capsys.readouterr().out
    assert not manage.running(record) and manage.records() == []


def test_stop_never_kills_a_process_it_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    stale = manage.Record("cpu-1", "cpu", os.getpid(), "http://127.0.0.1:1/v1", ["llama-cpp-server", "-m", "x.gguf"],
                          str(tmp_path / "x.log"), 0.0)  # fmt: skip
    (tmp_path / "cpu-1.json").write_text(json.dumps(stale.__dict__))
    assert not manage.running(stale)  # this pid is the test process: its command line differs
    assert manage.status(None)["cpu-1"]["running"] is False
    assert manage.stop("cpu-1") == [(stale, "was not running")]  # and we are still alive to assert it
    assert manage.records() == []


@pytest.mark.live
def test_healthcheck_and_bench_on_real_servers(
    tmp_path: Path, llama_servers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = {f"llama{i}": {"base_url": s.base_url, "model": s.alias} for i, s in enumerate(llama_servers)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": routes}}))
    assert main(["--config", str(path), "healthcheck"]) == 0
    out = capsys.readouterr().out
    assert "2/2 routes healthy" in out and "serves:  gemma3_270m (max_model_len" in out
    report_path = tmp_path / "bench.json"
    assert main(["--config", str(path), "bench", "--requests", "4", "--concurrency", "2", "--max-tokens", "4",
                 "--stream", "--out", str(report_path)]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["summary"]["successful_requests"] == 4
    assert report["ttft_ms"]["median"] > 0 and report["output_tokens_per_s"]["aggregate"] > 0


@pytest.mark.live
def test_demo_runs_end_to_end(tmp_path: Path, vllm_room: None, capsys: pytest.CaptureFixture[str]) -> None:
    ports = [free_port(), free_port()]
    routes = {f"local_{i}": {"base_url": f"http://127.0.0.1:{p}/v1", "model": "smollm2"} for i, p in enumerate(ports)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": routes, "params": {"max_tokens": 8, "temperature": 0}}}))
    assert main(["--config", str(path), "demo"]) == 0
    out = capsys.readouterr().out
    assert "== sync chat ==" in out and "== streamed ==" in out and "(served by local_" in out
    assert "6 requests, 0 failed, served by ['local_1'" in out
    assert "local_0  NO" in out  # the killed server shows in the health table


def test_the_console_script_skips_the_interpreters_final_sweeps_of_the_heap(tmp_path: Path) -> None:
    """``run()`` freezes the heap on its way out (also on an error and a SIGTERM's SystemExit): the final garbage
    collections would otherwise walk every imported module's objects between a Ctrl-C and the exit."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
        "from anorag_integrations.cli import run\n"
        "sys.argv = ['anorag-llm', 'healthcheck', '--config', sys.argv[1]]\n"
        "run()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.yaml")], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "config file not found" in result.stderr
    assert int(result.stdout.split()[-1]) > 10_000  # the imported modules' objects, frozen

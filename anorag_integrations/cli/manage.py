"""``anorag-llm servers start|stop|status|logs``: background servers with pid and log files.

Each started server leaves a record ``<state>/<name>.json`` (pid, command, URL, log file); ``stop``
ends only processes whose record it finds *and* whose command line still matches, so a reused pid
is never killed. The state directory is ``$ANORAG_STATE_DIR`` or ``./.anorag/servers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .presets import check_can_run, resolve, vllm_command
from .servers import DEFAULT_ALIAS, DEFAULT_PORTS, LlamaServer, LocalServer, answers, wait_all_ready
from .vllm import CHAT_ALIAS, VllmServer, embedding_server

STOP_TIMEOUT_S = 10.0


@dataclass
class Record:
    name: str
    preset: str
    pid: int
    url: str
    command: list[str]
    log: str
    started_at: float


def state_dir() -> Path:
    path = Path(os.environ.get("ANORAG_STATE_DIR") or Path.cwd() / ".anorag" / "servers")
    path.mkdir(parents=True, exist_ok=True)
    return path


def records() -> list[Record]:
    out = []
    for path in sorted(state_dir().glob("*.json")):
        with contextlib.suppress(ValueError, TypeError, OSError):
            out.append(Record(**json.loads(path.read_text())))
    return out


def _save(record: Record) -> None:
    (state_dir() / f"{record.name}.json").write_text(json.dumps(asdict(record), indent=2))


def _forget(record: Record) -> None:
    (state_dir() / f"{record.name}.json").unlink(missing_ok=True)


def running(record: Record) -> bool:
    """The recorded process is alive and is still the one we started (its command line matches)."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    started = [arg.encode() for arg in record.command]
    if not started:
        return False  # a damaged record matches nothing rather than everything
    return any(cmdline[i : i + len(started)] == started for i in range(len(cmdline))) or (
        # the console script re-executes itself: compare the flags we passed
        bool(started) and all(arg in cmdline for arg in started[1:])
    )


LOCAL_PRESETS = ("cpu", "llamacpp")
"""Presets that start local CPU servers: ``cpu`` real vLLM, ``llamacpp`` llama.cpp's llama-server."""
EMBED_PORT = 8203


def local_servers(
    preset: str, ports: Sequence[int] | None, alias: str | None, embed_port: int | None = None
) -> list[LocalServer]:
    """The servers a local preset starts, logging into the state directory; one per port."""
    log_dir = state_dir()
    chosen = list(ports or DEFAULT_PORTS)
    check_ports([*chosen, *([] if embed_port is None else [embed_port])])
    if preset == "llamacpp":
        if embed_port is not None:
            raise ValueError("--embeddings starts a vLLM pooling server: use the cpu preset")
        return [LlamaServer(port, alias=alias or DEFAULT_ALIAS, log_dir=log_dir) for port in chosen]
    servers: list[LocalServer] = [VllmServer(port, alias=alias or CHAT_ALIAS, log_dir=log_dir) for port in chosen]
    if embed_port is not None:
        servers.append(embedding_server(embed_port, log_dir=log_dir))
    return servers


def check_ports(ports: Sequence[int]) -> None:
    """ValueError unless every port is a valid TCP port given once (two servers on one port: one dies late)."""
    if bad := [port for port in ports if not 0 < port < 65536]:
        raise ValueError(f"port {bad[0]} is not a TCP port (1-65535)")
    if len(set(ports)) != len(ports):
        twice = sorted({port for port in ports if list(ports).count(port) > 1})
        raise ValueError(f"port {twice[0]} is given twice: each server needs its own port")


def start(
    preset: str,
    *,
    ports: Sequence[int] | None = None,
    alias: str | None = None,
    embed_port: int | None = None,
    **overrides: Any,
) -> list[Record]:
    """Start ``preset`` in the background; a local preset starts one server per port, loading in parallel.

    ``embed_port`` (``cpu`` only) adds a vLLM pooling server on all-MiniLM-L6-v2. When any server fails
    to become ready, every server this call started is stopped again and the error says why.
    """
    if preset in LOCAL_PRESETS:
        return _start_local(preset, local_servers(preset, ports, alias, embed_port))
    config = resolve(preset, **overrides)
    check_can_run(config)
    name = f"{preset}-{config.port}"
    _refuse_taken(name)
    command = vllm_command(config)
    log = state_dir() / f"{name}.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    record = Record(name, preset, proc.pid, f"http://127.0.0.1:{config.port}/v1", command, str(log), time.time())
    _save(record)
    return [record]


def _start_local(preset: str, servers: list[LocalServer]) -> list[Record]:
    for server in servers:
        _refuse_taken(f"{preset}-{server.port}")
    try:
        for server in servers:
            server.start(wait=False)
        wait_all_ready(servers)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    started = []
    for server in servers:
        assert server.process is not None
        record = Record(
            f"{preset}-{server.port}",
            preset,
            server.process.pid,
            server.base_url,
            [str(arg) for arg in server.command],
            str(server.log_path),
            time.time(),
        )
        _save(record)
        started.append(record)
    return started


def _refuse_taken(name: str) -> None:
    for record in records():
        if record.name == name and running(record):
            raise ValueError(
                f"{name} is already running (pid {record.pid}); stop it first: anorag-llm servers stop {name}"
            )


def select(target: str | None) -> list[Record]:
    """Records named ``target``, or of preset ``target``, or all of them."""
    found = records()
    if target in (None, "all"):
        return found
    chosen = [r for r in found if target in (r.name, r.preset)]
    if not chosen:
        known = ", ".join(r.name for r in found) or "none"
        raise ValueError(f"no server named or preset {target!r} was started from here (known: {known})")
    return chosen


def stop(target: str | None) -> list[tuple[Record, str]]:
    """Stop the selected servers this tool started; forget records of ones already gone."""
    outcome = []
    for record in select(target):
        if not running(record):
            outcome.append((record, "was not running"))
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGTERM)
            if not _wait_gone(record, STOP_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pid, signal.SIGKILL)
                _wait_gone(record, STOP_TIMEOUT_S)
            outcome.append((record, "stopped"))
        _forget(record)
    return outcome


def _wait_gone(record: Record, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)  # reap it when it is our child
        if not running(record):
            return True
        time.sleep(0.05)
    return False


def status(target: str | None) -> dict[str, dict[str, Any]]:
    rows = {}
    for record in select(target):
        alive = running(record)
        root = record.url.removesuffix("/v1")
        rows[record.name] = {
            "preset": record.preset,
            "url": record.url,
            "pid": record.pid,
            "running": alive,
            "healthy": alive and answers(f"{root}/health"),
            "log": record.log,
        }
    return rows


def logs(target: str, lines: int = 40) -> str:
    out = []
    for record in select(target):
        try:
            text = Path(record.log).read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            text = [f"(cannot read {record.log}: {exc.strerror})"]
        out.append(f"==> {record.name} ({record.log}) <==\n" + "\n".join(text))
    return "\n\n".join(out)

"""``anorag-llm servers start|stop|status|logs``: background servers with pid and log files.

Each started server leaves a record ``<state>/<name>.json`` (pid, command, URL, log file, and the leader's
start time and boot). A server is its leader and every process of the session the leader opened (vLLM's
engine among them), so ``stop`` still finds and ends the engine when the leader has died; a pid the kernel
has since given to another process (its start time differs) is never signalled. Starts and stops of one
port hold that port's lock file (``<state>/port-<N>.lock``, released by the kernel when the holder dies),
so two starts never both win. The state directory is ``$ANORAG_STATE_DIR`` or ``./.anorag/servers``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .presets import check_can_run, resolve, vllm_command
from .servers import (
    DEFAULT_ALIAS,
    DEFAULT_PORTS,
    LlamaServer,
    LocalServer,
    Process,
    answers,
    boot_id,
    read_process,
    wait_all_ready,
)
from .vllm import CHAT_ALIAS, VllmServer, embedding_server

STOP_TIMEOUT_S = 10.0
"""How long a stop waits after SIGTERM before SIGKILL, and after SIGKILL before giving up."""
STOP_POLL_S = 0.05


@dataclass
class Record:
    name: str
    preset: str
    pid: int
    url: str
    command: list[str]
    log: str
    started_at: float
    start_ticks: int | None = None
    """The leader's start time, in clock ticks after boot (``/proc/PID/stat``); None in records of older versions."""
    boot_id: str = ""
    """The boot the leader started in: after a reboot nothing of the server runs."""


def state_dir() -> Path:
    path = Path(os.environ.get("ANORAG_STATE_DIR") or Path.cwd() / ".anorag" / "servers")
    path.mkdir(parents=True, exist_ok=True)
    return path


def records() -> list[Record]:
    return [record for path in sorted(state_dir().glob("*.json")) if (record := _load(path))]


def _load(path: Path) -> Record | None:
    """The record in ``path``; None when there is none or it cannot be read."""
    with contextlib.suppress(ValueError, TypeError, OSError):
        return Record(**json.loads(path.read_text()))
    return None


def _record(name: str, preset: str, pid: int, url: str, command: Sequence[str], log: str | Path) -> Record:
    """The record of a server whose leader ``pid`` this process started and has not reaped (the pid is still its)."""
    leader = read_process(pid)
    return Record(
        name, preset, pid, url, [str(arg) for arg in command], str(log), time.time(),
        start_ticks=leader.start_ticks if leader else None, boot_id=boot_id(),
    )  # fmt: skip


def _save(record: Record) -> None:
    path = state_dir() / f"{record.name}.json"
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # `status` never reads half a record
    partial.write_text(json.dumps(asdict(record), indent=2))
    partial.replace(path)


def _forget(record: Record) -> None:
    (state_dir() / f"{record.name}.json").unlink(missing_ok=True)


def _port(record: Record) -> int | None:
    with contextlib.suppress(ValueError):
        return urlsplit(record.url).port
    return None


@contextlib.contextmanager
def _claimed(ports: Iterable[int | None], action: str) -> Iterator[None]:
    """Hold the lock file of each port while a start or a stop of its server is under way.

    A claim another command holds is waited for (saying whose it is), so starts of one port run one after the
    other and the later one finds the server the first started. Locks are taken in port order, so two claims
    never wait on each other; the kernel releases them when their holder exits, a crash or SIGKILL included.
    """
    with contextlib.ExitStack() as held:
        for port in sorted({port for port in ports if port is not None}):
            lock = held.enter_context(open(state_dir() / f"port-{port}.lock", "a+"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another anorag-llm command"
                print(f"port {port}: waiting for {holder} to finish", file=sys.stderr, flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            lock.truncate(0)
            lock.write(f"`anorag-llm servers {action}` (pid {os.getpid()})")
            lock.flush()
            held.callback(lock.truncate, 0)  # names nobody once released (runs before the file is closed)
        yield


# --- the processes of a server ------------------------------------------------------------------------------


def processes(record: Record) -> list[Process]:
    """The live processes of the server ``record`` describes: its leader and every process in the session and
    process group it leads, also when the leader has exited (vLLM's engine outlives its API server's SIGKILL).

    The kernel keeps a pid number from being reused while a session or group still bears it, so these are the
    server's unless the whole server ended and the number went to another process, which then leads a
    session of its own: that leader's start time differs from the recorded one (older records compare its
    command line), and then none of them is the server's. Out of reach: a new owner of the number that opened
    a session and exited, leaving processes in it (a double-forking daemon), before the server's stop.
    """
    if not isinstance(record.pid, int) or record.pid <= 1 or not isinstance(record.start_ticks, int | None):
        return []  # a damaged record matches nothing rather than everything (pid 0's "group" is the kernel's)
    if (record.boot_id and record.boot_id != boot_id()) or (record.start_ticks is None and not record.command):
        return []  # rebooted since; or a record of an older version without the command to compare
    table = (read_process(entry) for entry in os.listdir("/proc") if entry.isdigit())
    bearing = [p for p in table if p is not None and record.pid in (p.group, p.session)]
    leader = next((p for p in bearing if p.pid == record.pid), None)
    if leader is not None and not _is_leader(record, leader):
        return []
    since = record.start_ticks or 0
    return [p for p in bearing if not p.exited and p.start_ticks >= since]


def _is_leader(record: Record, process: Process) -> bool:
    if record.start_ticks is not None:
        return process.start_ticks == record.start_ticks
    return process.exited or _command_matches(record)


def _command_matches(record: Record) -> bool:
    """Whether the process ``record.pid`` runs the recorded command (for records without a start time)."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    started = [arg.encode() for arg in record.command]
    if not started:
        return False
    return any(cmdline[i : i + len(started)] == started for i in range(len(cmdline))) or (
        # the console script re-executes itself: compare the flags we passed
        all(arg in cmdline for arg in started[1:])
    )


def running(record: Record) -> bool:
    """Whether anything of the server still runs (its leader, or what the leader left in its session)."""
    return bool(processes(record))


def _pids(found: Iterable[int]) -> str:
    pids = sorted(set(found))
    return f"pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def _describe(record: Record, found: Iterable[int]) -> str:
    """``pid 12`` or ``pids 12, 15``, noting a leader that has exited (what runs is what it left behind)."""
    pids = set(found)
    said = _pids(pids)
    return said if record.pid in pids else f"{said}, left by its leader (pid {record.pid}), which had exited"


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
    with _claimed([config.port], "start"):
        _refuse_taken(name, config.port)
        command = vllm_command(config)
        log = state_dir() / f"{name}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        record = _record(name, preset, proc.pid, f"http://127.0.0.1:{config.port}/v1", command, log)
        _save(record)
    return [record]


def _start_local(preset: str, servers: list[LocalServer]) -> list[Record]:
    with _claimed([server.port for server in servers], "start"):
        for server in servers:
            _refuse_taken(f"{preset}-{server.port}", server.port)
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
            name = f"{preset}-{server.port}"
            record = _record(name, preset, server.process.pid, server.base_url, server.command, server.log_path)
            _save(record)
            started.append(record)
    return started


def _refuse_taken(name: str, port: int) -> None:
    """ValueError naming the server this tool started that still runs under ``name`` or on ``port``."""
    for record in records():
        if (record.name == name or _port(record) == port) and (found := processes(record)):
            raise ValueError(
                f"{record.name} is already running: {record.url} ({_describe(record, (p.pid for p in found))}); "
                f"stop it first: anorag-llm servers stop {record.name}"
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
    """Stop the selected servers this tool started, each with what it found running; forget the ones that are gone.

    A record is kept only when something of its server survives SIGKILL (the outcome says which pids).
    """
    outcome = []
    for chosen in select(target):
        with _claimed([_port(chosen)], "stop"):
            record = _load(state_dir() / f"{chosen.name}.json")  # a start or stop holding the lock may have changed it
            said, gone = _stop(record) if record else ("was not running", False)
            if record and gone:
                _forget(record)
        outcome.append((record or chosen, said))
    return outcome


def _stop(record: Record) -> tuple[str, bool]:
    """SIGTERM to every process of the server, SIGKILL to what is left after STOP_TIMEOUT_S: (outcome, all gone)."""
    found = processes(record)
    if not found:
        return "was not running", True
    seen = {p.pid for p in found}
    _signal(record, found, signal.SIGTERM)
    _signal(record, found, signal.SIGCONT)  # a stopped (^Z, SIGSTOP) process acts on the SIGTERM only once resumed
    left = _wait_gone(record, STOP_TIMEOUT_S, seen)
    killed = ""
    if left:
        killed = f" ({_pids(p.pid for p in left)} with SIGKILL, {STOP_TIMEOUT_S:g}s after SIGTERM)"
        _signal(record, left, signal.SIGKILL)
        left = _wait_gone(record, STOP_TIMEOUT_S, seen)
    if left:
        pids = _pids(p.pid for p in left)
        return f"still running after SIGKILL: {pids}; its record is kept (see `ps -s {record.pid}`)", False
    return f"stopped {_describe(record, seen)}{killed}", True


def _signal(record: Record, found: Sequence[Process], signum: signal.Signals) -> None:
    """Send ``signum`` to the server's process group at once (a process it forks meanwhile gets it too) and to
    each of its processes outside that group. The group is the server's: one of its processes is still in it."""
    if any(p.group == record.pid for p in found):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signum)
    for process in found:
        if process.group != record.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signum)


def _wait_gone(record: Record, timeout: float, seen: set[int]) -> list[Process]:
    """Wait until nothing of the server runs; what still does after ``timeout`` (new pids are added to ``seen``)."""
    deadline = time.monotonic() + timeout
    while True:
        if record.pid in seen:  # reap the leader when this process started it (a test, --foreground)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(record.pid, os.WNOHANG)
        left = processes(record)
        seen.update(p.pid for p in left)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(STOP_POLL_S)


def status(target: str | None) -> dict[str, dict[str, Any]]:
    rows = {}
    for record in select(target):
        found = processes(record)
        root = record.url.removesuffix("/v1")
        rows[record.name] = {
            "preset": record.preset,
            "url": record.url,
            "pid": record.pid,
            "running": bool(found),
            "healthy": bool(found) and answers(f"{root}/health"),
            "pids": [p.pid for p in found],
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

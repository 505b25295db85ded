"""The lifecycle of local servers (`anorag-llm servers`, the demo, the test fixtures), with stand-in processes:
nothing outlives its owner, and bad ports or records get a clear answer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from anorag_integrations.cli import main, manage
from anorag_integrations.cli.servers import (
    LocalServer,
    ServerStartError,
    free_port,
    interrupted_by_termination,
    wait_all_ready,
)

HEALTHY_THEN_DIES = """
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Timer(float(sys.argv[2]), lambda: __import__("os")._exit(9)).start()
server.serve_forever()
"""


class Stand(LocalServer):
    """A server process running ``command`` (``{port}`` is replaced by its port)."""

    def __init__(self, tmp: Path, *command: str, timeout: float = 30.0, port: int | None = None) -> None:
        super().__init__(port or free_port(), alias="x", log_dir=tmp)
        self.argv = [part.replace("{port}", str(self.port)) for part in command]
        self.ready_timeout_s = timeout

    def build_command(self) -> list[str]:
        return self.argv


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped by its parent


def test_a_server_that_dies_after_becoming_ready_fails_the_start(tmp_path: Path) -> None:
    """vLLM killed for memory while the next one loads: `ready` earlier does not make it started."""
    dies = Stand(tmp_path, sys.executable, "-c", HEALTHY_THEN_DIES, "{port}", "1.0")
    loads = Stand(tmp_path, "sleep", "600", timeout=60)
    with pytest.raises(ServerStartError, match="exited with status 9"):
        manage._start_local("cpu", [dies, loads])
    assert dies.process is None and loads.process is None and manage.records() == []


def test_an_interrupted_start_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = Stand(tmp_path, "sleep", "600")

    def interrupted(timeout: float | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.process is None


def test_stop_ends_the_group_its_leader_left_behind(tmp_path: Path) -> None:
    """vLLM's engine process survives its API server's SIGKILL: stop() must still end it."""
    child_pid = tmp_path / "child.pid"
    server = Stand(tmp_path, "sh", "-c", f"sleep 600 & echo $! > {child_pid}; exit 0")
    server.start(wait=False)
    assert server.process is not None
    server.process.wait(10)  # the leader is gone
    deadline = time.monotonic() + 10
    while not child_pid.exists() or not child_pid.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    orphan = int(child_pid.read_text())
    assert not _gone(orphan)
    server.stop()
    deadline = time.monotonic() + 10
    while not _gone(orphan):
        assert time.monotonic() < deadline, "the group's survivor is still running"
        time.sleep(0.01)


def test_wait_all_ready_reports_the_dead_one_first(tmp_path: Path) -> None:
    slow, broken = Stand(tmp_path, "sleep", "600", timeout=60), Stand(tmp_path, "sh", "-c", "exit 3")
    for server in (slow, broken):
        server.start(wait=False)
    try:
        begun = time.monotonic()
        with pytest.raises(ServerStartError, match="exited with status 3"):
            wait_all_ready([slow, broken])
        assert time.monotonic() - begun < 30  # not the slow one's timeout
    finally:
        slow.stop()
        broken.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ports", "8301,8301"], "port 8301 is given twice"),
        (["--ports", "8301", "--embeddings", "8301"], "port 8301 is given twice"),
        (["--ports", "abc"], "--ports wants comma-separated port numbers"),
        (["--ports", ","], "--ports wants comma-separated port numbers"),
        (["--ports", "70000"], "port 70000 is not a TCP port"),
    ],
)
def test_bad_ports_are_refused_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    assert main(["servers", "start", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err
    assert manage.records() == []


def test_a_record_without_a_command_matches_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    damaged = manage.Record("cpu-1", "cpu", os.getpid(), "http://127.0.0.1:1/v1", [], str(tmp_path / "x.log"), 0.0)
    assert not manage.running(damaged)


@pytest.mark.parametrize("pid", [0, 1, -os.getpgid(0), "12"])
def test_a_record_with_a_nonsense_pid_matches_no_process(pid: object, tmp_path: Path) -> None:
    """pid 0 would be the kernel threads' group (and killpg(0) our own): such a record is damaged, nothing runs."""
    damaged = manage.Record("cpu-1", "cpu", pid, "http://127.0.0.1:1/v1", ["x"], str(tmp_path / "x.log"), 0.0)  # type: ignore[arg-type]
    assert manage.processes(damaged) == []


def test_sigterm_unwinds_a_command_like_ctrl_c() -> None:
    """So `timeout anorag-llm servers start cpu` stops what it started (the except/finally blocks run)."""
    before = signal.getsignal(signal.SIGTERM)
    reached = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupted_by_termination():  # noqa: PT012
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises before the next line
        reached.append("after the signal")
    assert reached == [] and signal.getsignal(signal.SIGTERM) is before


OWNER_KILLED = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from test_local_servers import HEALTHY_THEN_DIES, Stand
from pathlib import Path
from anorag_integrations.cli.servers import running

with running([Stand(Path(sys.argv[1]), sys.executable, "-c", HEALTHY_THEN_DIES, "{port}", "600")]) as servers:
    print(servers[0].process.pid, flush=True)
    signal.pause()  # a benchmark at work, until its `timeout` sends SIGTERM
"""


def test_a_sigterm_to_a_script_inside_running_stops_its_servers(tmp_path: Path) -> None:
    """A benchmark killed by `timeout` (or by pytest's cleanup) leaves no server behind."""
    import subprocess

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_KILLED, str(tmp_path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    server_pid = int(owner.stdout.readline())
    owner.send_signal(signal.SIGTERM)
    owner.wait(30)
    deadline = time.monotonic() + 10
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server_pid), "the server outlived the script that started it"


# --- `servers stop` when the leader is gone, and pids given to other processes since -------------------------

LEADER_AND_ENGINE = 'python="$1"; shift; "$python" "$@" & echo $! > "{pidfile}"; wait'
"""A leader (the API server) and its engine in its session, like vLLM: the engine serves, the leader waits."""


def _wait_for_pid(path: Path) -> int:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.01)
    return int(path.read_text())


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _engine_server(tmp: Path, *, port: int | None = None, ignore_term: bool = False) -> tuple[Stand, Path]:
    pidfile = tmp / f"engine-{time.monotonic_ns()}.pid"
    script = ("trap '' TERM; " if ignore_term else "") + LEADER_AND_ENGINE.format(pidfile=pidfile)
    server = Stand(tmp, "sh", "-c", script, "sh", sys.executable, "-c", HEALTHY_THEN_DIES, "{port}", "600", port=port)
    return server, pidfile


def test_stop_ends_the_engine_a_dead_leader_left_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM's API server killed, its engine (holding the GPU) still running: `servers stop` ends the engine,
    reports it, and only then forgets the server; meanwhile the port stays claimed by the record."""
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    server, pidfile = _engine_server(tmp_path)
    [record] = manage._start_local("cpu", [server])
    engine = _wait_for_pid(pidfile)
    try:
        assert manage.status(record.name)[record.name]["pids"] == sorted([record.pid, engine])
        assert server.process is not None
        server.process.kill()  # the leader alone, as the OOM killer or a stray `kill -9` would
        server.process.wait(10)
        assert not _gone(engine)
        row = manage.status(record.name)[record.name]
        assert (row["running"], row["pids"]) == (True, [engine])
        left_by = f"pid {engine}, left by its leader (pid {record.pid}), which had exited"
        taken = f"cpu-{server.port} is already running: {record.url} ({left_by}); stop it first"
        with pytest.raises(ValueError, match=re.escape(taken)):
            manage._start_local("llamacpp", [Stand(tmp_path, "sleep", "600", port=server.port)])  # same port
        assert main(["servers", "stop", record.name]) == 0
        assert capsys.readouterr().out == f"{record.name}: stopped {left_by}\n"
        assert _wait_gone(engine) and manage.records() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)


def test_stop_kills_what_ignores_sigterm_and_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(manage, "STOP_TIMEOUT_S", 0.5)
    server, pidfile = _engine_server(tmp_path, ignore_term=True)
    [record] = manage._start_local("cpu", [server])
    engine = _wait_for_pid(pidfile)
    try:
        pids = f"pids {', '.join(map(str, sorted([record.pid, engine])))}"
        assert manage.stop(record.name) == [(record, f"stopped {pids} ({pids} with SIGKILL, 0.5s after SIGTERM)")]
        assert _wait_gone(engine) and manage.records() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)


def test_a_stop_that_cannot_end_everything_keeps_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes a stop may not signal (another user's, say) still run: it says which, and the record stays."""
    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    server, pidfile = _engine_server(tmp_path)
    [record] = manage._start_local("cpu", [server])
    engine = _wait_for_pid(pidfile)
    try:
        with monkeypatch.context() as refused:
            refused.setattr(manage, "_signal", lambda *args: None)
            refused.setattr(manage, "STOP_TIMEOUT_S", 0.2)
            pids = f"pids {', '.join(map(str, sorted([record.pid, engine])))}"
            kept = f"still running after SIGKILL: {pids}; its record is kept (see `ps -s {record.pid}`)"
            assert manage.stop(record.name) == [(record, kept)]
        assert manage.records() == [record]
        assert manage.stop(record.name)[0][1] == f"stopped {pids}"
        assert _wait_gone(engine) and manage.records() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)


UNRELATED = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
"""Another program that got a server's old pid: it leads a session (and a group) of its own, with a child."""


@pytest.mark.parametrize("since", ["the pid was reused", "the machine rebooted"])
def test_a_pid_given_to_another_process_is_never_signalled(
    since: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The record's pid and command line both match a live process, but it started at another time (or boot):
    it is not ours, and neither is its session."""
    import subprocess

    monkeypatch.setenv("ANORAG_STATE_DIR", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", UNRELATED], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(members := manage.processes(manage._record("x", "cpu", other.pid, "", ["x"], ""))) < 2:
            assert time.monotonic() < deadline, "the unrelated process never started its child"
            time.sleep(0.01)
        record = manage._record("cpu-1", "cpu", other.pid, "http://127.0.0.1:1/v1", other.args, tmp_path / "x.log")
        if since == "the pid was reused":
            assert record.start_ticks is not None
            record.start_ticks -= 1  # the server that had this pid started earlier
        else:
            record.boot_id = "an earlier boot"
        manage._save(record)
        assert manage._command_matches(record)  # what the old check relied on
        assert not manage.running(record) and manage.status(None)["cpu-1"]["running"] is False
        assert main(["servers", "stop", "cpu-1"]) == 0
        assert capsys.readouterr().out == "cpu-1: was not running\n"
        assert manage.records() == []
        assert not any(_gone(p.pid) for p in members)  # the unrelated program and its child still run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(other.pid, signal.SIGKILL)
        other.wait(10)


# --- concurrent `servers start` of one preset -------------------------------------------------------------

SLOW_TO_BIND = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))  # loading the model; the port is bound only then (a second one fails here)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

RACER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_local_servers import SLOW_TO_BIND, Stand
from anorag_integrations.cli import main, manage
import anorag_integrations.router  # imported before the gate opens, as main() would after

tmp, port, go = Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
engine = [sys.executable, "-c", SLOW_TO_BIND, "{port}", "1.0"]
manage.local_servers = lambda *args, **kwargs: [Stand(tmp, *engine, port=port)]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
sys.exit(main(["servers", "start", "cpu", "--ports", str(port)]))
"""


@pytest.mark.parametrize("arrival", ["together", "while the first loads"])
def test_concurrent_starts_of_one_preset_let_exactly_one_win(
    arrival: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `servers start cpu` on one port: one starts it, the other is told which server runs and how to stop
    it, and the server holding the port is the one recorded (stopping it frees the port)."""
    import subprocess

    from anorag_integrations.cli.servers import answers

    state, port = tmp_path / "state", free_port()
    monkeypatch.setenv("ANORAG_STATE_DIR", str(state))
    gates = [tmp_path / "go-1", tmp_path / "go-2"]
    argv = [sys.executable, "-c", RACER, str(Path(__file__).parent), str(tmp_path), str(port)]
    racers = [subprocess.Popen([*argv, str(gate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for gate in gates]  # fmt: skip
    try:
        assert all(racer.stdout and racer.stdout.readline() == "ready\n" for racer in racers)
        gates[0].touch()
        if arrival == "while the first loads":  # the reported race: the second arrives as the first's engine loads
            log = tmp_path / f"server-{port}.log"
            deadline = time.monotonic() + 30
            while not log.exists():
                assert time.monotonic() < deadline
                time.sleep(0.005)
        gates[1].touch()
        results = [(racer.wait(60), *racer.communicate()) for racer in racers]
        [winner] = [out for status, out, _ in results if status == 0]
        [(status, _, refusal)] = [result for result in results if result[0] != 0]
        [record] = manage.records()
        assert f"started cpu-{port}: {record.url} (pid {record.pid}," in winner
        assert status == 2
        assert f"cpu-{port} is already running: http://127.0.0.1:{port}/v1 (pid {record.pid})" in refusal
        assert f"stop it first: anorag-llm servers stop cpu-{port}" in refusal
        assert manage.running(record) and answers(f"http://127.0.0.1:{port}/health")
        assert manage.stop(None) == [(record, f"stopped pid {record.pid}")]
        assert not answers(f"http://127.0.0.1:{port}/health")  # the recorded server was the one on the port
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
        manage.stop(None)


HOLDS_THE_LOCK = """
import sys, time
from anorag_integrations.cli import manage
with manage._claimed([int(sys.argv[1])], "start"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_start_waits_for_the_lock_and_its_holder_dying_releases_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start waits for another start of its port, saying whose; a holder killed mid-way (SIGKILL, a crash)
    blocks nobody: the kernel drops its lock, and the waiting start goes on."""
    import subprocess

    state, port = tmp_path / "state", free_port()
    monkeypatch.setenv("ANORAG_STATE_DIR", str(state))
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_THE_LOCK, str(port)], stdout=subprocess.PIPE, text=True)
    (tmp_path / "go").touch()
    argv = [sys.executable, "-c", RACER, str(Path(__file__).parent), str(tmp_path), str(port), str(tmp_path / "go")]
    waiting = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert waiting.stdout is not None and waiting.stdout.readline() == "ready\n"
        assert waiting.stderr is not None
        said = waiting.stderr.readline()
        assert said == f"port {port}: waiting for `anorag-llm servers start` (pid {holder.pid}) to finish\n"
        assert waiting.poll() is None and not (tmp_path / f"server-{port}.log").exists()  # nothing started yet
        holder.kill()
        holder.wait(10)
        assert waiting.wait(60) == 0
        [record] = manage.records()
        assert manage.running(record)
    finally:
        for process in (holder, waiting):
            if process.poll() is None:
                process.kill()
            process.communicate()
        manage.stop(None)

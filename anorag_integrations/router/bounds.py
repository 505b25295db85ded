"""Whole-attempt time bounds for sync calls: a timer thread that cuts an attempt's socket at its bound.

httpx bounds each read, not a response: a server that trickles one byte a second never times out,
and neither would ``deadline``. Async attempts run under ``asyncio.timeout``; a sync attempt arms a
:class:`Watch`, the transport below attaches the response's socket to it when the headers arrive,
and at the bound the timer thread shuts that socket down, so the blocked read returns at once. Until
the headers come, the transport bounds each read by the time left, for any client it serves (the
openai SDK's and Ollama's alike).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from types import ModuleType
from typing import Any

COMPACT_ABOVE = 8192
"""Heap size past which ended watches are swept out (they are otherwise dropped when their time comes)."""

_current = threading.local()
"""The watch of the sync attempt this thread is sending, if any (read by the transport)."""


class Watch:
    """The time bound of one sync attempt and the sockets to cut when it passes."""

    __slots__ = ("_lock", "_sockets", "at", "ended", "fired", "reason")

    def __init__(self, at: float) -> None:
        self.at = at
        """Monotonic time of the bound; may be moved later while armed (a stream's next chunk)."""
        self.fired = False
        """The socket was cut (``reason`` says why): the attempt's failure is this bound's doing."""
        self.ended = False
        self.reason = ""
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.ended:
                return
            if not self.fired:
                self._sockets.append(sock)
                return
        _cut(sock)  # the bound passed before the headers came

    def fire(self, reason: str) -> None:
        """Cut the attempt now (its bound passed, or the router is closing)."""
        with self._lock:
            if self.fired or self.ended:
                return
            self.fired, self.reason = True, reason
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _cut(sock)

    def end(self) -> None:
        """The attempt ended: never cut its socket (it may go back to the pool)."""
        with self._lock:
            self.ended = True
            self._sockets.clear()

    def __enter__(self) -> Watch:
        _current.watch = self
        return self

    def __exit__(self, *exc: object) -> None:
        _current.watch = None


def _cut(sock: socket.socket) -> None:
    # shutdown, not close: it wakes a read blocked in another thread; the pool then drops the connection
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """One timer thread for the process: fires each armed :class:`Watch` whose time has come."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._compact_at = COMPACT_ABOVE
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, watch: Watch) -> None:
        """Schedule ``watch`` to fire at ``watch.at`` (re-arm after moving ``at`` later: call again)."""
        with self._cond:
            if len(self._heap) > self._compact_at:  # ended watches wait for their time in the heap: drop them
                self._heap = [entry for entry in self._heap if not entry[2].ended]
                heapq.heapify(self._heap)
                self._compact_at = max(COMPACT_ABOVE, 2 * len(self._heap))
            heapq.heappush(self._heap, (watch.at, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="anorag-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].ended or self._heap[0][0] <= now):
                    _, _, watch = heapq.heappop(self._heap)
                    if watch.ended or watch.fired:
                        continue
                    if watch.at <= now:
                        watch.fire("timed out")
                    else:
                        heapq.heappush(self._heap, (watch.at, next(self._order), watch))  # moved later
                self._cond.wait(min(self._heap[0][0] - now, 3600.0) if self._heap else None)


WATCHDOG = Watchdog()


def watched_transport(httpx_module: ModuleType, **options: Any) -> Any:
    """A sync transport of ``httpx_module`` (the openai SDK's httpx2, or httpx for Ollama's client)
    that bounds the wait for headers by the calling thread's :class:`Watch` and attaches the response's
    socket to it."""
    base = httpx_module.HTTPTransport
    cls = _WATCHED.get(base)
    if cls is None:
        cls = _WATCHED.setdefault(base, type("WatchedTransport", (base,), {"handle_request": _handle_request}))
    return cls(**options)


_WATCHED: dict[type, type] = {}


def _handle_request(self: Any, request: Any) -> Any:
    watch: Watch | None = getattr(_current, "watch", None)
    if watch is not None:  # until the headers come, each read is bounded by the time left
        left = max(0.001, watch.at - time.monotonic())
        timeouts = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            kind: left if timeouts.get(kind) is None else min(timeouts[kind], left)
            for kind in ("connect", "read", "write", "pool")
        }
    response = super(type(self), self).handle_request(request)
    if watch is not None:
        stream: Any = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            watch.attach(sock)
    return response

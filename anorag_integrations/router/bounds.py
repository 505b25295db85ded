"""Whole-attempt time bounds: a timer thread that cuts a sync attempt's socket, a loop timer for async.

httpx bounds each read, not a response: a server that trickles one byte a second never times out,
and neither would ``deadline``. An async attempt runs under a :class:`Timer` that cancels the
router's own await when its bound passes. A sync attempt arms a :class:`Watch`: the transport's
connections attach their socket to the calling thread's watch when the request is written, and at
the bound (or when the router closes) the timer thread shuts that socket down, so a read blocked
anywhere (waiting for headers, mid-body, mid-stream) returns at once. Until the headers come, the
transport also bounds each read by the time left.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import socket
import threading
import time
from types import ModuleType
from typing import Any

from . import forks

COMPACT_ABOVE = 8192
"""Heap size past which stale entries are swept out (they are otherwise dropped when their time comes)."""

_current = threading.local()
"""The watch of the sync attempt this thread is sending, if any (read by the transport)."""


class Watch:
    """The time bound of one sync attempt and the sockets to cut when it passes."""

    __slots__ = ("_lock", "_sockets", "at", "ended", "fired", "queued", "reason")

    def __init__(self, at: float) -> None:
        self.at = at
        """Monotonic time of the bound. Moving it later needs nothing more; earlier: ``WATCHDOG.arm`` again."""
        self.fired = False
        """The socket was cut (``reason`` says why): the attempt's failure is this bound's doing."""
        self.ended = False
        self.reason = ""
        self.queued: tuple[float, int] = (float("inf"), -1)
        """The watchdog's live entry for this watch (time, sequence); older entries are stale."""
        self._sockets: list[socket.socket] = []
        self._lock = forks.lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.ended:
                return
            if not self.fired:
                if sock not in self._sockets:
                    self._sockets.append(sock)
                return
        _cut(sock)  # fired before this socket was written to

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
        """The attempt is over: never cut its socket (it may go back to the pool)."""
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
        self._cond = forks.condition()
        self._thread: threading.Thread | None = None
        self._compact_at = COMPACT_ABOVE

    def renew_after_fork(self) -> None:
        """In a forked child: the timer thread is gone and the armed watches are the parent's calls'."""
        self._heap, self._thread = [], None

    def arm(self, watch: Watch) -> None:
        """Schedule ``watch`` to fire at ``watch.at`` (again, after moving ``at`` earlier)."""
        with self._cond:
            if len(self._heap) > self._compact_at:
                self._heap = [entry for entry in self._heap if _live(entry)]
                heapq.heapify(self._heap)
                self._compact_at = max(COMPACT_ABOVE, 2 * len(self._heap))
            self._push(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="anorag-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()

    def move(self, watch: Watch, at: float) -> None:
        """Move ``watch``'s bound to ``at``; queue it again only when that is earlier than its entry.

        Under the lock: the timer thread may be re-queueing the same watch at its old bound meanwhile.
        """
        with self._cond:
            watch.at = at
            if at < watch.queued[0]:
                self._push(watch)
                if self._heap[0][2] is watch:
                    self._cond.notify()

    def _push(self, watch: Watch) -> None:
        entry = (watch.at, next(self._order), watch)
        watch.queued = entry[:2]
        heapq.heappush(self._heap, entry)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (not _live(self._heap[0]) or self._heap[0][0] <= now):
                    entry = heapq.heappop(self._heap)
                    watch = entry[2]
                    if not _live(entry):
                        continue
                    if watch.at <= now:
                        watch.fire("timed out")
                    else:
                        self._push(watch)  # its bound moved later meanwhile
                self._cond.wait(min(self._heap[0][0] - now, 3600.0) if self._heap else None)


def _live(entry: tuple[float, int, Watch]) -> bool:
    watch = entry[2]
    return not (watch.ended or watch.fired) and watch.queued == entry[:2]


WATCHDOG = Watchdog()
forks.renew_in_child(WATCHDOG)


# --- the transport -------------------------------------------------------------------------------------


def watched_transport(httpx_module: ModuleType, **options: Any) -> Any:
    """A sync transport of ``httpx_module`` (the openai SDK's httpx2, or httpx for Ollama's client)
    whose connections attach their socket to the calling thread's :class:`Watch`."""
    base = httpx_module.HTTPTransport
    cls = _WATCHED.get(base)
    if cls is None:
        cls = _WATCHED.setdefault(base, type("WatchedTransport", (base,), {"handle_request": _handle_request}))
    transport = cls(**options)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is not None:  # httpcore's pool: wrap the backend so each socket is known when written to
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    return transport


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
    if watch is not None:  # in case the backend could not be wrapped
        stream: Any = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            watch.attach(sock)
    return response


class _Backend:
    """httpcore's sync network backend, handing out :class:`_Stream` wrappers."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _Stream:
        return _Stream(self._inner.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _Stream:
        return _Stream(self._inner.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Stream:
    """A connection's stream: writing a request attaches the socket to the thread's watch."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        watch: Watch | None = getattr(_current, "watch", None)
        if watch is not None:
            sock = self._inner.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                watch.attach(sock)
        self._inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self._inner.read(max_bytes, timeout)
        return data

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> _Stream:
        return _Stream(self._inner.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


# --- async attempts --------------------------------------------------------------------------------------


class Timer:
    """The time bound of one async attempt: one loop timer, moved by assignment (a stream moves it per chunk).

    When ``at`` passes while the call awaits the router's own read, the task is cancelled and
    ``expired`` is set, so the attempt reads it as a timeout. While the caller holds a chunk
    (``ctl.awaiting`` false) nothing fires; the next read starts a fresh bound. ``asyncio.timeout``
    per chunk cost about 7 us; this costs a float assignment.
    """

    __slots__ = ("_handle", "_scheduled", "at", "ctl", "expired", "loop")

    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl
        self.at = float("inf")
        self.expired = False
        self.loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled = float("inf")

    def start(self, at: float) -> None:
        """Bound the read that starts now by ``at`` (monotonic, the loop's clock)."""
        self.at = at
        if at < self._scheduled:
            if self._handle is not None:
                self._handle.cancel()
            self._scheduled = at
            self._handle = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle, self._scheduled = None, float("inf")
        if not self.ctl.awaiting:
            return  # the caller holds a chunk: its next read sets a fresh bound
        if self.loop.time() < self.at:
            self.start(self.at)  # moved later since: wait for it
            return
        self.expire()

    def expire(self) -> None:
        """Cancel the awaited read now, read as this bound's timeout (on the loop, while ``ctl.awaiting``)."""
        task = self.ctl.task
        if task is not None and not task.done():
            self.expired = True
            task.cancel("attempt timed out")

    def taken(self) -> bool:
        """A cancellation was this timer's: take it back from the task (True), or not ours (False)."""
        if not self.expired:
            return False
        self.expired = False
        task = self.ctl.task
        # Another cancellation came in the same tick (the caller's, its asyncio.timeout): that one wins.
        return task is None or task.uncancel() == 0

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._scheduled = float("inf")

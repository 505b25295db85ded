"""The router's own event loop, in a daemon thread: where sync calls run work that needs a loop.

A sync call that hedges (the race needs cancellable requests) or embeds several batches at once
runs its async twin there and waits for it: the caller needs no event loop of its own, and one
already running in the caller's thread (a notebook's) is neither used nor blocked by the router's.
``Router.close()`` stops the loop, cancelling what still runs there; the waiting caller then gets
``RouterClosed``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from . import forks
from .errors import RouterClosed

if TYPE_CHECKING:
    from .endpoints.route import Route

_T = TypeVar("_T")

OVERDUE_GRACE_S = 1.0
"""How long past a call's deadline :meth:`LoopThread.run` waits for the coroutine's own deadline error."""


class Overdue(Exception):
    """The router's loop did not finish the work within the call's deadline (the caller raises its own error)."""


class LoopThread:
    """An event loop in a daemon thread, started on first use, stopped once by :meth:`stop`."""

    def __init__(self) -> None:
        self._lock = forks.lock()
        self._started: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._stopped = False

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._stopped:
                raise RouterClosed()
            if self._started is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="anorag-router-loop", daemon=True)
                thread.start()
                self._started = (loop, thread)
            return self._started[0]

    def renew_after_fork(self) -> None:
        """In a forked child: the loop's thread is gone, so a new loop starts on first use (unless stopped)."""
        self._started = None

    def run(self, coro: Coroutine[Any, Any, _T], within: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result (from a thread that is not the loop's).

        An exception in the waiting thread (KeyboardInterrupt) cancels the coroutine; a coroutine
        cancelled by :meth:`stop` raises ``RouterClosed``. ``within``: the call's time left (None: no
        bound); when the coroutine has not ended a second past it (its own deadline error comes first),
        it is cancelled and :class:`Overdue` raised, so no caller waits forever on a loop nobody runs.
        """
        try:
            loop = self.loop()
        except BaseException:
            coro.close()  # never scheduled: no "coroutine was never awaited" warning
            raise
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(None if within is None else max(within, 0.0) + OVERDUE_GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Overdue() from None
        except concurrent.futures.CancelledError:
            raise RouterClosed("the router was closed while this call was in flight") from None
        except BaseException:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop without waiting for it (background work: its result and errors are its own);
        dropped when the loop is stopped."""
        try:
            loop = self.loop()
        except RouterClosed:
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, loop)

    def stop(self, routes: Iterable[Route] = (), *, wait: bool = True) -> None:
        """Cancel what still runs there, close the routes' clients of that loop, stop it."""
        with self._lock:
            started, self._started, self._stopped = self._started, None, True
        if started is None:
            return
        loop, thread = started

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            for route in routes:
                await route.aclose()

        if not wait:
            loop.call_soon_threadsafe(loop.stop)
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

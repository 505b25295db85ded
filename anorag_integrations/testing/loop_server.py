"""An aiohttp app on loopback, served from a thread and event loop of its own: FaultServer's lifecycle.

Tests and benchmarks drive it from plain synchronous code: ``start``/``stop`` (or ``with``) from any
thread, while the handlers run on the server's loop. Listening can be switched off and on (a dead
process: connections refused), and ``_release`` wakes the handlers a fault keeps waiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, Self

from aiohttp import web

START_TIMEOUT_S = 10.0
"""How long ``start`` waits for the server to listen, and ``stop`` for its thread to end."""


class LoopServer:
    """The thread, the loop and the listening socket; a subclass adds its endpoints in ``_add_routes``."""

    abort_on_disconnect = True
    """Whether a client that disconnects cancels its request's handler, wherever it waits (vLLM aborts such a
    request and frees its place); set before ``start``."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        """The server thread's name."""
        self.host = host
        self.port = port
        """The port listened on (0 until started: the system picks one)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._release: asyncio.Event | None = None
        """Set (then renewed) to wake the handlers a fault keeps waiting."""
        self._stopping = False

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"fault server did not start within {START_TIMEOUT_S:g} s")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- hooks for a subclass ----------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        """The endpoints this server speaks."""

    def _starting(self) -> None:
        """Make what belongs to the new loop, on its thread, before the app is built."""

    # --- the event loop thread ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the server's loop and wait for it (from any other thread)."""
        assert self._loop is not None, "server not started"
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=START_TIMEOUT_S)

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._release = asyncio.Event()
        self._stopping = False
        self._starting()
        app = web.Application()
        self._add_routes(app)
        # A client that disconnects cancels its handler (aiohttp does not by default): vLLM aborts such a request.
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=self.abort_on_disconnect
        )
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(self._listen())
        ready.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # handlers still sleeping or hung at shutdown
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _stop_listening(self, drop: bool = True) -> None:
        """Stop accepting and drop kept-alive connections, as a dead process would (``drop=False``: keep them open,
        as vLLM does with the requests in flight on SIGTERM)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if not drop:
            return
        server = self._runner.server if self._runner is not None else None
        for handler in list(server.connections if server is not None else ()):
            handler.force_close()

    async def _wake_hung(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    async def _shutdown(self) -> None:
        self._stopping = True  # trickling handlers drop their connection instead of finishing
        await self._wake_hung()
        if self._runner is not None:
            await self._runner.cleanup()

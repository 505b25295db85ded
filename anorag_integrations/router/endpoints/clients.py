"""The openai SDK clients a route speaks through: one async client per event loop, pools that never race the server.

An async client's connection pool belongs to one event loop, so ``PerLoop`` keeps one per loop and
closes it with its loop. Pooled connections expire (``KEEPALIVE_S``) before vLLM's and llama.cpp's do.
``ChunkStream`` and ``AsyncChunkStream`` are what a started stream looks like to the router, whichever
client (the openai SDK's, Ollama's) made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
import ssl
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

import openai
from openai.types.chat import ChatCompletionChunk

from .. import forks

_C = TypeVar("_C")

SDK_HTTPX = sys.modules[openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0]]
"""The httpx package the openai SDK is built on (httpx2 in openai 3; httpx before)."""

KEEPALIVE_S = 2.0
"""How long an idle pooled connection is reused. vLLM (uvicorn) and llama.cpp close idle connections
after 5 s, the SDK's own expiry: at that boundary a request goes out on a connection the server has
just closed and fails with "Server disconnected" (seen on llama.cpp in the prefix-affinity
benchmark). Expiring ours well before theirs removes the race."""
LIMITS = type(openai.DEFAULT_CONNECTION_LIMITS)(
    max_connections=openai.DEFAULT_CONNECTION_LIMITS.max_connections,
    max_keepalive_connections=openai.DEFAULT_CONNECTION_LIMITS.max_keepalive_connections,
    keepalive_expiry=KEEPALIVE_S,
)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every client of the process shares (the SDK's default: its CA bundle, ``SSL_CERT_FILE``).

    httpx builds one per client by default, loading the CA bundle each time: about 30 ms of CPU per client,
    paid for every route added, every loop of an ``asyncio.run`` per call; shared, a client costs 0.2 ms.
    """
    context: ssl.SSLContext = SDK_HTTPX.create_ssl_context()
    return context


def prepared(client: _C) -> _C:
    """A client just built (under ``forks.building()``), with what its first request imports lazily imported now.

    A module half-imported by another thread when the process forks stays broken in the child (seen:
    "unknown encoding: idna" on every probe of a child forked during the first probe).
    """
    global _imported
    if not _imported:  # imports are the process's: once is enough (asyncio.run per call builds a client each time)
        for resource in ("chat", "embeddings", "models"):  # the SDK imports each resource on first access
            getattr(client, resource, None)
        "localhost".encode("idna")  # host names are encoded with it: imports encodings.idna and stringprep
        with contextlib.suppress(ImportError):  # the async transport's event-loop backend
            importlib.import_module("anyio._backends._asyncio")
        _imported = True
    return client


_imported = False
"""Whether :func:`prepared` has imported what a first request needs (done once a process)."""


def _settle_sdk() -> None:
    """Before ``fork()``: the openai SDK's once-a-process platform detection for its headers, done now.

    It runs on a client's first request, under locks of the standard library's cached properties
    (``platform``); a fork while the prober's first probe held one left the child waiting on it forever.
    Done here, the forking thread waits for a thread that is doing it, and later forks find it cached.
    """
    with openai.OpenAI(api_key="-", base_url="http://127.0.0.1/v1", max_retries=0) as client:
        client.default_headers  # noqa: B018  # computed and cached for the process


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_settle_sdk)  # registered after forks.py's hooks: runs before them


class ChunkStream(Protocol):
    """A started stream: iterate for chunks, ``close()`` to drop the connection."""

    def __iter__(self) -> Iterator[ChatCompletionChunk]: ...
    def close(self) -> None: ...


class AsyncChunkStream(Protocol):
    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]: ...
    async def close(self) -> None: ...


class PerLoop(Generic[_C]):
    """One async client per event loop (connection pools cannot cross loops), closed with its loop.

    Each client is tied to a small async generator the loop knows of: ``asyncio.run`` (and any loop
    shut down with ``shutdown_asyncgens``) finalises it, which closes the client and forgets it, so an
    ``asyncio.run`` per call leaks no loop, client or connection.
    """

    def __init__(self, factory: Callable[[], _C], close: Callable[[_C], Awaitable[object]]) -> None:
        self._factory, self._close = factory, close
        self._clients: dict[asyncio.AbstractEventLoop, tuple[_C, AsyncGenerator[None, None]]] = {}
        self._lock = forks.lock()

    def get(self) -> _C:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            with self._lock:
                entry = self._clients.get(loop)
                if entry is None:
                    self._sweep()
                    with forks.building():
                        client = prepared(self._factory())
                    keeper = self._keeper(loop, client)
                    with contextlib.suppress(StopIteration):
                        keeper.asend(None).send(None)  # runs to its first yield: the loop now tracks it
                    entry = self._clients[loop] = (client, keeper)
        return entry[0]

    async def _keeper(self, loop: asyncio.AbstractEventLoop, client: _C) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with self._lock:
                self._clients.pop(loop, None)
            await self._close(client)

    def renew_after_fork(self) -> None:
        """In a forked child: forget the parent's clients unclosed (closing would end the parent's connections)."""
        self._clients = {}

    def _sweep(self) -> None:
        """Forget clients of loops closed without shutting down their async generators."""
        for loop in [loop for loop in self._clients if loop.is_closed()]:
            del self._clients[loop]

    async def aclose(self) -> None:
        """Close the running loop's client now."""
        with self._lock:
            entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()

    def close_all(self) -> None:
        """Close every loop's client on its own loop (a route that left the router); a stopped loop's is dropped."""
        with self._lock:
            entries, self._clients = list(self._clients.items()), {}
        for loop, (_, keeper) in entries:
            if loop.is_running():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to close on
                    asyncio.run_coroutine_threadsafe(keeper.aclose(), loop)

    def __len__(self) -> int:
        return len(self._clients)

"""Malformed answers for ``FaultServer``: what a hostile server or a broken proxy sends instead of JSON.

Each helper builds one kind of bad answer; ``FaultServer`` picks them by ``Fault`` (chat requests)
or by ``models_fault`` (``GET /v1/models``). They are well framed at the HTTP level (a status line,
headers, a body of the length announced) unless their docstring says otherwise: what is broken is the
content, so a client has to cope with it or fail cleanly, not hang or crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from itertools import cycle
from typing import Any

from aiohttp import web

HTML_PAGE = """<!DOCTYPE html>
<html>
<head><title>Network login required</title></head>
<body>
<h1>Network login required</h1>
<p>You must sign in before using this network. <a href="http://login.example/">Sign in</a></p>
<hr><center>proxy</center>
</body>
</html>
"""
"""The page a captive portal or a load balancer sends in place of the server's answer."""

INVALID_JSON = '{"id": garbage, not json'
"""A body that starts like a completion and is not JSON."""

SSE_NOISE = (b": comment\n\n", b"retry: 100\n\n", b"id: 7\n\n", b"event: ping\n\n", b"data: {}\n\n")
"""Blocks a server may send between chunks: legal SSE a client must skip (``data: {}`` is an event
whose data is an object without ``choices``)."""

MODELS_FAULTS = ("html", "null", "invalid", "string", "no_data")
"""The malformed answers ``FaultServer.models_fault`` can make ``GET /v1/models`` send."""

Write = Callable[[bytes], Awaitable[None]]


def html_page(status: int = 200) -> web.Response:
    """``text/html`` page, status 200 unless told (a proxy's own error page: 502, 503)."""
    return web.Response(status=status, text=HTML_PAGE, content_type="text/html")


def json_text(text: str | bytes, *, close: bool = False) -> web.Response:
    """HTTP 200 ``application/json`` with ``text`` as the body, as it is; ``close``: the server closes
    the connection after it (``Connection: close``), as a proxy that lost its upstream would."""
    body = text.encode() if isinstance(text, str) else text
    response = web.Response(body=body, content_type="application/json")
    if close:
        response.force_close()
    return response


def truncated(data: bytes, keep: int | None = None) -> bytes:
    """The first ``keep`` bytes of ``data`` (default: half), never all of it."""
    size = len(data) // 2 if keep is None else keep
    return data[: max(0, min(size, len(data) - 1))]


def truncated_event(event: bytes, keep: int | None = None) -> bytes:
    """An SSE ``data:`` event whose JSON is cut: ``keep`` bytes of it (default: half), then ``\\n\\n``."""
    payload = event.removeprefix(b"data: ").rstrip(b"\n")
    return b"data: " + truncated(payload, keep) + b"\n\n"


def value_events(value: Any, count: int) -> bytes:
    """``count`` SSE events whose data is ``value`` as JSON (e.g. ``data: "ok"``), then ``[DONE]``."""
    return f"data: {json.dumps(value)}\n\n".encode() * count + b"data: [DONE]\n\n"


def noise() -> Iterator[bytes]:
    """Noise to write before each chunk of a stream: all kinds before the first, then one at a time."""
    yield b"".join(SSE_NOISE)
    yield from cycle(SSE_NOISE)


def noisy(write: Write) -> Write:
    """``write`` with ``noise()`` before each chunk it writes."""
    blocks = noise()

    async def write_noisy(data: bytes) -> None:
        await write(next(blocks) + data)

    return write_noisy


def models_answer(kind: str) -> web.Response:
    """A malformed ``GET /v1/models`` answer, all HTTP 200; ``kind`` is one of ``MODELS_FAULTS``."""
    if kind == "html":
        return html_page()
    bodies = {"null": "null", "invalid": INVALID_JSON, "string": '"x"', "no_data": '{"object": "list"}'}
    return json_text(bodies[kind])


async def trickle(write: Write, data: bytes, interval: float, released: asyncio.Event) -> bytes:
    """Write ``data`` one byte at a time, ``interval`` seconds apart, until ``released`` is set.

    Returns what is left unsent when it was set (empty when all was sent). Each byte arrives before
    any read timeout longer than ``interval``, yet the whole takes ``len(data) * interval`` seconds.
    """
    for i in range(len(data)):
        if released.is_set():
            return data[i:]
        await write(data[i : i + 1])
        if i + 1 < len(data):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), interval)
    return b""

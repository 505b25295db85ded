"""Streams: fail over until the first content chunk, then deliver; continue or explain a later cut.

A stream is opened on a route and read up to its first chunk that carries something (text,
reasoning, tool calls, a finish, usage); until then a failure moves it to another route, invisibly.
After that, a failure either continues the answer on a route with ``continue_streams`` (vLLM's
``continue_final_message``: one stream id, no second role chunk, nothing repeated or dropped) or
raises ``StreamInterruptedError`` with exactly what was delivered. Every chunk is checked before it
is delivered (a malformed one is the route's failure); so is the answer itself: an HTTP 200 that is no
event stream (a captive portal's HTML page, a JSON document) is a ``MalformedResponse`` saying what
came back, as it is for a plain call. Each read has a fresh time bound, and the whole stream stays
within the request deadline.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletionChunk

from .call import Call
from .chunks import Tally, cut, has_payload, opens
from .endpoints.answers import PEEK_BYTES, is_event_stream, not_an_event_stream
from .endpoints.clients import SDK_HTTPX
from .errors import AllRoutesFailed, MalformedResponse, RouterClosed, RouterError, StreamCut, StreamInterruptedError
from .info import attach
from .lease import Lease
from .rounds import arounds, rounds

if TYPE_CHECKING:
    from .core import Router
    from .endpoints.route import Route

log = logging.getLogger("anorag_integrations.router")


@dataclass(slots=True)
class Opened:
    """A stream whose first content chunk has arrived: the chunks so far and the rest to read."""

    stream: Any
    pending: list[ChatCompletionChunk]
    ttft_s: float


class Opening:
    """A stream being opened on a route: its chunks up to the first with content, and when it was sent."""

    __slots__ = ("body", "pending", "route", "t0")

    def __init__(self, call: Call, route: Route) -> None:
        self.t0 = time.perf_counter()
        self.route = route
        self.body = call.body_for(route)
        self.pending: list[ChatCompletionChunk] = []

    def add(self, chunk: ChatCompletionChunk) -> bool:
        """Keep a chunk read while opening; True when it starts the answer (the stream is open)."""
        self.pending.append(chunk)
        return opens(chunk)

    def opened(self, stream: Any) -> Opened:
        return Opened(stream, self.pending, time.perf_counter() - self.t0)

    def empty(self) -> StreamCut:
        """What a stream that ended before any content is: a cut (the route's transient failure)."""
        return cut(self.route, "before any content")


def _open(call: Call, route: Route, timeout: float) -> Opened:
    """Start a stream on ``route`` and read up to its first chunk with content (inside the lease's bound)."""
    opening = Opening(call, route)
    stream = route.open_stream(opening.body, timeout)
    try:
        if (response := _not_events(stream)) is not None:
            raise _malformed(route, response, _first_bytes(response.iter_bytes()))
        for chunk in stream:
            if opening.add(chunk):
                return opening.opened(stream)
    except BaseException:
        stream.close()
        raise
    stream.close()
    raise opening.empty()


async def _aopen(call: Call, route: Route, timeout: float) -> Opened:
    """Async twin of :func:`_open`."""
    opening = Opening(call, route)
    stream = await route.aopen_stream(opening.body, timeout)
    try:
        if (response := _not_events(stream)) is not None:
            raise _malformed(route, response, await _afirst_bytes(response.aiter_bytes()))
        async for chunk in stream:
            if opening.add(chunk):
                return opening.opened(stream)
    except BaseException:
        await stream.close()
        raise
    await stream.close()
    raise opening.empty()


def _not_events(stream: Any) -> Any:
    """The HTTP response of a stream whose content type says it is no event stream; None when it is one, says
    nothing (a proxy that drops the header: the chunks are checked as they come), or the stream is not the
    openai SDK's (Ollama's native API streams lines its own client reads)."""
    response = getattr(stream, "response", None)
    if not isinstance(response, SDK_HTTPX.Response):
        return None
    content_type = response.headers.get("content-type")
    return None if not content_type or is_event_stream(content_type) else response


def _first_bytes(parts: Iterator[bytes]) -> bytes:
    """The first ``PEEK_BYTES`` or so of a body: what could be read is enough to say what came back."""
    first = b""
    with contextlib.suppress(Exception):
        for part in parts:
            first += part
            if len(first) >= PEEK_BYTES:
                break
    return first


async def _afirst_bytes(parts: AsyncIterator[bytes]) -> bytes:
    first = b""
    with contextlib.suppress(Exception):  # not the caller's cancellation or the attempt's timer: BaseException
        async for part in parts:
            first += part
            if len(first) >= PEEK_BYTES:
                break
    return first


def _malformed(route: Route, response: Any, first: bytes) -> MalformedResponse:
    return MalformedResponse(
        not_an_event_stream(response.headers.get("content-type"), first, route.masked),
        route=route.name,
        url=route.base_url,
        hint="the server (or a proxy in front of it) answered the stream with a page or a document, not "
        "server-sent events; check what is listening at this URL",
    )


def _reads(lease: Lease, stream: Any) -> Iterator[ChatCompletionChunk]:
    """The rest of a sync stream, each read under a fresh bound, the bound paused while the caller holds a chunk."""
    it = iter(stream)
    while True:
        lease.rearm()
        try:
            chunk = next(it)
        except StopIteration:
            return
        lease.pause()
        yield chunk


class _End(enum.Enum):
    END = "end"


_END = _End.END
"""What :func:`_anext` returns when the stream has ended (any chunk, even None, is the route's to answer for)."""


async def _anext(lease: Lease, chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletionChunk | _End:
    """The next chunk of an async stream, read under a fresh bound (a closed router reads nothing more)."""
    if lease.call.ctl.aborted:
        raise RouterClosed("the router was closed while this stream was read")
    try:
        with lease:
            return await anext(chunks)
    except StopAsyncIteration:
        return _END


def stream(router: Router, call: Call) -> Iterator[ChatCompletionChunk]:
    """The caller's stream (sync): see the module docstring; :class:`Delivery` decides, this reads and closes."""
    with call:
        call.enter()
        try:
            now = Delivery(router, call, *rounds(router, call, functools.partial(_open, call)))
            while True:
                lease, opened = now.lease, now.opened
                try:
                    lease.pause()
                    for chunk in itertools.chain(opened.pending, _reads(lease, opened.stream)):
                        yield now.deliver(chunk)
                    now.ended()
                    break
                except BaseException as exc:
                    now.interrupted(exc)
                finally:
                    lease.unwatch()
                    opened.stream.close()
                twin = now.continuation()
                try:
                    lease, opened = rounds(router, twin, functools.partial(_open, twin))
                except RouterError as failed:
                    raise now.not_continued(twin, failed) from now.cause
                now.continued(twin, lease, opened)
            now.succeeded()
        finally:
            call.exit()


async def astream(router: Router, call: Call) -> AsyncIterator[ChatCompletionChunk]:
    """Async twin of :func:`stream`."""
    with call:
        call.enter()
        try:
            now = Delivery(router, call, *await arounds(router, call, functools.partial(_aopen, call)))
            while True:
                lease, opened = now.lease, now.opened
                try:
                    for chunk in opened.pending:
                        yield now.deliver(chunk)
                    chunks = aiter(opened.stream)
                    while (read := await _anext(lease, chunks)) is not _END:
                        yield now.deliver(read)
                    now.ended()
                    break
                except BaseException as exc:
                    now.interrupted(exc)
                finally:
                    await opened.stream.close()
                twin = now.continuation()
                try:
                    lease, opened = await arounds(router, twin, functools.partial(_aopen, twin))
                except RouterError as failed:
                    raise now.not_continued(twin, failed) from now.cause
                now.continued(twin, lease, opened)
            now.succeeded()
        finally:
            call.exit()


class Delivery:
    """The caller's stream across the routes that serve it, without I/O: what both drivers share.

    It holds the attempt in progress (its lease and opened stream) and the :class:`Tally` of what was
    delivered; when a stream breaks after delivery began, it decides whether the answer continues on
    another route or ends in a ``StreamInterruptedError`` that says what was delivered.
    """

    __slots__ = ("call", "cause", "error", "lease", "opened", "router", "tally")

    def __init__(self, router: Router, call: Call, lease: Lease, opened: Opened) -> None:
        self.router, self.call = router, call
        self.lease, self.opened = lease, opened
        self.tally = Tally()
        self.error: StreamInterruptedError | None = None
        """Why the last stream broke, once it has (continued from, or raised)."""
        self.cause: BaseException | None = None
        """What broke it, as it was raised."""
        lease.opened()

    def deliver(self, chunk: ChatCompletionChunk) -> ChatCompletionChunk:
        """A chunk for the caller, counted first (one the adapters cannot read raises: the route's failure)."""
        self.tally.add(chunk)
        return attach(chunk, self.call.info)

    def ended(self) -> None:
        """The route's stream ended: unless it finished, it was cut (raises ``StreamCut``)."""
        self.tally.check(self.lease.route)

    def interrupted(self, exc: BaseException) -> None:
        """A stream broke after delivery began: what was delivered (permanent errors, cancellation and close raise)."""
        route, tally = self.lease.route, self.tally
        tally.cut.add(route.name)
        try:
            error = _delivered(route, tally, self.lease.failed(exc))
        except AllRoutesFailed as failed:  # the request deadline passed mid-stream
            error = _delivered(route, tally, failed).not_continued(failed.reason)
        self.error, self.cause = error, exc

    def continuation(self) -> Call:
        """The call that continues the cut stream elsewhere; raises the stream's error when it cannot be continued."""
        error, tally = self.error, self.tally
        assert error is not None, "continuation() follows interrupted()"
        if error.continuation or not self.router.continuable:
            raise error  # no route has continue_streams: true (the default), or it is too late
        if tally.other:
            raise error.not_continued("reasoning or tool calls had been delivered; only text can be continued")
        return self.call.continuation("".join(tally.text), tally.content_chunks, tally.cut)

    def not_continued(self, twin: Call, failed: RouterError) -> StreamInterruptedError:
        """The stream's error, saying why the continuation failed; the continuation's attempts join the call's."""
        assert self.error is not None, "not_continued() follows interrupted()"
        self.call.info.attempts += twin.info.attempts
        reason = (
            "no other route with continue_streams: true is available"
            if isinstance(failed, AllRoutesFailed) and not twin.info.attempts
            else str(failed)
        )
        return self.error.not_continued(reason)

    def continued(self, twin: Call, lease: Lease, opened: Opened) -> None:
        """Splice a continuation into the caller's stream: no second role chunk, the first stream's id."""
        info = self.call.info
        info.attempts += twin.info.attempts
        info.continued += 1
        lease.route.stats.continued()
        lease.call.info = info  # the continuation's outcome is the caller's
        lease.opened()
        opened.pending = [chunk for chunk in opened.pending if has_payload(chunk)]
        self.lease, self.opened = lease, opened
        log.info("stream continued on route %r after a cut", lease.route.name)

    def succeeded(self) -> None:
        """The answer finished: the last route's attempt succeeded, and the call's span learns what the stream said."""
        self.lease.succeeded(output_tokens=self.tally.tokens, ttft_s=self.opened.ttft_s)
        self.tally.traced(self.call)


def _delivered(route: Route, tally: Tally, cause: BaseException) -> StreamInterruptedError:
    return StreamInterruptedError(
        route=route.name,
        url=route.base_url,
        delivered_chunks=tally.chunks,
        delivered_text="".join(tally.text),
        cause=cause,
    )

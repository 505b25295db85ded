"""Streams: fail over until the first content chunk, then deliver; continue or explain a later cut.

A stream is opened on a route and read up to its first chunk that carries something (text,
reasoning, tool calls, a finish, usage); until then a failure moves it to another route, invisibly.
After that, a failure either continues the answer on a route with ``continue_streams`` (vLLM's
``continue_final_message``: one stream id, no second role chunk, nothing repeated or dropped) or
raises ``StreamInterruptedError`` with exactly what was delivered. Every chunk is checked before it
is delivered (a malformed one is the route's failure); each read has a fresh time bound, and the
whole stream stays within the request deadline.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletionChunk

from .call import Call, attach
from .errors import AllRoutesFailed, RouterClosed, RouterError, StreamCut, StreamInterruptedError
from .lease import Lease
from .rounds import arounds, rounds
from .telemetry import tracing

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


def has_payload(chunk: ChatCompletionChunk) -> bool:
    """Whether a chunk carries something the caller must see (text, reasoning, tools, finish, usage)."""
    return chunk.usage is not None or opens(chunk)


def opens(chunk: ChatCompletionChunk) -> bool:
    """Whether a chunk starts the answer (text, reasoning, tools, finish): from here on, no invisible failover.

    Usage alone does not: a stream that sends only usage has answered nothing.
    """
    for choice in chunk.choices:
        delta = choice.delta
        extra = delta.model_extra or {}
        if (
            choice.finish_reason
            or delta.content
            or delta.tool_calls
            or extra.get("reasoning")
            or extra.get("reasoning_content")
        ):
            return True
    return False


def _open(call: Call, route: Route, timeout: float) -> Opened:
    """Start a stream on ``route`` and read up to its first chunk with content (inside the lease's bound)."""
    import time

    t0 = time.perf_counter()
    stream = route.open_stream(call.body_for(route), timeout)
    pending: list[ChatCompletionChunk] = []
    try:
        for chunk in stream:
            pending.append(chunk)
            if opens(chunk):
                return Opened(stream, pending, time.perf_counter() - t0)
    except BaseException:
        stream.close()
        raise
    stream.close()
    raise cut(route, "before any content")


async def _aopen(call: Call, route: Route, timeout: float) -> Opened:
    import time

    t0 = time.perf_counter()
    stream = await route.aopen_stream(call.body_for(route), timeout)
    pending: list[ChatCompletionChunk] = []
    try:
        async for chunk in stream:
            pending.append(chunk)
            if opens(chunk):
                return Opened(stream, pending, time.perf_counter() - t0)
    except BaseException:
        await stream.close()
        raise
    await stream.close()
    raise cut(route, "before any content")


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


def stream(router: Router, call: Call) -> Iterator[ChatCompletionChunk]:
    """The caller's stream (sync): see the module docstring."""
    with call:
        call.enter()
        try:
            lease, opened = rounds(router, call, functools.partial(_open, call))
            lease.opened()
            tally = Tally()
            while True:
                try:
                    lease.pause()
                    for chunk in itertools.chain(opened.pending, _reads(lease, opened.stream)):
                        tally.add(chunk)
                        yield attach(chunk, call.info)
                    tally.check(lease.route)
                    break
                except BaseException as exc:
                    error, cause = interrupted(lease, tally, exc), exc
                finally:
                    lease.unwatch()
                    opened.stream.close()
                twin = continuation(router, call, tally, error)
                try:
                    lease, opened = rounds(router, twin, functools.partial(_open, twin))
                except RouterError as failed:
                    raise not_continued(call, twin, error, failed) from cause
                continued(call, twin, lease, opened)
            lease.succeeded(output_tokens=tally.tokens, ttft_s=opened.ttft_s)
            tally.traced(call)
        finally:
            call.exit()


async def astream(router: Router, call: Call) -> AsyncIterator[ChatCompletionChunk]:
    """Async twin of :func:`stream`."""
    with call:
        call.enter()
        try:
            lease, opened = await arounds(router, call, functools.partial(_aopen, call))
            lease.opened()
            tally = Tally()
            while True:
                try:
                    for chunk in opened.pending:
                        tally.add(chunk)
                        yield attach(chunk, call.info)
                    chunks = aiter(opened.stream)
                    while True:
                        if call.ctl.aborted:
                            raise RouterClosed("the router was closed while this stream was read")
                        try:
                            with lease:  # each read under a fresh bound
                                chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                        tally.add(chunk)
                        yield attach(chunk, call.info)
                    tally.check(lease.route)
                    break
                except BaseException as exc:
                    error, cause = interrupted(lease, tally, exc), exc
                finally:
                    await opened.stream.close()
                twin = continuation(router, call, tally, error)
                try:
                    lease, opened = await arounds(router, twin, functools.partial(_aopen, twin))
                except RouterError as failed:
                    raise not_continued(call, twin, error, failed) from cause
                continued(call, twin, lease, opened)
            lease.succeeded(output_tokens=tally.tokens, ttft_s=opened.ttft_s)
            tally.traced(call)
        finally:
            call.exit()


def interrupted(lease: Lease, tally: Tally, exc: BaseException) -> StreamInterruptedError:
    """A stream broke after delivery began: what was delivered (permanent errors, cancellation and close raise)."""
    tally.cut.add(lease.route.name)
    route = lease.route
    try:
        error = lease.failed(exc)
    except AllRoutesFailed as failed:  # the request deadline passed mid-stream
        return _delivered(route, tally, failed).not_continued(failed.reason)
    return _delivered(route, tally, error)


def _delivered(route: Route, tally: Tally, cause: BaseException) -> StreamInterruptedError:
    return StreamInterruptedError(
        route=route.name,
        url=route.base_url,
        delivered_chunks=tally.chunks,
        delivered_text="".join(tally.text),
        cause=cause,
    )


def continuation(router: Router, call: Call, tally: Tally, error: StreamInterruptedError) -> Call:
    """The call that continues a cut stream elsewhere; raises ``error`` when it cannot be continued."""
    if error.continuation or not router._continuable:
        raise error  # no route has continue_streams: true (the default), or it is too late
    if tally.other:
        raise error.not_continued("reasoning or tool calls had been delivered; only text can be continued")
    return call.continuation("".join(tally.text), tally.content_chunks, tally.cut)


def not_continued(call: Call, twin: Call, error: StreamInterruptedError, failed: RouterError) -> StreamInterruptedError:
    """``error``, saying why the continuation failed; the continuation's attempts join the call's."""
    call.info.attempts += twin.info.attempts
    reason = (
        "no other route with continue_streams: true is available"
        if isinstance(failed, AllRoutesFailed) and not twin.info.attempts
        else str(failed)
    )
    return error.not_continued(reason)


def continued(call: Call, twin: Call, lease: Lease, opened: Opened) -> None:
    """Splice a continuation into the caller's stream: no second role chunk, the first stream's id."""
    call.info.attempts += twin.info.attempts
    call.info.continued += 1
    lease.route.stats.continued()
    lease.call.info = call.info  # the continuation's outcome is the caller's
    lease.opened()
    opened.pending = [chunk for chunk in opened.pending if has_payload(chunk)]
    log.info("stream continued on route %r after a cut", lease.route.name)


class Tally:
    """What a stream has delivered so far: chunks, text of choice 0, anything else, finish and usage.

    After a continuation it also gives every chunk the first stream's id, so the caller sees one stream.
    """

    __slots__ = (
        "chunks", "content_chunks", "cut", "finish_reasons", "finished", "input_tokens", "model", "other",
        "stream_id", "text", "tokens",
    )  # fmt: skip

    def __init__(self) -> None:
        self.chunks = 0
        self.content_chunks = 0
        self.text: list[str] = []
        self.other = False
        """Something besides text of choice 0 was delivered (reasoning, tool calls, other choices)."""
        self.finished = False
        self.finish_reasons: list[str] = []
        self.tokens: int | None = None
        self.input_tokens: int | None = None
        self.model: str | None = None
        self.stream_id: str | None = None
        self.cut: set[str] = set()
        """Routes whose stream of this answer was cut."""

    def add(self, chunk: ChatCompletionChunk) -> None:
        """Count a chunk before it is delivered; raises (the route's failure) on one the adapters cannot read."""
        if not isinstance(chunk, ChatCompletionChunk) or not isinstance(chunk.choices, list):
            raise ValueError(f"not a chat completion chunk: {str(chunk)[:200]!r}")
        self.chunks += 1
        if self.stream_id is None:
            self.stream_id, self.model = chunk.id, chunk.model
        elif self.cut:
            chunk.id = self.stream_id
        for choice in chunk.choices:
            delta = choice.delta  # a choice without one raises here
            if choice.index == 0 and delta.content:
                self.text.append(delta.content)
                self.content_chunks += 1
            else:
                extra = delta.model_extra or {}
                if delta.tool_calls or delta.content or extra.get("reasoning") or extra.get("reasoning_content"):
                    self.other = True
            if choice.finish_reason:
                self.finished = True
                self.finish_reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            self.tokens = chunk.usage.completion_tokens
            self.input_tokens = chunk.usage.prompt_tokens

    def traced(self, call: Call) -> None:
        """Record what the whole stream said about itself on the call's span (when it is traced)."""
        if call.span is not None:
            call.said = tracing.response_attributes(
                self.model, self.stream_id, self.finish_reasons, self.input_tokens, self.tokens
            )

    def check(self, route: Route) -> None:
        if not self.finished:
            raise cut(route, f"after {self.chunks} chunks")


def cut(route: Route, when: str) -> StreamCut:
    return StreamCut(
        f"stream ended without a finish reason {when} (connection closed early)",
        route=route.name,
        url=route.base_url,
        hint="the server closed the connection mid-answer; check its logs",
    )

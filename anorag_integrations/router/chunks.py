"""Stream chunks as the router reads them: which start an answer, and the ``Tally`` of what a stream delivered.

A stream may fail over invisibly until :func:`opens` is true of a chunk; from then on the
:class:`Tally` counts what the caller received (text, anything else, finish, usage), which is what a
``StreamInterruptedError`` reports and what a continuation goes on from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openai.types.chat import ChatCompletionChunk

from .errors import StreamCut
from .telemetry import tracing

if TYPE_CHECKING:
    from .call import Call
    from .endpoints.route import Route


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

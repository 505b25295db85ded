"""The public record of one call (``CallInfo``), attached to its response or chunks for :func:`call_info`.

The router fills a :class:`CallInfo` as the call runs (attempts, rounds, the route that answered) and
attaches it to what the caller receives, as a plain attribute, so ``model_dump()`` stays the SDK's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .errors import Attempt

_T = TypeVar("_T")
_INFO_ATTR = "_anorag_call"


@dataclass(slots=True)
class CallInfo:
    """How the router served one request: read it with :func:`call_info` on a response or chunk."""

    route: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    rounds: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    hedge: str | None = None
    """The route a hedged copy of the request went to (None: not hedged)."""
    batches: list[str] = field(default_factory=list)
    """``embed``: the route that served each batch, in input order (``route`` is the first batch's)."""
    continued: int = 0
    """Times a cut stream was continued on another route (``continue_streams``)."""
    requested_model: str | None = None
    """The model the call asked for (the default route's when it named none)."""
    model: str | None = None
    """The model name sent to the route that answered (an alias becomes the route's model)."""
    models_tried: list[str] = field(default_factory=list)
    """Models whose routes all failed before the one that answered (``fallbacks``)."""
    fallback_reason: str | None = None
    """Why the call left its model: "fallbacks" (its routes failed) or "context_window" (the prompt did not fit)."""
    queued_s: float = 0.0
    """Seconds the call waited for a route with room (admission control; 0: it never waited)."""
    shed: str | None = None
    """Why the call was shed (``FleetSaturatedError.why``), or None."""


def call_info(obj: ChatCompletion | ChatCompletionChunk | CreateEmbeddingResponse) -> CallInfo | None:
    """The :class:`CallInfo` the router attached to a response (completion, embeddings) or a stream chunk, if any."""
    return getattr(obj, _INFO_ATTR, None)


def attach(obj: _T, info: CallInfo) -> _T:
    object.__setattr__(obj, _INFO_ATTR, info)  # a plain attribute: model_dump() stays the SDK's
    return obj

"""Checks on what a server answers, so a garbled completion, vector set or stream is a route failure, not the caller's.

``checked`` takes a chat completion the adapters can read, ``checked_embeddings`` one usable vector
per input; anything else raises ``ValueError``, which the router counts against the route and fails over.
``not_an_event_stream`` says what a stream's HTTP 200 answer was when it is no event stream (a
captive portal's page, a JSON document), for the ``MalformedResponse`` the stream raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.create_embedding_response import Usage


def checked(response: object) -> ChatCompletion:
    """``response`` if it is a completion the adapters can read; else raise (a route failure)."""
    if not isinstance(response, ChatCompletion):
        raise ValueError(f"expected a chat completion, got {type(response).__name__}: {str(response)[:200]!r}")
    if not isinstance(response.choices, list) or not response.choices:
        raise ValueError("the completion has no choices")
    for choice in response.choices:
        if choice.message is None or not isinstance(choice.index, int):
            raise ValueError(f"malformed choice: {str(choice)[:200]!r}")
    return response


def checked_embeddings(response: object, expected: int, model: str) -> CreateEmbeddingResponse:
    """``response`` if it holds one usable vector for each of the ``expected`` inputs; else ValueError.

    Usable: indices the whole numbers 0..n-1, every vector finite numbers (or the base64 text a caller
    asked for), all of one length. A missing ``model`` becomes the route's, a missing or garbled
    ``usage`` zero tokens, so batches always merge.
    """
    if not isinstance(response, CreateEmbeddingResponse):
        raise ValueError(f"expected embeddings, got {type(response).__name__}: {str(response)[:200]!r}")
    if not isinstance(response.data, list) or len(response.data) != expected:
        got = len(response.data) if isinstance(response.data, list) else type(response.data).__name__
        raise ValueError(f"expected {expected} embeddings, got {got}")
    if any(type(item.index) is not int for item in response.data) or sorted(
        item.index for item in response.data
    ) != list(range(expected)):
        raise ValueError(f"embedding indices are not the whole numbers 0..{expected - 1}")
    shapes = set()
    for item in response.data:
        vector = item.embedding
        if not (isinstance(vector, str) and vector) and (
            not isinstance(vector, list) or not vector or not all(_finite(x) for x in vector)
        ):
            raise ValueError(f"malformed embedding at index {item.index}: {str(vector)[:100]!r}")
        shapes.add(vector_shape(vector))
    if len(shapes) > 1:
        raise ValueError(f"embeddings of different lengths in one answer: {sorted(shapes)}")
    if not isinstance(response.model, str) or not response.model:
        response.model = model
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", 0)
    total = getattr(usage, "total_tokens", prompt)
    counts = [n if type(n) is int and n >= 0 else 0 for n in (prompt, total)]
    response.usage = Usage(prompt_tokens=counts[0], total_tokens=counts[1])
    return response


def vector_shape(vector: list[float] | str) -> tuple[str, int]:
    """A checked vector's encoding and length: ("float", values), or ("base64", characters) for the base64
    text a caller asked for (``encoding_format="base64"``; its dtype is the server's, so no values are counted)."""
    return ("base64", len(vector)) if isinstance(vector, str) else ("float", len(vector))


EVENT_STREAM = "text/event-stream"
"""The content type of server-sent events: what every OpenAI-compatible server streams chunks as."""
PEEK_BYTES = 1024
"""How much of a stream body that is no event stream is read to say what it was (then it is closed)."""
SHOWN_CHARS = 80
"""How much of it an error shows: enough to tell a login page from a JSON error."""


def is_event_stream(content_type: str | None) -> bool:
    """Whether a response's ``Content-Type`` says server-sent events (parameters such as ``charset`` aside)."""
    return (content_type or "").partition(";")[0].strip().lower() == EVENT_STREAM


def not_an_event_stream(content_type: str | None, first: bytes, masked: Callable[[str], str]) -> str:
    """What a stream's HTTP 200 answer was instead of events: its content type and first characters,
    whitespace folded, with ``masked`` applied before it is cut (a secret is never shown in part)."""
    text = re.sub(r"\s+", " ", masked(first.decode("utf-8", "replace"))).strip()
    shown = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
    kind = f"content type {content_type!r}" if content_type else "no content type"
    return f"expected server-sent events ({EVENT_STREAM}), got {kind}, starting {shown!r}"


def _finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]

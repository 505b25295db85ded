"""What ``FaultServer`` answers on ``/v1/embeddings``, as vLLM's pooling server does (checked in test_protocol).

Vectors are deterministic: each text's vector is a function of the text alone (:func:`fake_vector`,
unit length as all-MiniLM-L6-v2's are), so a test can tell which vector belongs to which input.
Tokens are counted as a BERT-style model would, roughly: one per whitespace-separated word plus
two special tokens (vLLM's all-MiniLM-L6-v2 counts "hello" as 3). Errors use vLLM's wording: an
input past ``max_model_len`` is a 400 saying "at least max_model_len + 1" tokens (vLLM stops
counting there), ``truncate_prompt_tokens`` above ``max_model_len`` is a 400, -1 cuts to it.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

SPECIAL_TOKENS = 2
"""[CLS] and [SEP]: what a BERT-style embedding model adds to every input."""
TRUNCATE_TOO_LARGE = (
    "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
)
DIMENSIONS = 32
"""Length of ``FaultServer``'s vectors (all-MiniLM-L6-v2's are 384; shorter keeps tests quick)."""


def fake_vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The unit vector ``FaultServer`` answers for ``text``: a hash of the text, spread over ``dimensions``."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.blake2b(f"{counter}\x1f{text}".encode(), digest_size=64).digest()
        raw.extend(value / 32768 - 1 for value in struct.unpack("<32H", digest))
        counter += 1
    del raw[dimensions:]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def token_count(text: str) -> int:
    """The tokens ``FaultServer`` counts for ``text`` (see the module docstring)."""
    return len(text.split()) + SPECIAL_TOKENS


def inputs(body: Mapping[str, Any]) -> list[str] | None:
    """The texts of a request's ``input`` (a string or a list of strings); None when it is neither."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(text, str) for text in value):
        return list(value)
    return None


def problem(texts: Sequence[str], body: Mapping[str, Any], max_model_len: int | None) -> tuple[str, str | None] | None:
    """vLLM's 400 for this request as (message, param), or None when it is fine."""
    if not texts:
        return "You must pass at least one prompt", None
    if body.get("dimensions") is not None:
        message = (
            f"Model '{body.get('model')}' does not support Matryoshka embeddings; dimensions must be unset "
            f"(received dimensions={body.get('dimensions')})."
        )
        return message, None
    if max_model_len is None:
        return None
    truncate = body.get("truncate_prompt_tokens")
    if isinstance(truncate, int) and truncate > max_model_len:
        return TRUNCATE_TOO_LARGE, None
    if truncate is None and any(token_count(text) > max_model_len for text in texts):
        return overflow_message(max_model_len, max_model_len + 1), "input_tokens"
    return None


def overflow_message(limit: int, prompt_tokens: int) -> str:
    """vLLM's context-overflow message (its wording is what clients match on)."""
    return (
        f"This model's maximum context length is {limit} tokens. However, your prompt contains at least "
        f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. Please reduce "
        f"the length of the input prompt. (parameter=input_tokens, value={prompt_tokens})"
    )


def response(
    model: str, texts: Sequence[str], body: Mapping[str, Any], max_model_len: int | None, dimensions: int = DIMENSIONS
) -> dict[str, Any]:
    """The embeddings document vLLM answers: a vector per input (cut when ``truncate_prompt_tokens`` says), usage."""
    data = []
    prompt_tokens = 0
    for index, text in enumerate(texts):
        kept, tokens = _truncated(text, body.get("truncate_prompt_tokens"), max_model_len)
        prompt_tokens += tokens
        vector = fake_vector(kept, dimensions)
        encoded: list[float] | str = vector
        if body.get("encoding_format") == "base64":  # float32, native (little-endian) order, as vLLM sends
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": encoded})
    return {
        "id": f"embd-{uuid.uuid4().hex[:16]}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }


def _truncated(text: str, truncate: object, max_model_len: int | None) -> tuple[str, int]:
    """The part of ``text`` that is embedded and its tokens: cut to ``truncate`` tokens (-1: ``max_model_len``)."""
    tokens = token_count(text)
    limit = max_model_len if truncate == -1 else truncate
    if not isinstance(limit, int) or tokens <= limit:
        return text, tokens
    words = text.split()[: max(0, limit - SPECIAL_TOKENS)]
    return " ".join(words), limit

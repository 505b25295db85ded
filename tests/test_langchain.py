"""ChatVLLMRouted against the vLLM-shaped fault server: vLLM specifics, failover, callbacks, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from langchain_core import exceptions as lc_errors
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, Field

import anorag_integrations as ai
from anorag_integrations import Router
from anorag_integrations.langchain import FAILOVER_EVENT, ChatVLLMRouted
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL


class Recorder(BaseCallbackHandler):
    """Collects streamed tokens and custom events."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.events: list[tuple[str, Any]] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data))


@pytest.fixture
def llm_for(router_for: Callable[..., Router]) -> Callable[..., ChatVLLMRouted]:
    def build(*names: str, **kwargs: Any) -> ChatVLLMRouted:
        return ChatVLLMRouted(router=router_for(*names), **kwargs)

    return build


def aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk  # type: ignore[assignment]
    return total


def test_invoke_reports_route_usage_and_vllm_fields(llm_for: Callable[..., ChatVLLMRouted]) -> None:
    message = llm_for("a", "b").invoke([SystemMessage("be brief"), HumanMessage("hi")])
    assert message.content == "from a"
    meta = message.response_metadata
    assert (meta["route"], meta["attempts"], meta["model_provider"], meta["finish_reason"]) == ("a", 1, "vllm", "stop")
    assert "stop_reason" in meta and meta["latency_s"] > 0
    assert message.usage_metadata == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


def test_failover_is_visible_to_callbacks(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].set_fault(Fault.STATUS, status=503)
    recorder = Recorder()
    message = llm_for("a", "b").invoke("hi", config={"callbacks": [recorder]})
    assert message.content == "from b"
    assert message.response_metadata["failed_routes"] == ["a"] and message.response_metadata["attempts"] == 2
    [(name, data)] = recorder.events
    assert name == FAILOVER_EVENT and data["served_by"] == "b"
    assert data["failed_attempts"][0]["route"] == "a" and "HTTP 503" in data["failed_attempts"][0]["error"]


@pytest.mark.parametrize("fault", [Fault.NO_CHOICES, Fault.HTML, Fault.TRUNCATED_JSON])
@pytest.mark.parametrize("method", ["invoke", "stream", "ainvoke", "astream"])
def test_an_unusable_answer_fails_over_before_the_adapter_sees_it(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted], method: str, fault: Fault
) -> None:
    servers["a"].set_fault(fault, after_chunks=0)
    llm = llm_for("a", "b")
    if method == "invoke":
        text = llm.invoke("hi").content
    elif method == "ainvoke":
        text = asyncio.run(llm.ainvoke("hi")).content
    elif method == "stream":
        text = aggregate(list(llm.stream("hi"))).content
    else:

        async def collect() -> list[AIMessageChunk]:
            return [chunk async for chunk in llm.astream("hi")]

        text = aggregate(asyncio.run(collect())).content
    assert text == "from b"
    assert servers["a"].hits == 1


def test_chain_streams_through_failover_with_every_token_once(
    servers: dict[str, FaultServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prompt | ChatVLLMRouted() | StrOutputParser(), first route dead, config read from ./config.yaml."""
    routes = {n: {"base_url": servers[n].base_url, "model": MODEL} for n in ("a", "b")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"llm": {"vllm_openai": {"routes": routes}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANORAG_CONFIG", raising=False)
    servers["b"].reply = "Paris is the capital of France."
    servers["a"].set_fault(Fault.REFUSE)
    recorder = Recorder()
    chain = ChatPromptTemplate.from_messages([("human", "What is the capital of {country}?")])
    pieces = list(
        (chain | ChatVLLMRouted() | StrOutputParser()).stream({"country": "France"}, {"callbacks": [recorder]})
    )
    assert "".join(pieces) == "Paris is the capital of France."
    assert "".join(recorder.tokens) == "Paris is the capital of France."  # each token once, none repeated
    assert [t for t in recorder.tokens if t] == [p for p in pieces if p]
    assert [name for name, _ in recorder.events] == [FAILOVER_EVENT]
    assert "What is the capital of France?" in str(servers["b"].requests[-1]["messages"])


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_is_kept_in_invoke_and_stream(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted], field: str
) -> None:
    servers["a"].reasoning = "The user greets; answer politely."
    servers["a"].reasoning_field = field
    llm = llm_for("a")
    message = llm.invoke("hi")
    assert message.additional_kwargs["reasoning_content"] == "The user greets; answer politely."
    assert message.content_blocks[0] == {"type": "reasoning", "reasoning": "The user greets; answer politely."}
    streamed = aggregate(list(llm.stream("hi")))
    assert streamed.additional_kwargs["reasoning_content"] == "The user greets; answer politely. "
    assert streamed.content == "from a"


def test_stream_usage_on_by_default_and_can_be_turned_off(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    streamed = aggregate(list(llm_for("a").stream("hi")))
    assert streamed.usage_metadata is not None and streamed.usage_metadata["output_tokens"] == 2
    assert servers["a"].requests[-1]["stream_options"] == {"include_usage": True}
    quiet = aggregate(list(llm_for("a", stream_usage=False).stream("hi")))
    assert quiet.usage_metadata is None
    assert servers["a"].requests[-1]["stream_options"] == {"include_usage": False}
    assert quiet.response_metadata["route"] == "a" and quiet.response_metadata["ttft_s"] is not None


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="city name")


def test_tool_calls_from_response_and_stream_with_null_arguments(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].tool_arguments = {"city": "Paris"}
    llm = llm_for("a").bind_tools([GetWeather], tool_choice="GetWeather")
    message = llm.invoke("weather in Paris?")
    body = servers["a"].requests[-1]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "GetWeather"}}
    assert body["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] == "string"
    [call] = message.tool_calls
    assert (call["name"], call["args"]) == ("GetWeather", {"city": "Paris"}) and call["id"]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    streamed = aggregate(list(llm.stream("weather in Paris?")))  # first delta has arguments: null
    [call] = streamed.tool_calls
    assert (call["name"], call["args"]) == ("GetWeather", {"city": "Paris"})


@pytest.mark.parametrize("arguments", [[1, 2], "Paris", 7, None])
def test_tool_arguments_that_are_not_an_object_become_invalid_tool_calls(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted], arguments: Any
) -> None:
    """Real vLLM with SmolLM2-135M wrote ``[1, 2]`` for a schema's object: kept as written, never a crash."""
    servers["a"].tool_arguments = arguments
    llm = llm_for("a").bind_tools([GetWeather], tool_choice="GetWeather")
    for message in (llm.invoke("weather?"), aggregate(list(llm.stream("weather?")))):
        assert message.tool_calls == []
        [bad] = message.invalid_tool_calls
        assert bad["name"] == "GetWeather" and bad["args"] == json.dumps(arguments)


def test_tool_round_trip_messages_convert(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].tool_arguments = {"city": "Oslo"}
    llm = llm_for("a").bind_tools([GetWeather], tool_choice="any")
    first = llm.invoke("weather in Oslo?")
    llm.invoke(["weather in Oslo?", first, ToolMessage("-3 C", tool_call_id=first.tool_calls[0]["id"])])
    messages = servers["a"].requests[-1]["messages"]
    assert servers["a"].requests[0]["tool_choice"] == "required"
    assert messages[1]["tool_calls"][0]["function"] == {"name": "GetWeather", "arguments": '{"city": "Oslo"}'}
    assert messages[2] == {"role": "tool", "tool_call_id": first.tool_calls[0]["id"], "content": "-3 C"}


def test_auto_tool_choice_without_server_flag_is_a_clear_error(servers: dict[str, FaultServer]) -> None:
    with FaultServer(MODEL, auto_tool_choice=False) as strict:
        router = Router(
            ai.config.config_from_dict(
                {"llm": {"routes": {"x": {"base_url": strict.base_url, "model": MODEL}}}}, env={}
            )
        )
        llm = ChatVLLMRouted(router=router).bind_tools([GetWeather], tool_choice="auto")
        with pytest.raises(lc_errors.ModelInvalidRequestError, match="enable-auto-tool-choice"):
            llm.invoke("weather?")
        router.close()


def test_structured_output_json_schema_uses_vllm_structured_outputs(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].reply = '{"city": "Rome"}'
    structured = llm_for("a").with_structured_output(GetWeather, method="json_schema")
    assert structured.invoke("where?") == GetWeather(city="Rome")
    body = servers["a"].requests[-1]
    assert body["structured_outputs"]["json"]["properties"]["city"]["type"] == "string"
    assert not any(key.startswith("guided_") for key in body)  # removed from vLLM: silently ignored there
    raw = llm_for("a").with_structured_output(GetWeather, include_raw=True).invoke("where?")
    assert raw["parsed"] == GetWeather(city="Rome") and raw["parsing_error"] is None
    assert raw["raw"].response_metadata["route"] == "a"
    servers["a"].reply = "not json"
    servers["a"].structured_outputs = False  # a server without vLLM's grammar backend answers anything
    bad = llm_for("a").with_structured_output(GetWeather, include_raw=True).invoke("where?")
    assert bad["parsed"] is None and bad["parsing_error"] is not None


def test_structured_output_function_calling_and_json_mode(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].tool_arguments = {"city": "Lima"}
    assert llm_for("a").with_structured_output(GetWeather, method="function_calling").invoke("?") == GetWeather(
        city="Lima"
    )
    schema = GetWeather.model_json_schema()
    servers["b"].reply = '{"city": "Kyiv"}'
    assert llm_for("b").with_structured_output(schema, method="json_mode").invoke("?") == {"city": "Kyiv"}
    assert servers["b"].requests[-1]["response_format"] == {"type": "json_object"}


def test_errors_are_langchain_and_router_types(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    servers["a"].set_fault(Fault.STATUS, status=400, message="This model's maximum context length is 32 tokens.")
    with pytest.raises(lc_errors.ContextOverflowError) as info:
        llm_for("a", "b").invoke("hi")
    assert isinstance(info.value, ai.ContextOverflowError) and info.value.route == "a"
    assert "maximum context length is 32" in str(info.value) and "shorten the prompt" in str(info.value)
    servers["a"].set_fault(Fault.STATUS, status=503)
    servers["b"].set_fault(Fault.STATUS, status=503)
    with pytest.raises(lc_errors.ModelAPIError) as failed:
        list(llm_for("a", "b").stream("hi"))
    assert isinstance(failed.value, ai.AllRoutesFailed) and len(failed.value.attempts) == 2
    with pytest.raises(lc_errors.ModelInvalidRequestError) as invalid:
        llm_for("a", "b").invoke("hi", deadline=0)  # the caller's mistake: typed both ways, no route blamed
    assert isinstance(invalid.value, ai.InvalidRequestError) and "deadline" in str(invalid.value)


def test_async_paths_never_touch_the_sync_router(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted], monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = llm_for("a", "b")

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("async call went through the blocking router path")

    monkeypatch.setattr(llm.router, "chat", forbidden)
    monkeypatch.setattr(llm.router, "stream", forbidden)
    recorder = Recorder()

    async def scenario() -> tuple[list[Any], list[AIMessageChunk]]:
        answers = await llm.abatch(["q"] * 6)
        chunks = [c async for c in llm.astream("q", config={"callbacks": [recorder]})]
        return answers, chunks  # type: ignore[return-value]

    answers, chunks = asyncio.run(scenario())
    assert sorted(a.response_metadata["route"] for a in answers) == ["a"] * 3 + ["b"] * 3
    assert "".join(recorder.tokens) == aggregate(chunks).content in ("from a", "from b")


def test_instances_from_one_config_share_one_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"llm": {"routes": {"x": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANORAG_CONFIG", raising=False)
    first, second = ChatVLLMRouted(), ChatVLLMRouted(config_path=str(tmp_path / "config.yaml"), temperature=1)
    assert first.router is second.router
    with pytest.raises(ValueError, match="route 'nope' is not among the routes"):
        ChatVLLMRouted(route="nope")


def test_model_and_params_reach_the_request(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    llm = llm_for(
        "a", temperature=0.3, max_tokens=5, top_p=0.9, stop=["END"], model_kwargs={"seed": 3}, extra_body={"top_k": 4}
    )
    llm.invoke("hi", min_p=0.1)
    body = servers["a"].requests[-1]
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["stop"], body["seed"]) == (
        0.3,
        5,
        0.9,
        ["END"],
        3,
    )
    assert (body["top_k"], body["min_p"]) == (4, 0.1)
    assert llm._get_ls_params()["ls_model_name"] == MODEL and llm._get_ls_params(model="x")["ls_model_name"] == "x"


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_streaming_flag_sends_each_token_through_callbacks_once(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted], mode: str
) -> None:
    servers["a"].set_fault(Fault.STATUS, status=502)
    servers["b"].reply = "one two three"
    llm, recorder = llm_for("a", "b", streaming=True), Recorder()
    config: Any = {"callbacks": [recorder]}
    message = llm.invoke("hi", config) if mode == "invoke" else asyncio.run(llm.ainvoke("hi", config))
    assert message.content == "one two three"
    assert [t for t in recorder.tokens if t] == ["one ", "two ", "three"]
    # LangChain streams without handing _stream its run manager: outside a chain the failover shows
    # in response_metadata (the chain test above sees the custom event).
    assert message.response_metadata["failed_routes"] == ["a"] and message.response_metadata["route"] == "b"
    assert servers["b"].requests[-1]["stream"] is True and message.usage_metadata["output_tokens"] == 3


def test_session_id_from_configurable_or_a_keyword_keeps_a_conversation_on_one_route(
    servers: dict[str, FaultServer], llm_for: Callable[..., ChatVLLMRouted]
) -> None:
    llm = llm_for("a", "b")  # round robin: without a session, calls alternate
    assert {llm.invoke("hi").content for _ in range(2)} == {"from a", "from b"}
    session = {"configurable": {"session_id": "conv-1"}}
    pinned = {llm.invoke("hi", config=session).content for _ in range(3)}
    pinned |= {aggregate(list(llm.stream("hi", config=session))).content for _ in range(2)}  # type: ignore[misc]
    pinned |= {asyncio.run(llm.ainvoke("hi", config=session)).content}
    assert len(pinned) == 1
    assert len({llm.invoke("hi", session_id="conv-2").content for _ in range(3)}) == 1
    assert all("session_id" not in body for server in servers.values() for body in server.requests)

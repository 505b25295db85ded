"""VLLMRouted calling tools as a LlamaIndex ``FunctionCallingLLM``: on the emulator, and on real vLLM (hermes parser).

The emulator calls the first tool offered (or the forced one) with ``tool_arguments``, streams a call as
vLLM does (name first, arguments ``null``, then the arguments in two pieces), and answers in text right
after a tool's result when the choice is "auto".
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any, Literal

import pytest
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatResponse, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from pydantic import BaseModel

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.llama_index import MASKED_KEY, VLLMRouted
from anorag_integrations.testing import FaultServer

OSLO = {"city": "Oslo"}


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"-3 C in {city}"


def get_time(city: str) -> str:
    """The local time in a city."""
    return f"12:00 in {city}"


WEATHER, TIME = FunctionTool.from_defaults(get_weather), FunctionTool.from_defaults(get_time)


@pytest.fixture
def llm_for(router_for: Callable[..., Router]) -> Callable[..., VLLMRouted]:
    def build(*names: str, **kwargs: Any) -> VLLMRouted:
        return VLLMRouted(router=router_for(*names), **kwargs)

    return build


def responses_of(llm: VLLMRouted, method: str, tools: list[FunctionTool], **kwargs: Any) -> list[ChatResponse]:
    """Every response one ``*chat_with_tools`` method gives (one, or a stream's), asking about Oslo."""

    async def run_async() -> list[ChatResponse]:
        if method == "achat_with_tools":
            return [await llm.achat_with_tools(tools, user_msg="weather in Oslo?", **kwargs)]
        return [r async for r in await llm.astream_chat_with_tools(tools, user_msg="weather in Oslo?", **kwargs)]

    if method == "chat_with_tools":
        return [llm.chat_with_tools(tools, user_msg="weather in Oslo?", **kwargs)]
    if method == "stream_chat_with_tools":
        return list(llm.stream_chat_with_tools(tools, user_msg="weather in Oslo?", **kwargs))
    return asyncio.run(run_async())


WITH_TOOLS = ["chat_with_tools", "achat_with_tools", "stream_chat_with_tools", "astream_chat_with_tools"]


def test_a_function_calling_llm_that_keeps_what_it_had(llm_for: Callable[..., VLLMRouted]) -> None:
    """FunctionAgent asks ``metadata.is_function_calling_model``; the rest is what the CustomLLM gave."""
    llm = llm_for("a", api_key="sk-secret-123", strict=True, max_tokens=7)
    meta = llm.metadata
    assert isinstance(llm, FunctionCallingLLM)
    assert (meta.is_function_calling_model, meta.is_chat_model, meta.num_output) == (True, True, 7)
    assert llm.complete("hello").text == "from a" and [r.delta for r in llm.stream_complete("hi") if r.delta] == [
        "from ",
        "a",
    ]
    data = llm.to_dict()
    assert data["api_key"] == MASKED_KEY and data["strict"] is True and "sk-secret" not in repr(llm) + str(data)
    assert VLLMRouted.from_dict(data, router=llm.router).strict is True


@pytest.mark.parametrize("method", WITH_TOOLS)
def test_every_tools_method_returns_the_call_as_openais_llm_does(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers["a"].tool_arguments = OSLO
    llm = llm_for("a")
    if method.startswith("a"):  # the router's async path, never its blocking one

        def blocking(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("an async method used the blocking router path")

        monkeypatch.setattr(llm.router, "chat", blocking)
        monkeypatch.setattr(llm.router, "stream", blocking)
    responses = responses_of(llm, method, [WEATHER, TIME])
    [call] = llm.get_tool_calls_from_response(responses[-1])
    assert (call.tool_name, call.tool_kwargs) == ("get_weather", OSLO) and call.tool_id.startswith("chatcmpl-tool-")
    message = responses[-1].message
    [sdk_call] = message.additional_kwargs["tool_calls"]
    assert isinstance(sdk_call, ChatCompletionMessageFunctionToolCall)
    function = sdk_call.function
    assert (sdk_call.id, function.name, function.arguments) == (call.tool_id, "get_weather", '{"city": "Oslo"}')
    assert [b for b in message.blocks if isinstance(b, ToolCallBlock)] == [
        ToolCallBlock(tool_call_id=call.tool_id, tool_name="get_weather", tool_kwargs='{"city": "Oslo"}')
    ]
    assert message.content == "" and responses[-1].additional_kwargs["route"] == "a"
    body = servers["a"].requests[-1]
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get_time"]
    assert body["tools"][0]["function"]["parameters"]["required"] == ["city"]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", False)
    if "stream" in method:  # name first with arguments null, then two pieces: accumulated, readable on the way
        with_calls = [r for r in responses if r.message.additional_kwargs.get("tool_calls")]
        seen = [r.message.additional_kwargs["tool_calls"][0].function.arguments for r in with_calls]
        assert seen[0] == "" and seen[-1] == '{"city": "Oslo"}' and len(set(seen)) == 3
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))
        assert llm.get_tool_calls_from_response(with_calls[0])[0].tool_kwargs == {}  # arguments null so far


@pytest.mark.parametrize(
    ("kwargs", "sent"),
    [
        ({}, {"tool_choice": "auto", "parallel_tool_calls": False}),
        ({"tool_required": True}, {"tool_choice": "required"}),
        ({"tool_choice": "none"}, {"tool_choice": "none"}),
        ({"tool_choice": "get_time"}, {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "tool_required": True},
         {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        ({"allow_parallel_tool_calls": True}, {"parallel_tool_calls": True}),
        ({"strict": True}, {"strict": [True, True]}),
        ({"strict": False}, {"strict": [False, False]}),
        ({"temperature": 0.3}, {"temperature": 0.3, "strict": [None, None]}),
    ],
)  # fmt: skip
def test_tool_options_map_to_openais_fields(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], kwargs: dict[str, Any], sent: dict[str, Any]
) -> None:
    llm_for("a").chat_with_tools([WEATHER, TIME], user_msg="hi", **kwargs)
    body = servers["a"].requests[-1]
    body["strict"] = [tool["function"].get("strict") for tool in body["tools"]]
    assert {key: body[key] for key in sent} == sent


def test_strict_on_the_llm_and_a_tool_choice_that_names_no_tool(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    llm = llm_for("a", strict=True)
    llm.chat_with_tools([WEATHER], user_msg="hi")
    llm.chat_with_tools([WEATHER], user_msg="hi", strict=False)  # the call's own wins
    assert [body["tools"][0]["function"]["strict"] for body in servers["a"].requests] == [True, False]
    with pytest.raises(ValueError, match=r"tool_choice 'get_tme' is not among the tools \(get_weather\)"):
        llm.chat_with_tools([WEATHER], user_msg="hi", tool_choice="get_tme")
    assert len(servers["a"].requests) == 2  # refused before any request


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_accumulate_by_index_and_one_stays_unless_allowed(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], stream: bool
) -> None:
    servers["a"].tool_arguments, servers["a"].tool_calls = OSLO, 2
    llm = llm_for("a")

    def ask(**kwargs: Any) -> ChatResponse:
        if stream:
            return list(llm.stream_chat_with_tools([WEATHER, TIME], user_msg="Oslo?", **kwargs))[-1]
        return llm.chat_with_tools([WEATHER, TIME], user_msg="Oslo?", **kwargs)

    both = ask(allow_parallel_tool_calls=True)
    calls = llm.get_tool_calls_from_response(both)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", OSLO), ("get_time", OSLO)]
    assert len({c.tool_id for c in calls}) == 2 and len(both.message.additional_kwargs["tool_calls"]) == 2
    if not stream:  # chat_with_tools keeps one call unless allowed, as OpenAI's LLM (streams are not validated)
        one = ask(parallel_tool_calls=True)  # a server that ignores parallel_tool_calls: false
        assert [c.tool_name for c in llm.get_tool_calls_from_response(one)] == ["get_weather"]
        assert len(one.message.additional_kwargs["tool_calls"]) == 1
        assert len([b for b in one.message.blocks if isinstance(b, ToolCallBlock)]) == 1


def test_tool_calls_and_results_go_back_in_openai_form(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    """The call as the LLM gave it, as a stored history gives it back, as dicts, as blocks, as OpenAI's LLM leaves
    a streamed one (``ChoiceDeltaToolCall``); results as tool messages with the call's id."""
    servers["a"].tool_arguments = OSLO
    llm = llm_for("a")
    first = llm.chat_with_tools([WEATHER], user_msg="weather in Oslo?").message
    call_id = first.additional_kwargs["tool_calls"][0].id
    wire_call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    wire = {"role": "assistant", "content": "", "tool_calls": [wire_call]}
    stored = ChatMessage.model_validate(first.model_dump())  # what a memory store gives back
    as_dicts = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [wire_call]})
    block = ToolCallBlock(tool_call_id=call_id, tool_name="get_weather", tool_kwargs=OSLO)
    as_blocks = ChatMessage(role=MessageRole.ASSISTANT, blocks=[block])
    function = ChoiceDeltaToolCallFunction(name="get_weather", arguments='{"city": "Oslo"}')
    piece = ChoiceDeltaToolCall(index=0, id=call_id, function=function)  # its type is None
    as_stream_pieces = ChatMessage(role=MessageRole.ASSISTANT, additional_kwargs={"tool_calls": [piece]})
    results = [
        ChatMessage(role=MessageRole.TOOL, content="-3 C", additional_kwargs={"tool_call_id": call_id}),
        ChatMessage(role=MessageRole.FUNCTION, content="-3 C", additional_kwargs={"tool_call_id": call_id}),
    ]
    for assistant in (first, stored, as_dicts, as_blocks, as_stream_pieces):
        for result in results:
            llm.chat_with_tools([WEATHER], chat_history=[ChatMessage(content="weather in Oslo?"), assistant, result])
            sent = servers["a"].requests[-1]["messages"]
            assert sent[1:] == [wire, {"role": "tool", "content": "-3 C", "tool_call_id": call_id}]
    assert servers["a"].requests[-1]["messages"][0] == {"role": "user", "content": "weather in Oslo?"}
    llm.chat([ChatMessage(role=MessageRole.FUNCTION, content="-3 C", additional_kwargs={"name": "get_weather"})])
    assert servers["a"].requests[-1]["messages"] == [{"role": "function", "content": "-3 C", "name": "get_weather"}]


@pytest.mark.parametrize("arguments", [[1, 2], "Oslo", 7, None])
def test_arguments_that_are_not_an_object_reach_the_tool_as_no_arguments(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], arguments: Any
) -> None:
    """Real vLLM with SmolLM2-135M wrote ``[1, 2]`` for an object: the tool says what is missing, nothing crashes."""
    servers["a"].tool_arguments = arguments
    llm = llm_for("a")
    [call] = llm.get_tool_calls_from_response(llm.chat_with_tools([WEATHER], user_msg="weather?"))
    assert (call.tool_name, call.tool_kwargs) == ("get_weather", {})
    answer = llm.predict_and_call([WEATHER], user_msg="weather?")
    assert answer.sources[0].is_error and "city" in answer.response


def test_predict_and_call_runs_the_tool_and_no_call_is_an_error(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    servers["a"].tool_arguments = OSLO
    llm = llm_for("a")
    assert llm.predict_and_call([WEATHER], user_msg="weather in Oslo?").response == "-3 C in Oslo"
    assert asyncio.run(llm.apredict_and_call([TIME], user_msg="time in Oslo?")).response == "12:00 in Oslo"
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        llm.predict_and_call([WEATHER], user_msg="weather?", tool_choice="none")
    text = llm.chat_with_tools([WEATHER], user_msg="hi", tool_choice="none")
    assert text.message.content == "from a"
    assert llm.get_tool_calls_from_response(text, error_on_no_tool_call=False) == []


class City(BaseModel):
    name: str
    country: str


def test_structured_predict_goes_through_a_required_tool_call(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    """A function-calling LLM gets structured output from a forced tool call, not JSON in its text."""
    servers["a"].tool_arguments = {"name": "Paris", "country": "France"}
    city = llm_for("a").structured_predict(City, PromptTemplate("Paris is in {country}."), country="France")
    assert city == City(name="Paris", country="France")
    body = servers["a"].requests[-1]
    assert (body["tool_choice"], body["tools"][0]["function"]["name"]) == ("required", "City")


def test_callbacks_see_a_tool_call(llm_for: Callable[..., VLLMRouted], servers: dict[str, FaultServer]) -> None:
    servers["a"].tool_arguments = OSLO
    debug = LlamaDebugHandler()
    llm = llm_for("a", callback_manager=CallbackManager([debug]))
    llm.chat_with_tools([WEATHER], user_msg="weather in Oslo?")
    list(llm.stream_chat_with_tools([WEATHER], user_msg="weather in Oslo?"))
    pairs = debug.get_llm_inputs_outputs()
    assert len(pairs) == 2
    assert all(end.payload is not None for _, end in pairs)
    assert all(end.payload["response"].message.additional_kwargs["tool_calls"] for _, end in pairs)  # type: ignore[index]


async def run_agent(agent: Any, question: str) -> tuple[str, list[ToolCallResult], list[AgentOutput]]:
    handler = agent.run(question)
    results, outputs = [], []
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            results.append(event)
        elif isinstance(event, AgentOutput):
            outputs.append(event)
    return str(await handler), results, outputs


@pytest.mark.parametrize("streaming", [True, False])
def test_function_agent_calls_the_tool_and_answers_from_its_result(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted], streaming: bool
) -> None:
    servers["a"].tool_arguments, servers["a"].reply = OSLO, "It is -3 C in Oslo."
    cities: list[str] = []

    def weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"-3 C in {city}"

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(weather)], llm=llm_for("a"), streaming=streaming)
    answer, results, _ = asyncio.run(run_agent(agent, "weather in Oslo?"))
    assert cities == ["Oslo"] and answer == "It is -3 C in Oslo."
    [result] = results
    first, second = servers["a"].requests[-2:]
    assert first.get("stream", False) is streaming
    assert second["messages"][-1] == {"role": "tool", "content": "-3 C in Oslo", "tool_call_id": result.tool_id}
    assert second["messages"][-2]["tool_calls"][0]["id"] == result.tool_id


def test_react_agent_calls_the_tool_from_text(
    servers: dict[str, FaultServer], llm_for: Callable[..., VLLMRouted]
) -> None:
    """ReAct needs no tool API: the call is in the text, the tool's result goes back as an observation."""
    server = servers["a"]
    server.reply = 'Thought: I need the weather.\nAction: weather\nAction Input: {"city": "Lima"}'
    cities: list[str] = []

    def weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        server.reply = "Thought: I can answer.\nAnswer: It is 25 C in Lima."  # the model's next turn
        return f"25 C in {city}"

    agent = ReActAgent(tools=[FunctionTool.from_defaults(weather)], llm=llm_for("a"))
    answer, results, _ = asyncio.run(run_agent(agent, "weather in Lima?"))
    assert cities == ["Lima"] and answer == "It is 25 C in Lima." and results[0].tool_output.content == "25 C in Lima"
    assert "tools" not in server.requests[-1] and "25 C in Lima" in json.dumps(server.requests[-1]["messages"])


# --- real vLLM (SmolLM2-135M-Instruct, --enable-auto-tool-choice --tool-call-parser hermes) -----------------
# SmolLM2's chat template does not show the model the tools, so a forced call is well formed (vLLM wraps it in
# hermes' <tool_call> tags) but its arguments are whatever the model writes: seen '"pic-coral"' for an object.
# These tests assert the protocol (a call parsed, its arguments JSON, the agent's loop), not the model's answer.

COLOUR_QUESTION = "My favourite colour is green. Record it."


class Colour(BaseModel):
    """The colour the user named."""

    colour: Literal["red", "green", "blue"]


def pick_colour(colour: str) -> str:
    """Record the colour the user named."""
    return f"recorded {colour}"


@pytest.fixture
def live_llm(vllm_pair: list[Any]) -> Any:
    """VLLMRouted over the session's vLLM pair; 96 tokens hold a forced call (about 55 with hermes' tags)."""
    routes = {f"vllm{i}": {"base_url": s.base_url, "model": s.alias, "timeout": 120} for i, s in enumerate(vllm_pair)}
    params = {"temperature": 0, "max_tokens": 96}
    with Router(config_from_dict({"llm": {"routes": routes, "params": params}}, env={})) as router:
        yield VLLMRouted(router=router)


@pytest.mark.live
def test_a_forced_call_comes_back_parsed_from_real_vllm(live_llm: VLLMRouted) -> None:
    """Plain and streamed (the arguments in pieces, put together): one call, named, with an id, arguments JSON."""
    tool = FunctionTool.from_defaults(pick_colour, fn_schema=Colour)
    plain = live_llm.chat_with_tools([tool], user_msg=COLOUR_QUESTION, tool_required=True)
    streamed = list(live_llm.stream_chat_with_tools([tool], user_msg=COLOUR_QUESTION, tool_required=True))
    for response in (plain, streamed[-1]):
        [call] = live_llm.get_tool_calls_from_response(response)
        [raw] = response.message.additional_kwargs["tool_calls"]
        print(f"\n{call.tool_name}({raw.function.arguments}) -> {call.tool_kwargs}")
        assert (call.tool_name, call.tool_id) == ("pick_colour", raw.id) and raw.id.startswith("chatcmpl-tool-")
        parsed = json.loads(raw.function.arguments)  # JSON, though maybe not the object the schema asks for
        assert call.tool_kwargs == (parsed if isinstance(parsed, dict) else {})
    deltas = [r.raw["choices"][0]["delta"] for r in streamed if isinstance(r.raw, dict) and r.raw["choices"]]
    assert len([delta for delta in deltas if delta.get("tool_calls")]) >= 3  # the name, then arguments in pieces


@pytest.mark.live
def test_function_agent_loop_on_real_vllm(live_llm: VLLMRouted, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first turn is forced to call; the tool gets the call's arguments, its result goes back as a tool
    message with the call's id, and the model takes another turn (an answer, or more calls up to the limit)."""
    received: list[dict[str, Any]] = []

    def record(**arguments: Any) -> str:
        """Record the colour the user named."""
        received.append(arguments)
        return "recorded"

    sent: list[list[dict[str, Any]]] = []
    astream = live_llm.router.astream

    def spy(messages: list[dict[str, Any]], **params: Any) -> Any:
        sent.append(messages)
        return astream(messages, **params)

    monkeypatch.setattr(live_llm.router, "astream", spy)
    tool = FunctionTool.from_defaults(record, name="record", fn_schema=Colour)
    agent = FunctionAgent(tools=[tool], llm=live_llm, initial_tool_choice="required")

    async def run() -> tuple[list[ToolCallResult], str]:
        handler = agent.run(COLOUR_QUESTION, max_iterations=3)
        results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
        try:
            return results, f"answered: {await handler}"
        except Exception as exc:  # the model kept calling
            return results, f"stopped: {exc}"

    results, outcome = asyncio.run(run())
    print(f"\ntool calls: {[(r.tool_name, r.tool_kwargs) for r in results]}; {outcome}")
    assert outcome.startswith("answered") or "Max iterations" in outcome
    assert results[0].tool_name == "record" and received[0] == results[0].tool_kwargs
    assert len(sent) >= 2 and sent[1][-1] == {"role": "tool", "content": "recorded", "tool_call_id": results[0].tool_id}
    assert sent[1][-2]["tool_calls"][0]["id"] == results[0].tool_id

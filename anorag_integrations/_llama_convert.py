"""Conversions between LlamaIndex messages/responses and the openai SDK types the router speaks.

``VLLMRouted`` (``llama_index.py``) converts with these and delegates to the router: messages out
(tool calls and tool results included), completions and stream chunks back as LlamaIndex
responses, tools and ``tool_choice`` in OpenAI's form. Imported only after ``llama_index.py`` has
checked that llama-index-core is installed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function
from pydantic import BaseModel

from ._adapters import call_metadata, reasoning_text
from .router import call_info

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

TOOL_MODES = ("auto", "none", "required")
"""OpenAI's ``tool_choice`` modes; any other string names the tool to call."""


def prompt_messages(prompt: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=prompt)]


def to_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as OpenAI chat messages: an assistant's tool calls (from ``additional_kwargs`` or
    ``ToolCallBlock``s) as ``tool_calls``, a tool's (or function's) result as a ``tool`` message with its call's id."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role.value, "content": message.content or ""}
        extra = message.additional_kwargs
        if message.role in (MessageRole.TOOL, MessageRole.FUNCTION) and "tool_call_id" in extra:
            item.update(role="tool", tool_call_id=extra["tool_call_id"])
        elif message.role is MessageRole.FUNCTION and extra.get("name"):  # the legacy function result
            item["name"] = extra["name"]
        if message.role is MessageRole.ASSISTANT and (calls := tool_calls(message)):
            item["tool_calls"] = [wire_call(call) for call in calls]
        out.append(item)
    return out


def tool_spec(tool: BaseTool, strict: bool | None) -> dict[str, Any]:
    """A tool in OpenAI's form; ``strict`` (OpenAI's field, kept by vLLM) only when set."""
    spec = tool.metadata.to_openai_tool(skip_length_check=True)
    if strict is not None:
        spec["function"]["strict"] = strict
    return spec


def with_user_message(history: list[ChatMessage] | None, user_msg: str | ChatMessage | None) -> list[ChatMessage]:
    """A copy of ``history`` with ``user_msg`` (a string: a user message) after it; ``history`` is not changed."""
    messages = list(history or [])
    if user_msg is not None:
        messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
    return messages


def tool_request(
    tools: Sequence[BaseTool],
    strict: bool | None,
    choice: str | dict[str, Any] | None,
    required: bool,
    parallel: bool,
) -> dict[str, Any]:
    """The request keywords that offer ``tools``: OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls``."""
    specs = [tool_spec(tool, strict) for tool in tools]
    if not specs:
        return {}
    return {"tools": specs, "tool_choice": openai_tool_choice(choice, required, specs), "parallel_tool_calls": parallel}


def first_call_only(message: ChatMessage) -> None:
    """Keep only a message's first tool call (in ``additional_kwargs`` and among its blocks)."""
    if calls := message.additional_kwargs.get("tool_calls"):
        message.additional_kwargs["tool_calls"] = calls[:1]
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    message.blocks = [b for b in message.blocks if not isinstance(b, ToolCallBlock) or b is blocks[0]]


def tool_selections(message: ChatMessage, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """A message's tool calls as LlamaIndex's ``ToolSelection``s; ValueError for none when ``error_on_no_tool_call``."""
    calls = tool_calls(message)
    if not calls and error_on_no_tool_call:
        raise ValueError("Expected at least one tool call, but the model answered without one.")
    return [
        ToolSelection(tool_id=call.tool_call_id or "", tool_name=call.tool_name, tool_kwargs=call_arguments(call))
        for call in calls
    ]


def openai_tool_choice(
    choice: str | dict[str, Any] | None, required: bool, specs: list[dict[str, Any]]
) -> str | dict[str, Any]:
    """OpenAI's ``tool_choice`` for LlamaIndex's: a mode or an OpenAI dict as given, a tool's name as a forced call."""
    if choice is None:
        return "required" if required else "auto"
    if isinstance(choice, dict) or choice in TOOL_MODES:
        return choice
    names = [spec["function"]["name"] for spec in specs]
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not among the tools ({', '.join(names)})")
    return {"type": "function", "function": {"name": choice}}


def tool_calls(message: ChatMessage) -> list[ToolCallBlock]:
    """A message's tool calls: its ``ToolCallBlock``s, else ``additional_kwargs["tool_calls"]`` (OpenAI SDK
    objects, or the plain dicts they become in a stored chat history)."""
    if blocks := [block for block in message.blocks if isinstance(block, ToolCallBlock)]:
        return blocks
    calls = []
    for call in message.additional_kwargs.get("tool_calls") or []:
        data = call.model_dump() if isinstance(call, BaseModel) else dict(call)
        function = data.get("function") or {}
        if (data.get("type") or "function") == "function":  # a stream's pieces may carry type None
            calls.append(
                ToolCallBlock(
                    tool_call_id=data.get("id"),
                    tool_name=function.get("name") or "",
                    tool_kwargs=function.get("arguments") or "",
                )
            )
    return calls


def wire_call(call: ToolCallBlock) -> dict[str, Any]:
    """A tool call as OpenAI's API takes it back: the arguments as the model wrote them (a JSON string)."""
    arguments = call.tool_kwargs if isinstance(call.tool_kwargs, str) else json.dumps(call.tool_kwargs)
    return {"id": call.tool_call_id, "type": "function", "function": {"name": call.tool_name, "arguments": arguments}}


def call_arguments(call: ToolCallBlock) -> dict[str, Any]:
    """A call's arguments as keywords; a stream's unfinished JSON is read as far as it goes."""
    if not isinstance(call.tool_kwargs, str):
        return call.tool_kwargs
    try:
        parsed = parse_partial_json(call.tool_kwargs) if call.tool_kwargs.strip() else {}
    except ValueError:  # json.JSONDecodeError too
        return {}
    return parsed if isinstance(parsed, dict) else {}


def assistant_message(
    text: str, calls: Sequence[ChatCompletionMessageFunctionToolCall], extra: dict[str, Any]
) -> ChatMessage:
    """An answer as OpenAI's LlamaIndex LLM gives one: tool calls in ``additional_kwargs`` and as blocks."""
    blocks = [
        TextBlock(text=text),
        *(ToolCallBlock(tool_call_id=c.id, tool_name=c.function.name, tool_kwargs=c.function.arguments) for c in calls),
    ]
    extra = {**extra, "tool_calls": list(calls)} if calls else extra
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def chat_response(response: ChatCompletion) -> ChatResponse:
    choice = response.choices[0]
    extra: dict[str, Any] = {}
    if reasoning := reasoning_text(choice.message):
        extra["reasoning_content"] = reasoning
    calls = [c for c in choice.message.tool_calls or () if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    usage = response.usage.model_dump() if response.usage else None
    message = assistant_message(choice.message.content or "", calls, extra)
    kwargs = {
        "usage": usage,
        "finish_reason": choice.finish_reason,
        "model": response.model,
        **call_metadata(call_info(response)),
    }
    return ChatResponse(message=message, raw=response.model_dump(), additional_kwargs=kwargs)


class StreamState:
    """Accumulates text, reasoning and tool calls across chunks; LlamaIndex responses carry the whole so far.

    A tool call comes in pieces keyed by its ``index``: vLLM sends the id and name first (arguments
    ``null``), then the arguments a few characters at a time.
    """

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.usage: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, str]] = {}

    def _add_calls(self, chunk: ChatCompletionChunk) -> None:
        for piece in chunk.choices[0].delta.tool_calls or ():
            call = self.calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or piece.id or ""
            if piece.function is not None:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""

    def calls_so_far(self) -> list[ChatCompletionMessageFunctionToolCall]:
        """The calls as OpenAI's SDK types a finished one; arguments may still be unfinished JSON."""
        return [
            ChatCompletionMessageFunctionToolCall(
                id=call["id"], type="function", function=Function(name=call["name"], arguments=call["arguments"])
            )
            for _, call in sorted(self.calls.items())
        ]

    def add(self, chunk: ChatCompletionChunk) -> ChatResponse | None:
        if chunk.usage is not None:
            self.usage = chunk.usage.model_dump()
        delta, finish = "", None
        if chunk.choices:
            choice = chunk.choices[0]
            delta = choice.delta.content or ""
            finish = choice.finish_reason
            self.reasoning += reasoning_text(choice.delta) or ""
            self._add_calls(chunk)
        elif self.usage is None:
            return None
        self.text += delta
        extra = {"reasoning_content": self.reasoning} if self.reasoning else {}
        message = assistant_message(self.text, self.calls_so_far(), extra)
        kwargs = {"usage": self.usage, "finish_reason": finish, **call_metadata(call_info(chunk))}
        return ChatResponse(message=message, delta=delta, raw=chunk.model_dump(), additional_kwargs=kwargs)


def completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs={**response.additional_kwargs, **response.message.additional_kwargs},
    )

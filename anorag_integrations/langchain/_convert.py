"""Conversions between LangChain messages/chunks and the openai SDK types the router speaks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_json_schema
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .._adapters import call_metadata, reasoning_text
from ..router import CallInfo


def to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    return convert_to_openai_messages(list(messages))


def usage_metadata(usage: CompletionUsage | None) -> UsageMetadata | None:
    if usage is None:
        return None
    metadata = UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
    if cached is not None:
        metadata["input_token_details"] = InputTokenDetails(cache_read=cached)
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else None
    if reasoning is not None:
        metadata["output_token_details"] = OutputTokenDetails(reasoning=reasoning)
    return metadata


def failover_data(info: CallInfo) -> dict[str, Any]:
    attempts = [{"route": a.route, "error": str(a.error), "elapsed_s": round(a.elapsed_s, 4)} for a in info.attempts]
    return {"served_by": info.route, "failed_attempts": attempts}


def to_chat_result(response: ChatCompletion, info: CallInfo | None) -> ChatResult:
    choice = response.choices[0]
    message = choice.message
    additional: dict[str, Any] = {}
    if reasoning := reasoning_text(message):
        additional["reasoning_content"] = reasoning
    tool_calls, invalid = [], []
    for call in message.tool_calls or []:
        function = getattr(call, "function", None)
        if function is None:
            continue
        try:
            args = json.loads(function.arguments or "{}")
            problem = None if isinstance(args, dict) else f"arguments are a JSON {type(args).__name__}, not an object"
        except json.JSONDecodeError as exc:
            problem = str(exc)
        if problem is None:
            tool_calls.append(tool_call(name=function.name, args=args, id=call.id))
        else:  # a small model's [1, 2] is kept as written, for the caller to see, never a validation crash
            invalid.append(invalid_tool_call(name=function.name, args=function.arguments, id=call.id, error=problem))
    metadata = {
        "model_name": response.model,
        "model_provider": "vllm",
        "finish_reason": choice.finish_reason,
        "stop_reason": (choice.model_extra or {}).get("stop_reason"),
        "id": response.id,
        **call_metadata(info),
    }
    ai = AIMessage(
        content=message.content or "",
        additional_kwargs=additional,
        tool_calls=tool_calls,
        invalid_tool_calls=invalid,
        usage_metadata=usage_metadata(response.usage),
        response_metadata=metadata,
        id=response.id,
    )
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info={"finish_reason": choice.finish_reason})])


def route_chunk(info: CallInfo | None) -> ChatGenerationChunk:
    """The empty last chunk that carries the router's facts, known only when the stream ended."""
    return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=call_metadata(info)))


def to_generation_chunk(chunk: ChatCompletionChunk) -> ChatGenerationChunk | None:
    """One router chunk as a LangChain chunk; None for an empty keep-alive chunk."""
    usage = usage_metadata(chunk.usage)
    if not chunk.choices:
        if usage is None:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, id=chunk.id))
    choice = chunk.choices[0]
    delta = choice.delta
    additional: dict[str, Any] = {}
    if reasoning := reasoning_text(delta):
        additional["reasoning_content"] = reasoning
    tool_chunks = [
        tool_call_chunk(
            name=call.function.name if call.function else None,
            args=call.function.arguments if call.function else None,  # vLLM may send null
            id=call.id,
            index=call.index,
        )
        for call in delta.tool_calls or []
    ]
    metadata: dict[str, Any] = {"model_provider": "vllm"}
    generation_info = None
    if choice.finish_reason:
        metadata.update(
            model_name=chunk.model,
            finish_reason=choice.finish_reason,
            stop_reason=(choice.model_extra or {}).get("stop_reason"),
        )
        generation_info = {"finish_reason": choice.finish_reason}
    message = AIMessageChunk(
        content=delta.content or "",
        additional_kwargs=additional,
        tool_call_chunks=tool_chunks,
        usage_metadata=usage,
        response_metadata=metadata,
        id=chunk.id,
    )
    return ChatGenerationChunk(message=message, generation_info=generation_info)


def openai_tool_choice(choice: dict[str, Any] | str | bool, tools: list[dict[str, Any]]) -> dict[str, Any] | str:
    if isinstance(choice, dict):
        return choice
    if choice is True:
        if len(tools) != 1:
            raise ValueError("tool_choice=True needs exactly one tool")
        choice = tools[0]["function"]["name"]
    if choice == "any":
        return "required"
    if choice in ("auto", "none", "required"):
        return choice
    names = [tool["function"]["name"] for tool in tools]
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not among the tools ({', '.join(names)})")
    return {"type": "function", "function": {"name": choice}}


def ls_format(schema: Any, method: str) -> dict[str, Any]:
    try:
        return {"kwargs": {"method": method}, "schema": convert_to_json_schema(schema) if schema else None}
    except ValueError:
        return {"kwargs": {"method": method}}

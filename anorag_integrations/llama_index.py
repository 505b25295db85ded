"""VLLMRouted, a LlamaIndex LLM, and VLLMRoutedEmbedding, over the shared router (``Settings.llm`` / ``embed_model``).

It converts LlamaIndex messages and responses; routing, failover and statistics belong to the
router. Unlike ``OpenAILike`` it is a chat model by default, takes its context window from the
server's ``/v1/models`` (``max_model_len``), keeps vLLM's reasoning text, and its async methods run
on the router's async path instead of blocking the event loop. It calls tools as a
``FunctionCallingLLM`` (``chat_with_tools``, ``predict_and_call``, ``FunctionAgent``): calls come back
as OpenAI's LlamaIndex LLM gives them, in ``additional_kwargs["tool_calls"]`` and as ``ToolCallBlock``s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:  # llama-index-core comes with the [llama-index] extra: without it, say so
    import llama_index.core  # noqa: F401
except ModuleNotFoundError as missing:
    from ._adapters import framework_missing

    if (error := framework_missing(missing, __name__)) is None:
        raise
    raise error from missing
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, field_serializer

from ._adapters import (
    call_metadata,
    embedding_model,
    embedding_params,
    embedding_route,
    reasoning_text,
    router_params,
    shared_router,
    vectors,
)
from .router import Router, call_info
from .router.secrets import redact_repr_args

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

MASKED_KEY = "**********"
"""What ``to_dict``/``to_json`` store for ``api_key``: the key itself is never serialised."""
MAX_EMBED_BATCH = 2048
"""The largest ``embed_batch_size`` LlamaIndex's ``BaseEmbedding`` accepts."""
TOOL_MODES = ("auto", "none", "required")
"""OpenAI's ``tool_choice`` modes; any other string names the tool to call."""


class _Routed(BaseModel):
    """The fields both LlamaIndex classes take to find their router, and how they serialise them."""

    _router: Router = PrivateAttr()

    config_path: str | None = Field(default=None, description="config file; default $ANORAG_CONFIG or ./config.yaml")
    route: str | None = Field(default=None, description="pin every request to this route")
    model: str | None = Field(default=None, description="model to request; default: each route's own")
    base_url: str | None = Field(default=None, description="a single server instead of a config file")
    api_key: SecretStr | None = Field(
        default=None, description="replaces every route's key ($VLLM_API_KEY is the default route's, from config)"
    )
    timeout: float | None = None
    max_retries: int | None = None

    @field_serializer("api_key")
    def _mask_key(self, key: SecretStr | None) -> str | None:
        """``to_dict``/``to_json`` (and LlamaIndex's callback payloads) show that a key is set, never which."""
        return None if key is None else MASKED_KEY

    @classmethod
    def _unmasked(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``to_dict`` output without the masked key (``from_dict`` takes the real one as a keyword)."""
        return {k: v for k, v in data.items() if not (k == "api_key" and v == MASKED_KEY)}

    def __repr_args__(self) -> Any:
        """Fields for repr: credentials in ``base_url`` are masked."""
        return redact_repr_args(super().__repr_args__())

    @property
    def router(self) -> Router:
        return self._router

    def _shared(self, kind: str) -> Router:
        return shared_router(
            self.config_path, base_url=self.base_url, model=self.model, api_key=self.api_key, kind=kind
        )


class VLLMRouted(_Routed, FunctionCallingLLM):
    """LlamaIndex LLM over a fleet of vLLM servers; same constructor rules as ``ChatVLLMRouted``.

    Tools need the servers started with ``--enable-auto-tool-choice --tool-call-parser ...`` (vLLM
    answers ``tool_choice="auto"`` with a 400 otherwise).
    """

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    context_window: int | None = Field(default=None, description="override what the servers report")
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra request parameters")
    strict: bool | None = Field(default=None, description="OpenAI's strict flag on every tool; default: not sent")

    def __init__(self, router: Router | None = None, **data: Any) -> None:
        super().__init__(**data)
        self._router = router or self._shared("chat")
        if self.route is not None and self.route not in self._router.routes:
            raise ValueError(f"route {self.route!r} is not among the routes ({', '.join(self._router.routes)})")

    @classmethod
    def class_name(cls) -> str:
        return "VLLMRouted"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> VLLMRouted:
        """Rebuild from ``to_dict``; the masked key is dropped, so pass the real one: ``from_dict(d, api_key=...)``."""
        return super().from_dict(cls._unmasked(data), **kwargs)

    @property
    def metadata(self) -> LLMMetadata:
        """Chat model; context window from the servers' max_model_len (smallest of the chat routes it may use)."""
        names = [self.route] if self.route else self._router.config.route_names("chat")
        routes = [self._router.routes[name] for name in names]
        window = self.context_window
        if window is None:
            for route in routes:
                if route.probe_result.checked_at is None and route.configured_max_model_len is None:
                    route.probe()  # once: the result stays on the shared route
            known = [route.max_model_len for route in routes if route.max_model_len]
            window = min(known) if known else DEFAULT_CONTEXT_WINDOW
        config = self._router.config
        return LLMMetadata(
            context_window=window,
            num_output=self.max_tokens or config.params.max_tokens or 256,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model or config.routes[self.route or config.default_route_name].model,
        )

    # --- chat -------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._astream_chat(messages, kwargs)

    # --- completion: the prompt as one user message on the chat endpoint ----------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(self._chat(_prompt(prompt), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _completion(await self._achat(_prompt(prompt), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return (_completion(r) for r in self._stream_chat(_prompt(prompt), kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = self._astream_chat(_prompt(prompt), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield _completion(response)

        return gen()

    # --- tools: FunctionCallingLLM's chat_with_tools & co. call these around chat/achat/stream_chat --
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` keywords: the tools in OpenAI's form, ``tool_choice`` ("required" with ``tool_required``,
        a tool's name forces that tool) and ``parallel_tool_calls``; ``chat_history`` is not changed."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        specs = [_tool_spec(tool, self.strict if strict is None else strict) for tool in tools]
        if not specs:
            return {"messages": messages, **kwargs}
        choice = _tool_choice(tool_choice, tool_required, specs)
        tool_params = {"tools": specs, "tool_choice": choice, "parallel_tool_calls": allow_parallel_tool_calls}
        return {"messages": messages, **tool_params, **kwargs}

    def _validate_chat_with_tools_response(
        self, response: ChatResponse, tools: Sequence[BaseTool], allow_parallel_tool_calls: bool = False, **kwargs: Any
    ) -> ChatResponse:
        """Without ``allow_parallel_tool_calls`` only the first call stays, whatever the server sent."""
        if not allow_parallel_tool_calls:
            message = response.message
            if calls := message.additional_kwargs.get("tool_calls"):
                message.additional_kwargs["tool_calls"] = calls[:1]
            blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
            message.blocks = [b for b in message.blocks if not isinstance(b, ToolCallBlock) or b is blocks[0]]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls in ``response`` (also a partial one from a stream); arguments that are not a JSON object
        (a small model may write ``[1, 2]``) become ``{}``, so the tool reports what is missing."""
        calls = _tool_calls(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError("Expected at least one tool call, but the model answered without one.")
        return [
            ToolSelection(tool_id=call.tool_call_id or "", tool_name=call.tool_name, tool_kwargs=_arguments(call))
            for call in calls
        ]

    # --- internal: undecorated, so a completion is one callback event, not two ----------------------
    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        return _chat_response(self._router.chat(_to_dicts(messages), **self._params(kwargs)))

    async def _achat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        return _chat_response(await self._router.achat(_to_dicts(messages), **self._params(kwargs)))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        chunks = self._router.stream(_to_dicts(messages), **self._params(kwargs))
        state = _StreamState()
        return (response for chunk in chunks if (response := state.add(chunk)) is not None)

    async def _astream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseAsyncGen:
        chunks = self._router.astream(_to_dicts(messages), **self._params(kwargs))
        state = _StreamState()
        async for chunk in chunks:
            if (response := state.add(chunk)) is not None:
                yield response

    def _params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**router_params(self, model=self.model), **self.additional_kwargs, **kwargs}


class VLLMRoutedEmbedding(_Routed, BaseEmbedding):
    """LlamaIndex embeddings over the routes of kind ``embedding`` (``Settings.embed_model = VLLMRoutedEmbedding()``).

    Same constructor rules as ``VLLMRouted``, and the same router for the same config. LlamaIndex
    splits texts into ``embed_batch_size`` batches (default: the config's ``embedding.batch_size``),
    each one request; its async path runs them ``num_workers`` at a time (default:
    ``embedding.max_concurrency``). The ``_aget_*`` methods use the router's async path.
    """

    truncate: bool | None = Field(default=None, description="let the server cut long inputs; default: the config's")
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra request parameters")

    def __init__(self, router: Router | None = None, **data: Any) -> None:
        super().__init__(**data)
        self._router = router or self._shared("embedding")
        self._router._check_kind("embedding")  # NoRouteOfKindError now, not at the first call
        embedding_route(self._router, self.route)
        config = self._router.config.embedding
        if "model_name" not in self.model_fields_set:
            self.model_name = embedding_model(self._router, self.route, self.model)
        if "embed_batch_size" not in self.model_fields_set:
            self.embed_batch_size = min(config.batch_size, MAX_EMBED_BATCH)
        if "num_workers" not in self.model_fields_set:
            self.num_workers = config.max_concurrency

    @classmethod
    def class_name(cls) -> str:
        return "VLLMRoutedEmbedding"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> VLLMRoutedEmbedding:
        """Rebuild from ``to_dict``; the masked key is dropped, so pass the real one: ``from_dict(d, api_key=...)``."""
        return super().from_dict(cls._unmasked(data), **kwargs)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embeddings([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return vectors(self._router.embed(texts, **self._params()))

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._aget_text_embeddings([query]))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return vectors(await self._router.aembed(texts, **self._params()))

    def _params(self) -> dict[str, Any]:
        """Router keywords: the fields that are set; a batch LlamaIndex made is one request."""
        return {**embedding_params(self, model=self.model, batch_size=self.embed_batch_size), **self.additional_kwargs}


def _prompt(prompt: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=prompt)]


def _to_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
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
        if message.role is MessageRole.ASSISTANT and (calls := _tool_calls(message)):
            item["tool_calls"] = [_wire_call(call) for call in calls]
        out.append(item)
    return out


def _tool_spec(tool: BaseTool, strict: bool | None) -> dict[str, Any]:
    """A tool in OpenAI's form; ``strict`` (OpenAI's field, kept by vLLM) only when set."""
    spec = tool.metadata.to_openai_tool(skip_length_check=True)
    if strict is not None:
        spec["function"]["strict"] = strict
    return spec


def _tool_choice(
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


def _tool_calls(message: ChatMessage) -> list[ToolCallBlock]:
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


def _wire_call(call: ToolCallBlock) -> dict[str, Any]:
    """A tool call as OpenAI's API takes it back: the arguments as the model wrote them (a JSON string)."""
    arguments = call.tool_kwargs if isinstance(call.tool_kwargs, str) else json.dumps(call.tool_kwargs)
    return {"id": call.tool_call_id, "type": "function", "function": {"name": call.tool_name, "arguments": arguments}}


def _arguments(call: ToolCallBlock) -> dict[str, Any]:
    """A call's arguments as keywords; a stream's unfinished JSON is read as far as it goes."""
    if not isinstance(call.tool_kwargs, str):
        return call.tool_kwargs
    try:
        parsed = parse_partial_json(call.tool_kwargs) if call.tool_kwargs.strip() else {}
    except ValueError:  # json.JSONDecodeError too
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _assistant(text: str, calls: Sequence[ChatCompletionMessageFunctionToolCall], extra: dict[str, Any]) -> ChatMessage:
    """An answer as OpenAI's LlamaIndex LLM gives one: tool calls in ``additional_kwargs`` and as blocks."""
    blocks = [
        TextBlock(text=text),
        *(ToolCallBlock(tool_call_id=c.id, tool_name=c.function.name, tool_kwargs=c.function.arguments) for c in calls),
    ]
    extra = {**extra, "tool_calls": list(calls)} if calls else extra
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _chat_response(response: ChatCompletion) -> ChatResponse:
    choice = response.choices[0]
    extra: dict[str, Any] = {}
    if reasoning := reasoning_text(choice.message):
        extra["reasoning_content"] = reasoning
    calls = [c for c in choice.message.tool_calls or () if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    usage = response.usage.model_dump() if response.usage else None
    message = _assistant(choice.message.content or "", calls, extra)
    kwargs = {
        "usage": usage,
        "finish_reason": choice.finish_reason,
        "model": response.model,
        **call_metadata(call_info(response)),
    }
    return ChatResponse(message=message, raw=response.model_dump(), additional_kwargs=kwargs)


class _StreamState:
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
        message = _assistant(self.text, self.calls_so_far(), extra)
        kwargs = {"usage": self.usage, "finish_reason": finish, **call_metadata(call_info(chunk))}
        return ChatResponse(message=message, delta=delta, raw=chunk.model_dump(), additional_kwargs=kwargs)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs={**response.additional_kwargs, **response.message.additional_kwargs},
    )

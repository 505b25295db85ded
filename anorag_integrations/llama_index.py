"""VLLMRouted, a LlamaIndex LLM, and VLLMRoutedEmbedding, over the shared router (``Settings.llm`` / ``embed_model``).

It converts LlamaIndex messages and responses; routing, failover and statistics belong to the
router. Unlike ``OpenAILike`` it is a chat model by default, takes its context window from the
server's ``/v1/models`` (``max_model_len``), keeps vLLM's reasoning text, and its async methods run
on the router's async path instead of blocking the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from openai.types.chat import ChatCompletion, ChatCompletionChunk
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

MASKED_KEY = "**********"
"""What ``to_dict``/``to_json`` store for ``api_key``: the key itself is never serialised."""
MAX_EMBED_BATCH = 2048
"""The largest ``embed_batch_size`` LlamaIndex's ``BaseEmbedding`` accepts."""


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


class VLLMRouted(_Routed, CustomLLM):
    """LlamaIndex LLM over a fleet of vLLM servers; same constructor rules as ``ChatVLLMRouted``."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    context_window: int | None = Field(default=None, description="override what the servers report")
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra request parameters")

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
    """LlamaIndex messages as OpenAI chat messages (tool calls and tool results included)."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role.value, "content": message.content or ""}
        extra = message.additional_kwargs
        if message.role is MessageRole.TOOL and "tool_call_id" in extra:
            item["tool_call_id"] = extra["tool_call_id"]
        if message.role is MessageRole.ASSISTANT and extra.get("tool_calls"):
            item["tool_calls"] = extra["tool_calls"]
        out.append(item)
    return out


def _chat_response(response: ChatCompletion) -> ChatResponse:
    choice = response.choices[0]
    extra: dict[str, Any] = {}
    if reasoning := reasoning_text(choice.message):
        extra["reasoning_content"] = reasoning
    if choice.message.tool_calls:
        extra["tool_calls"] = [call.model_dump() for call in choice.message.tool_calls]
    usage = response.usage.model_dump() if response.usage else None
    message = ChatMessage(role=MessageRole.ASSISTANT, content=choice.message.content or "", additional_kwargs=extra)
    kwargs = {
        "usage": usage,
        "finish_reason": choice.finish_reason,
        "model": response.model,
        **call_metadata(call_info(response)),
    }
    return ChatResponse(message=message, raw=response.model_dump(), additional_kwargs=kwargs)


class _StreamState:
    """Accumulates text and reasoning across chunks; LlamaIndex responses carry the whole so far."""

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: ChatCompletionChunk) -> ChatResponse | None:
        if chunk.usage is not None:
            self.usage = chunk.usage.model_dump()
        delta, finish = "", None
        if chunk.choices:
            choice = chunk.choices[0]
            delta = choice.delta.content or ""
            finish = choice.finish_reason
            self.reasoning += reasoning_text(choice.delta) or ""
        elif self.usage is None:
            return None
        self.text += delta
        extra = {"reasoning_content": self.reasoning} if self.reasoning else {}
        message = ChatMessage(role=MessageRole.ASSISTANT, content=self.text, additional_kwargs=extra)
        kwargs = {"usage": self.usage, "finish_reason": finish, **call_metadata(call_info(chunk))}
        return ChatResponse(message=message, delta=delta, raw=chunk.model_dump(), additional_kwargs=kwargs)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs={**response.additional_kwargs, **response.message.additional_kwargs},
    )

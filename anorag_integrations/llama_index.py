"""VLLMRouted, a LlamaIndex LLM, and VLLMRoutedEmbedding, over the shared router (``Settings.llm`` / ``embed_model``).

It converts LlamaIndex messages and responses; routing, failover and statistics belong to the
router. Unlike ``OpenAILike`` it is a chat model by default, takes its context window from the
server's ``/v1/models`` (``max_model_len``), keeps vLLM's reasoning text, and its async methods run
on the router's async path instead of blocking the event loop. It calls tools as a
``FunctionCallingLLM`` (``chat_with_tools``, ``predict_and_call``, ``FunctionAgent``): calls come back
as OpenAI's LlamaIndex LLM gives them, in ``additional_kwargs["tool_calls"]`` and as ``ToolCallBlock``s.
"""

from __future__ import annotations

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
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError, field_serializer, model_validator

from ._adapters import (
    arguments_error,
    chat_route,
    embedding_model,
    embedding_params,
    embedding_route,
    given_router,
    router_params,
    shared_router,
    sort_arguments,
    vectors,
)
from ._llama_convert import (
    StreamState,
    chat_response,
    completion,
    first_call_only,
    prompt_messages,
    to_dicts,
    tool_request,
    tool_selections,
    with_user_message,
)
from .router import Router
from .router.secrets import redact_repr_args

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

MASKED_KEY = "**********"
"""What ``to_dict``/``to_json`` store for ``api_key``: the key itself is never serialised."""
MAX_EMBED_BATCH = 2048
"""The largest ``embed_batch_size`` LlamaIndex's ``BaseEmbedding`` accepts."""


class _Routed(BaseModel):
    """The fields both LlamaIndex classes take to find their router, and how they serialise them.

    Any problem with the arguments or the config raises ``ConfigError`` (``NoRouteOfKindError`` when the
    config has no route of the class's kind); an unknown argument goes to ``additional_kwargs``, with a warning.
    """

    _router: Router = PrivateAttr()

    config_path: str | None = Field(default=None, description="config file; default $ANORAG_CONFIG or ./config.yaml")
    route: str | None = Field(default=None, description="pin every request to this route")
    model: str | None = Field(default=None, description="model to request; default: each route's own")
    base_url: str | None = Field(default=None, description="a single server instead of a config file")
    api_key: SecretStr | None = Field(
        default=None, description="replaces every route's key ($VLLM_API_KEY is the default route's, from config)"
    )
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="seconds per attempt")
    max_retries: int | None = Field(default=None, ge=0, description="extra full rounds over the routes")
    priority: int | None = Field(
        default=None, description="lower is served first when the fleet is saturated (0 interactive, 10 batch)"
    )
    additional_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra request parameters; unknown arguments land here too"
    )

    def __init__(self, **data: Any) -> None:
        """Pydantic's ``ValidationError`` becomes the package's ``ConfigError``, its own message first."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise arguments_error(type(self).__name__, exc) from None

    @model_validator(mode="before")
    @classmethod
    def _sort_arguments(cls, data: Any) -> Any:
        """Unknown arguments go to ``additional_kwargs`` (warned of), or raise when not meant for the server."""
        if not isinstance(data, dict):
            return data
        return sort_arguments(cls.__name__, data, set(cls.model_fields), "additional_kwargs")

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

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    context_window: int | None = Field(default=None, gt=0, description="override what the servers report")
    strict: bool | None = Field(default=None, description="OpenAI's strict flag on every tool; default: not sent")

    def __init__(self, router: Router | None = None, **data: Any) -> None:
        super().__init__(**data)
        self._router = given_router(type(self).__name__, router) or self._shared("chat")
        chat_route(type(self).__name__, self._router, self.route)

    @classmethod
    def class_name(cls) -> str:
        return "VLLMRouted"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> VLLMRouted:
        """Rebuild from ``to_dict``; the masked key is dropped, so pass the real one: ``from_dict(d, api_key=...)``."""
        return super().from_dict(cls._unmasked(data), **kwargs)

    @property
    def metadata(self) -> LLMMetadata:
        """Chat model; context window from the servers' max_model_len (smallest of the routes serving its model)."""
        router = self._router
        routes = [router.routes[self.route]] if self.route else router.models.candidates("chat", self.model)
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
        return completion(self._chat(prompt_messages(prompt), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return completion(await self._achat(prompt_messages(prompt), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return (completion(r) for r in self._stream_chat(prompt_messages(prompt), kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = self._astream_chat(prompt_messages(prompt), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield completion(response)

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
        strict = self.strict if strict is None else strict
        tools_asked = tool_request(tools, strict, tool_choice, tool_required, allow_parallel_tool_calls)
        return {"messages": with_user_message(chat_history, user_msg), **tools_asked, **kwargs}

    def _validate_chat_with_tools_response(
        self, response: ChatResponse, tools: Sequence[BaseTool], allow_parallel_tool_calls: bool = False, **kwargs: Any
    ) -> ChatResponse:
        """Without ``allow_parallel_tool_calls`` only the first call stays, whatever the server sent."""
        if not allow_parallel_tool_calls:
            first_call_only(response.message)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls in ``response`` (also a partial one from a stream); arguments that are not a JSON object
        (a small model may write ``[1, 2]``) become ``{}``, so the tool reports what is missing."""
        return tool_selections(response.message, error_on_no_tool_call)

    # --- internal: undecorated, so a completion is one callback event, not two ----------------------
    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        return chat_response(self._router.chat(to_dicts(messages), **self._params(kwargs)))

    async def _achat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        return chat_response(await self._router.achat(to_dicts(messages), **self._params(kwargs)))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        chunks = self._router.stream(to_dicts(messages), **self._params(kwargs))
        state = StreamState()
        return (response for chunk in chunks if (response := state.add(chunk)) is not None)

    async def _astream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseAsyncGen:
        chunks = self._router.astream(to_dicts(messages), **self._params(kwargs))
        state = StreamState()
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

    def __init__(self, router: Router | None = None, **data: Any) -> None:
        super().__init__(**data)
        self._router = given_router(type(self).__name__, router) or self._shared("embedding")
        self._router._check_kind("embedding")  # NoRouteOfKindError now, not at the first call
        embedding_route(type(self).__name__, self._router, self.route)
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

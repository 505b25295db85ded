"""ChatVLLMRouted: a LangChain chat model over the shared router.

It converts LangChain messages to OpenAI dicts and router responses/chunks back to LangChain
messages; routing, failover, retries and statistics all belong to :class:`~.router.Router`.
Unlike ``ChatOpenAI(base_url=...)`` it keeps vLLM's reasoning text, asks for usage in streams by
default, uses vLLM's ``structured_outputs`` for JSON schemas, and reports the serving route.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal, Self

from langchain_core import exceptions as lc_errors
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.callbacks.manager import adispatch_custom_event, ahandle_event, dispatch_custom_event, handle_event
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ConfigDict, Field, SecretStr, model_validator

from . import router as r
from .router import CallInfo, Router, call_info

FAILOVER_EVENT = "anorag_route_failover"
"""Name of the custom callback event dispatched when a request failed on a route and moved on."""


class ChatVLLMRouted(BaseChatModel):
    """Chat model over a fleet of vLLM servers.

    ``ChatVLLMRouted()`` reads ``./config.yaml`` (or ``$ANORAG_CONFIG``); ``config_path=`` names a
    file, ``router=`` shares an existing router, ``base_url=`` + ``model=`` skip the config for a
    single server, ``route=`` pins a route. Instances built from the same config share one router.
    """

    # --- serializable fields --------------------------------------------------------------------
    config_path: str | None = None
    router: Router | None = Field(default=None, exclude=True)
    route: str | None = None
    model_name: str | None = Field(default=None, alias="model")
    """Model to request; default: each route's configured model."""
    base_url: str | None = None
    api_key: SecretStr | None = Field(default_factory=secret_from_env("VLLM_API_KEY", default=None))
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    timeout: float | None = None
    max_retries: int | None = None
    streaming: bool = False
    stream_usage: bool = True
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    extra_body: dict[str, Any] | None = None

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _connect(self) -> Self:
        if self.router is None:
            key = self.api_key.get_secret_value() if self.api_key else None
            self.router = Router.shared(self.config_path, base_url=self.base_url, model=self.model_name, api_key=key)
        if self.route is not None and self.route not in self.router.routes:
            raise ValueError(f"route {self.route!r} is not among the routes ({', '.join(self.router.routes)})")
        return self

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["anorag_integrations", "langchain"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "VLLM_API_KEY"}

    # --- BaseChatModel overrides ---------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "vllm-routed"

    @property
    def _router(self) -> Router:
        assert self.router is not None  # set by the validator
        return self.router

    @property
    def _default_model(self) -> str:
        config = self._router.config
        return self.model_name or config.routes[self.route or config.default_route_name].model

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._default_model, "routes": list(self._router.routes), **self._request_params()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="vllm", ls_model_name=kwargs.get("model") or self._default_model)
        params["ls_model_type"] = "chat"
        if (temperature := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = temperature
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = stop
        return params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        with _langchain_errors():
            response = self._router.chat(_to_dicts(messages), **self._request_params(stop, **kwargs))
        info = call_info(response)
        if info and info.attempts:
            _report(run_manager, info)
        return _to_chat_result(response, info)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        with _langchain_errors():
            response = await self._router.achat(_to_dicts(messages), **self._request_params(stop, **kwargs))
        info = call_info(response)
        if info and info.attempts:
            await _areport(run_manager, info)
        return _to_chat_result(response, info)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        params = self._request_params(stop, stream=True, **kwargs)
        info: CallInfo | None = None
        with _langchain_errors():
            for chunk in self._router.stream(_to_dicts(messages), **params):
                if info is None and (info := call_info(chunk)) and info.attempts:
                    _report(run_manager, info)
                generation = _to_generation_chunk(chunk)
                if generation is None:
                    continue
                if run_manager:
                    run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        last = _route_chunk(info)  # once, at the end: merged metadata must not repeat a string
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        params = self._request_params(stop, stream=True, **kwargs)
        info: CallInfo | None = None
        with _langchain_errors():
            async for chunk in self._router.astream(_to_dicts(messages), **params):
                if info is None and (info := call_info(chunk)) and info.attempts:
                    await _areport(run_manager, info)
                generation = _to_generation_chunk(chunk)
                if generation is None:
                    continue
                if run_manager:
                    await run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        last = _route_chunk(info)
        if run_manager:
            await run_manager.on_llm_new_token("", chunk=last)
        yield last

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools``; ``tool_choice`` is "auto", "none", "required"/"any", a tool name, or True (the only tool).

        vLLM needs ``--enable-auto-tool-choice --tool-call-parser ...`` for "auto".
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = _tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output; ``json_schema`` uses vLLM's ``structured_outputs`` (guided decoding)."""
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable[Any, Any]
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, strict=strict, ls_structured_output_format=_ls_format(schema, method)
            )
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method == "json_schema":
            if schema is None:
                raise ValueError("method='json_schema' needs a schema")
            extra_body = {**(self.extra_body or {}), "structured_outputs": {"json": convert_to_json_schema(schema)}}
            llm = self.bind(extra_body=extra_body, ls_structured_output_format=_ls_format(schema, method))
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "json_mode":
            llm = self.bind(
                response_format={"type": "json_object"}, ls_structured_output_format=_ls_format(schema, method)
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown method {method!r}: use json_schema, function_calling or json_mode")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # --- internal --------------------------------------------------------------------------------
    def _request_params(self, stop: list[str] | None = None, *, stream: bool = False, **kwargs: Any) -> dict[str, Any]:
        """The router keywords of one call: instance defaults overridden by call arguments."""
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "route": self.route,
            "model": self.model_name,
            **self.model_kwargs,
        }
        params = {k: v for k, v in params.items() if v is not None}
        extra_body = {**(self.extra_body or {}), **(kwargs.pop("extra_body", None) or {})}
        params.update(kwargs)
        if extra_body:
            params["extra_body"] = extra_body
        stop = stop or self.stop
        if stop:
            params["stop"] = stop
        if stream:
            usage = kwargs.get("stream_usage", self.stream_usage)
            params.pop("stream_usage", None)
            params.setdefault("stream_options", {"include_usage": bool(usage)})
        else:
            params.pop("stream_usage", None)
        return params


# --- conversions ----------------------------------------------------------------------------------


def _to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    return convert_to_openai_messages(list(messages))


def _reasoning(obj: Any) -> str | None:
    """vLLM's reasoning text: ``reasoning`` (current) or ``reasoning_content`` (older servers)."""
    extra = getattr(obj, "model_extra", None) or {}
    value = extra.get("reasoning") or extra.get("reasoning_content")
    return value if isinstance(value, str) and value else None


def _usage(usage: CompletionUsage | None) -> UsageMetadata | None:
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


def _route_metadata(info: CallInfo | None) -> dict[str, Any]:
    if info is None:
        return {}
    return {
        "route": info.route,
        "attempts": len(info.attempts) + 1,
        "failed_routes": [a.route for a in info.attempts],
        "latency_s": info.latency_s,
        "ttft_s": info.ttft_s,
    }


def _report(run_manager: CallbackManagerForLLMRun | None, info: CallInfo) -> None:
    """Dispatch the failover as a custom event, so LangSmith and console traces show it.

    ``BaseChatModel.stream`` calls ``_stream`` without its run manager; then the event goes to the
    enclosing run (a chain) when there is one, and otherwise only ``response_metadata`` tells.
    """
    if run_manager is None:
        with contextlib.suppress(RuntimeError):  # no enclosing run
            dispatch_custom_event(FAILOVER_EVENT, _failover_data(info))
    else:
        handle_event(run_manager.handlers, *_event(info), **_event_context(run_manager))


async def _areport(run_manager: AsyncCallbackManagerForLLMRun | None, info: CallInfo) -> None:
    if run_manager is None:
        with contextlib.suppress(RuntimeError):
            await adispatch_custom_event(FAILOVER_EVENT, _failover_data(info))
    else:
        await ahandle_event(run_manager.handlers, *_event(info), **_event_context(run_manager))


def _event(info: CallInfo) -> tuple[str, str, str, dict[str, Any]]:
    return "on_custom_event", "ignore_custom_event", FAILOVER_EVENT, _failover_data(info)


def _event_context(run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun) -> dict[str, Any]:
    return {"run_id": run_manager.run_id, "tags": run_manager.tags, "metadata": run_manager.metadata}


def _failover_data(info: CallInfo) -> dict[str, Any]:
    attempts = [{"route": a.route, "error": str(a.error), "elapsed_s": round(a.elapsed_s, 4)} for a in info.attempts]
    return {"served_by": info.route, "failed_attempts": attempts}


def _to_chat_result(response: ChatCompletion, info: CallInfo | None) -> ChatResult:
    choice = response.choices[0]
    message = choice.message
    additional: dict[str, Any] = {}
    if reasoning := _reasoning(message):
        additional["reasoning_content"] = reasoning
    tool_calls, invalid = [], []
    for call in message.tool_calls or []:
        function = getattr(call, "function", None)
        if function is None:
            continue
        try:
            args = json.loads(function.arguments or "{}")
            tool_calls.append(tool_call(name=function.name, args=args, id=call.id))
        except json.JSONDecodeError as exc:
            invalid.append(invalid_tool_call(name=function.name, args=function.arguments, id=call.id, error=str(exc)))
    metadata = {
        "model_name": response.model,
        "model_provider": "vllm",
        "finish_reason": choice.finish_reason,
        "stop_reason": (choice.model_extra or {}).get("stop_reason"),
        "id": response.id,
        **_route_metadata(info),
    }
    ai = AIMessage(
        content=message.content or "",
        additional_kwargs=additional,
        tool_calls=tool_calls,
        invalid_tool_calls=invalid,
        usage_metadata=_usage(response.usage),
        response_metadata=metadata,
        id=response.id,
    )
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info={"finish_reason": choice.finish_reason})])


def _route_chunk(info: CallInfo | None) -> ChatGenerationChunk:
    """The empty last chunk that carries the router's facts, known only when the stream ended."""
    return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=_route_metadata(info)))


def _to_generation_chunk(chunk: ChatCompletionChunk) -> ChatGenerationChunk | None:
    """One router chunk as a LangChain chunk; None for an empty keep-alive chunk."""
    usage = _usage(chunk.usage)
    if not chunk.choices:
        if usage is None:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, id=chunk.id))
    choice = chunk.choices[0]
    delta = choice.delta
    additional: dict[str, Any] = {}
    if reasoning := _reasoning(delta):
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


def _tool_choice(choice: dict[str, Any] | str | bool, tools: list[dict[str, Any]]) -> dict[str, Any] | str:
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


def _ls_format(schema: Any, method: str) -> dict[str, Any]:
    try:
        return {"kwargs": {"method": method}, "schema": convert_to_json_schema(schema) if schema else None}
    except ValueError:
        return {"kwargs": {"method": method}}


# --- errors -----------------------------------------------------------------------------------------


def _both(ours: type[BaseException], theirs: type[BaseException]) -> type[BaseException]:
    """A class that is both the router's error and LangChain's, so either ``except`` catches it."""
    return type(ours.__name__, (ours, theirs), {"__module__": __name__})


_LC_ERRORS: Mapping[type[BaseException], type[BaseException]] = {
    r.ContextOverflowError: _both(r.ContextOverflowError, lc_errors.ContextOverflowError),
    r.BadRequestError: _both(r.BadRequestError, lc_errors.ModelInvalidRequestError),
    r.UnprocessableEntityError: _both(r.UnprocessableEntityError, lc_errors.ModelInvalidRequestError),
    r.AuthenticationError: _both(r.AuthenticationError, lc_errors.ModelAuthenticationError),
    r.ModelNotFoundError: _both(r.ModelNotFoundError, lc_errors.ModelNotFoundError),
    r.AllRoutesFailed: _both(r.AllRoutesFailed, lc_errors.ModelAPIError),
    r.StreamInterruptedError: _both(r.StreamInterruptedError, lc_errors.ModelConnectionError),
}


@contextlib.contextmanager
def _langchain_errors() -> Iterator[None]:
    """Re-class router errors as their LangChain twins; message, route and attempts are kept."""
    try:
        yield
    except r.RouterError as exc:
        if (twin := _LC_ERRORS.get(type(exc))) is not None:
            exc.__class__ = twin  # type: ignore[assignment]  # twin subclasses type(exc)
        raise

"""ChatVLLMRouted: the LangChain chat model class; it converts and delegates, nothing else.

Unlike ``ChatOpenAI(base_url=...)`` it keeps vLLM's reasoning text, asks for usage in streams by
default, uses vLLM's ``structured_outputs`` for JSON schemas, and reports the serving route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal, Self

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, model_validator

from .._adapters import API_KEY_ENV, chat_route, router_params
from ..router import CallInfo, call_info
from ._callbacks import areport, report
from ._convert import (
    ls_format,
    openai_tool_choice,
    route_chunk,
    to_chat_result,
    to_dicts,
    to_generation_chunk,
)
from ._errors import langchain_errors
from ._routed import Routed


class ChatVLLMRouted(Routed, BaseChatModel):
    """Chat model over a fleet of vLLM servers.

    ``ChatVLLMRouted()`` reads ``./config.yaml`` (or ``$ANORAG_CONFIG``); ``config_path=`` names a
    file, ``router=`` shares an existing router, ``base_url=`` + ``model=`` skip the config for a
    single server, ``route=`` pins a route. Instances built from the same config share one router.
    """

    # --- serializable fields (those that find the router: Routed) -------------------------------
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False
    stream_usage: bool = True
    extra_body: dict[str, Any] | None = None

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _connect(self) -> Self:
        chat_route(type(self).__name__, self._connect_router("chat"), self.route)
        return self

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["anorag_integrations", "langchain"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": API_KEY_ENV}

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        """LangChain's form, without a key read from ``$VLLM_API_KEY``: loading reads it there again.

        An explicit key is stored as a ``$VLLM_API_KEY`` reference (``lc_secrets``); stored for a key
        from the environment too, it would come back as an explicit, every-route key.
        """
        data = super().to_json()
        if data["type"] == "constructor" and "api_key" not in self.model_fields_set:
            data["kwargs"].pop("api_key", None)
        return data

    # --- Runnable overrides: a conversation's session_id from config["configurable"] --------------
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **_session(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **_session(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, stop=stop, **_session(config, kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, stop=stop, **_session(config, kwargs))

    # --- BaseChatModel overrides ---------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "vllm-routed"

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
        with langchain_errors():
            response = self._router.chat(to_dicts(messages), **self._request_params(stop, **kwargs))
        info = call_info(response)
        if info and info.attempts:
            report(run_manager, info)
        return to_chat_result(response, info)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        with langchain_errors():
            response = await self._router.achat(to_dicts(messages), **self._request_params(stop, **kwargs))
        info = call_info(response)
        if info and info.attempts:
            await areport(run_manager, info)
        return to_chat_result(response, info)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        params = self._request_params(stop, stream=True, **kwargs)
        info: CallInfo | None = None
        with langchain_errors():
            for chunk in self._router.stream(to_dicts(messages), **params):
                if info is None and (info := call_info(chunk)) and info.attempts:
                    report(run_manager, info)
                generation = to_generation_chunk(chunk)
                if generation is None:
                    continue
                if run_manager:
                    run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        last = route_chunk(info)  # once, at the end: merged metadata must not repeat a string
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
        with langchain_errors():
            async for chunk in self._router.astream(to_dicts(messages), **params):
                if info is None and (info := call_info(chunk)) and info.attempts:
                    await areport(run_manager, info)
                generation = to_generation_chunk(chunk)
                if generation is None:
                    continue
                if run_manager:
                    await run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        last = route_chunk(info)
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
            kwargs["tool_choice"] = openai_tool_choice(tool_choice, formatted)
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
                [schema], tool_choice=name, strict=strict, ls_structured_output_format=ls_format(schema, method)
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
            llm = self.bind(extra_body=extra_body, ls_structured_output_format=ls_format(schema, method))
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "json_mode":
            llm = self.bind(
                response_format={"type": "json_object"}, ls_structured_output_format=ls_format(schema, method)
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
        params = {**router_params(self, model=self.model_name), **self.model_kwargs}
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


def _session(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's keywords, with ``session_id`` from the run's ``configurable`` when the call gave none.

    ``RunnableWithMessageHistory`` and LangGraph put the conversation's id there; the router keeps a
    conversation on one server while it is up (its prefix stays cached).
    """
    if "session_id" not in kwargs:
        session = ensure_config(config).get("configurable", {}).get("session_id")
        if session is not None:
            return {**kwargs, "session_id": session}
    return kwargs

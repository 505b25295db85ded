"""OllamaRoute: a route that speaks Ollama's native API through the official ``ollama`` client.

Requests arrive in the router's OpenAI shape and answers leave in it (``ChatCompletion`` and
chunks), so failover, breakers, policies and statistics treat Ollama hosts like any other route.
Native, not Ollama's ``/v1``: only the native API takes ``options`` such as ``num_ctx`` (Ollama's
small default context silently truncates long RAG prompts) and ``keep_alive``.

A route of kind embedding speaks ``POST /api/embed`` and answers the openai SDK's
``CreateEmbeddingResponse``, so one fleet can hold vLLM pooling servers and Ollama hosts side by side
while a migration runs. Ollama truncates over-long inputs by default; here it does so only when the
call asked to truncate (``embedding.truncate``), otherwise an input past the window is an error, as on
vLLM. The context window comes from ``/api/show`` (the model's ``*.context_length``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from openai.types import CreateEmbeddingResponse, Embedding
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.create_embedding_response import Usage

from ..bounds import watched_transport
from ..classify import classify, status_error
from ..errors import RouteError, TransientRouteError
from .answers import checked_embeddings
from .clients import PerLoop
from .probe import Listed
from .route import Route

if TYPE_CHECKING:
    from ...config import RouteConfig

OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "seed": "seed",
    "stop": "stop",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
    "num_ctx": "num_ctx",
}
"""OpenAI / vLLM request parameters and the Ollama option each becomes."""


class OllamaRoute(Route):
    """An Ollama host (``base_url`` like ``http://gpu3:11434``) serving ``model``."""

    def _connect(self, cfg: RouteConfig) -> None:
        try:
            import ollama
        except ImportError:
            raise ImportError(
                "routes with api: ollama need the ollama client: pip install 'anorag-integrations[ollama]'"
            ) from None
        self._ollama = ollama
        self.options = dict(cfg.options)
        self.keep_alive = cfg.keep_alive
        self._native = self._native_client()
        self._anative = PerLoop(
            lambda: ollama.AsyncClient(host=self._url, timeout=self.timeout, auth=self._auth),
            lambda client: client._client.aclose(),
        )
        self.missing_model_hint = "run `ollama pull MODEL` on that host (`ollama list` shows what it has)"

    def _native_client(self) -> Any:
        # the watched transport lets the router cut a trickling answer at the attempt's bound (see bounds.py)
        return self._ollama.Client(
            host=self._url, timeout=self.timeout, auth=self._auth, transport=watched_transport(httpx)
        )

    def _renew_clients(self) -> None:
        """The native clients (the OpenAI client, which reads ``/metrics`` for least_queue, is renewed too)."""
        self._native = self._native_client()
        self._anative.renew_after_fork()

    @property
    def server_root(self) -> str:
        return self._url

    # --- transport ---------------------------------------------------------------------------------

    def create(self, body: dict[str, Any], timeout: float) -> ChatCompletion:
        try:
            return self._completion(self._native.chat(**self._request(body, stream=False)))
        except Exception as exc:
            raise self._error(exc) from exc

    async def acreate(self, body: dict[str, Any], timeout: float) -> ChatCompletion:
        try:
            return self._completion(await self._anative.get().chat(**self._request(body, stream=False)))
        except Exception as exc:
            raise self._error(exc) from exc

    def open_stream(self, body: dict[str, Any], timeout: float) -> _Stream:
        parts = self._native.chat(**self._request(body, stream=True))
        return _Stream(self, parts, _wants_usage(body))

    async def aopen_stream(self, body: dict[str, Any], timeout: float) -> _AsyncStream:
        try:
            parts = await self._anative.get().chat(**self._request(body, stream=True))
        except Exception as exc:
            raise self._error(exc) from exc
        return _AsyncStream(self, parts, _wants_usage(body))

    def embed(self, body: dict[str, Any], timeout: float) -> CreateEmbeddingResponse:
        try:
            answer = self._native.embed(**self._embed_request(body))
        except Exception as exc:
            raise self._error(exc) from exc
        return self._embeddings(answer, body)

    async def aembed(self, body: dict[str, Any], timeout: float) -> CreateEmbeddingResponse:
        try:
            answer = await self._anative.get().embed(**self._embed_request(body))
        except Exception as exc:
            raise self._error(exc) from exc
        return self._embeddings(answer, body)

    def peek_context_window(self, timeout: float) -> None:
        """The model's context window from ``/api/show`` within ``timeout``; any failure leaves it unknown.

        Through the client's own HTTP session, since ``ollama.Client.show`` takes no per-call timeout
        and the call's deadline bounds this read (no breaker effect either way).
        """
        self.peeked = True
        with contextlib.suppress(Exception):
            shown = self._native._client.post("/api/show", json={"model": self.model}, timeout=timeout)
            self.peeked_max_model_len = _context_length(shown.json())

    async def apeek_context_window(self, timeout: float) -> None:
        self.peeked = True
        with contextlib.suppress(Exception):
            client = self._anative.get()._client
            shown = await asyncio.wait_for(client.post("/api/show", json={"model": self.model}), timeout)
            self.peeked_max_model_len = _context_length(shown.json())

    def _probe_models(self) -> list[Listed]:
        return self._list(self.probe_timeout)

    async def _aprobe_models(self) -> list[Listed]:
        return await self._alist(self.probe_timeout)

    def _list(self, timeout: float) -> list[Listed]:
        """The pulled models (``/api/tags``; the native client's own timeout applies)."""
        try:
            return [Listed(str(m.model)) for m in self._native.list().models]
        except Exception as exc:
            raise self._error(exc) from exc

    async def _alist(self, timeout: float) -> list[Listed]:
        try:
            return [Listed(str(m.model)) for m in (await self._anative.get().list()).models]
        except Exception as exc:
            raise self._error(exc) from exc

    def unknown_model_fix(self, name: str) -> str | None:
        return f"on an Ollama host: `ollama pull {name}`"

    def _listed_names(self, names: Iterable[str]) -> Iterable[str]:
        """A tag answers to its name without ``:latest`` too (``llama3`` is ``llama3:latest``)."""
        for name in names:
            yield name
            if name.endswith(":latest"):
                yield name.removesuffix(":latest")

    def close(self) -> None:
        self._native._client.close()

    async def aclose(self) -> None:
        await self._anative.aclose()

    def release(self) -> None:
        super().release()
        self._anative.close_all()

    def serves(self, models: list[str]) -> bool:
        return self.model in models or f"{self.model}:latest" in models

    # --- conversions ---------------------------------------------------------------------------------

    def _request(self, body: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
        """The router's OpenAI-shaped body as ``ollama.Client.chat`` keywords."""
        extra = dict(body.get("extra_body") or {})
        options = {**self.options, **extra.pop("options", {})}
        for name, option in OPTION_NAMES.items():
            value = body.get(name, extra.get(name))
            if value is not None:
                options[option] = value
        request: dict[str, Any] = {"model": body["model"], "messages": _messages(body["messages"]), "stream": stream}
        if options:
            request["options"] = options
        if (keep_alive := extra.get("keep_alive", self.keep_alive)) is not None:
            request["keep_alive"] = keep_alive
        fmt = _format(body.get("response_format"), extra.get("structured_outputs"))
        if fmt is not None:
            request["format"] = fmt
        if body.get("tools"):
            request["tools"] = body["tools"]
        if "think" in extra:
            request["think"] = extra["think"]
        return request

    def _embed_request(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The router's ``embeddings.create`` body as ``ollama.Client.embed`` keywords."""
        extra = dict(body.get("extra_body") or {})
        options = {**self.options, **extra.pop("options", {})}
        request: dict[str, Any] = {"model": body["model"], "input": body["input"]}
        # Ollama's own default is to truncate silently; here only a call that asked for it truncates
        request["truncate"] = "truncate_prompt_tokens" in extra
        if options:
            request["options"] = options
        if (keep_alive := extra.get("keep_alive", self.keep_alive)) is not None:
            request["keep_alive"] = keep_alive
        if body.get("dimensions") is not None:
            request["dimensions"] = body["dimensions"]
        return request

    def _embeddings(self, answer: Any, body: Mapping[str, Any]) -> CreateEmbeddingResponse:
        """Ollama's ``{"embeddings": [[...]]}`` as the openai SDK's response, checked like any route's."""
        vectors = getattr(answer, "embeddings", None)
        if not isinstance(vectors, list):
            raise ValueError(f"expected embeddings, got {str(answer)[:200]!r}")
        base64_wanted = body.get("encoding_format") == "base64"
        data = [
            Embedding.model_construct(index=i, object="embedding", embedding=_base64(v) if base64_wanted else v)
            for i, v in enumerate(vectors)
        ]  # constructed, not validated, as the openai SDK does: base64 text is not a list of floats
        tokens = answer.prompt_eval_count or 0
        response = CreateEmbeddingResponse.model_construct(
            object="list", model=answer.model or self.model, data=data,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )  # fmt: skip
        return checked_embeddings(response, len(body["input"]), self.model)

    def _completion(self, response: Any) -> ChatCompletion:
        message = response.message
        calls = _tool_calls(message)
        data = {
            "id": f"ollama-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": response.model or self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": message.content or "", "reasoning": message.thinking,
                            "tool_calls": calls or None},
                "finish_reason": "tool_calls" if calls else _finish(response.done_reason),
            }],
            "usage": _usage(response),
        }  # fmt: skip
        return ChatCompletion.model_validate(data)

    def _chunks(self, part: Any, cid: str, include_usage: bool) -> Iterator[ChatCompletionChunk]:
        message = part.message
        delta: dict[str, Any] = {"content": message.content or ""}
        if message.thinking:
            delta["reasoning"] = message.thinking
        if calls := _tool_calls(message):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        finish = ("tool_calls" if calls else _finish(part.done_reason)) if part.done else None
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": part.model or self.model,
        }
        yield ChatCompletionChunk.model_validate(
            {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        )
        if part.done and include_usage:
            yield ChatCompletionChunk.model_validate({**base, "choices": [], "usage": _usage(part)})

    def _error(self, exc: BaseException) -> RouteError:
        """Ollama client and httpx exceptions as the router's typed errors."""
        where: dict[str, Any] = {"route": self.name, "url": self.base_url}
        if isinstance(exc, RouteError):
            return exc
        if isinstance(exc, self._ollama.ResponseError):
            if exc.status_code < 0:  # an {"error": ...} line inside a 200 stream
                return TransientRouteError(
                    f"error in stream: {exc.error}", hint="server-side error", error_class="error_event", **where
                )
            return status_error(
                exc.status_code, exc.error, model=self.model, not_found_hint=self.missing_model_hint, **where
            )
        name = type(exc).__name__
        if isinstance(exc, ValueError | TypeError | KeyError):  # JSON or pydantic: the answer was not Ollama's
            return classify(exc, route=self.name, url=self.base_url, model=self.model, timeout=self.timeout)
        if isinstance(exc, ConnectionError) or name == "ConnectError":  # the client wraps it, except in streams
            return TransientRouteError(
                "cannot connect",
                hint=f"is `ollama serve` running at {self.base_url}?",
                error_class="connect_error",
                **where,
            )
        if "Timeout" in name:
            return TransientRouteError(
                f"timed out after {self.timeout}s",
                hint="raise this route's `timeout`",
                error_class="timeout",
                **where,
            )
        return TransientRouteError(
            f"connection dropped: {name}: {exc}",
            hint="check the Ollama server's log",
            error_class="connection_dropped",
            **where,
        )


class _Stream:
    def __init__(self, route: OllamaRoute, parts: Any, include_usage: bool) -> None:
        self._route, self._parts, self._usage = route, parts, include_usage
        self._id = f"ollama-{uuid.uuid4().hex}"

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        try:
            for part in self._parts:
                yield from self._route._chunks(part, self._id, self._usage)
        except Exception as exc:
            raise self._route._error(exc) from exc

    def close(self) -> None:
        self._parts.close()


class _AsyncStream:
    def __init__(self, route: OllamaRoute, parts: Any, include_usage: bool) -> None:
        self._route, self._parts, self._usage = route, parts, include_usage
        self._id = f"ollama-{uuid.uuid4().hex}"

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for part in self._parts:
                for chunk in self._route._chunks(part, self._id, self._usage):
                    yield chunk
        except Exception as exc:
            raise self._route._error(exc) from exc

    async def close(self) -> None:
        await self._parts.aclose()


def _wants_usage(body: Mapping[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama's: text content, tool calls with object arguments."""
    out = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        item: dict[str, Any] = {"role": message["role"], "content": content}
        if message.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"] or "{}"),
                    }
                }
                for c in message["tool_calls"]
            ]
        out.append(item)
    return out


def _format(response_format: Any, structured: Any) -> Any:
    if isinstance(structured, Mapping) and "json" in structured:
        return structured["json"]
    if isinstance(response_format, Mapping):
        if response_format.get("type") == "json_object":
            return "json"
        if response_format.get("type") == "json_schema":
            return (response_format.get("json_schema") or {}).get("schema")
    return None


def _tool_calls(message: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
         "function": {"name": call.function.name, "arguments": json.dumps(dict(call.function.arguments or {}))}}
        for call in message.tool_calls or []
    ]  # fmt: skip


def _base64(vector: Any) -> Any:
    """A vector as vLLM's ``encoding_format="base64"`` sends it (little-endian float32); left as is if malformed."""
    try:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    except (TypeError, struct.error):
        return vector


def _context_length(shown: Any) -> int | None:
    """``/api/show``'s ``model_info["<family>.context_length"]``, or None."""
    info = shown.get("model_info") if isinstance(shown, dict) else None
    if not isinstance(info, dict):
        return None
    lengths = [v for k, v in info.items() if k.endswith(".context_length") and type(v) is int and v > 0]
    return lengths[0] if lengths else None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(response: Any) -> dict[str, int]:
    prompt, completion = response.prompt_eval_count or 0, response.eval_count or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

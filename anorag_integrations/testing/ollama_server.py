"""An Ollama-shaped server (its native API) with the same run-time faults as ``FaultServer``.

Ollama cannot be installed here, so this follows its documented API: ``POST /api/chat`` streams
newline-delimited JSON unless ``"stream": false``, options in ``options`` (``num_predict``,
``num_ctx``, ...), token counts ``prompt_eval_count``/``eval_count``, durations in nanoseconds,
``GET /api/tags`` lists models as ``name:tag``, errors are ``{"error": "..."}``. ``POST /api/embed``
answers ``{"embeddings": [[...]], "prompt_eval_count": n}`` with the same vectors as ``FaultServer``'s
``/v1/embeddings``; ``truncate`` defaults to true, and with ``"truncate": false`` an input past the
context window is Ollama's 400 "the input length exceeds the context length". ``POST /api/show``
gives the window as ``model_info["bert.context_length"]`` when ``max_model_len`` is set.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from . import embeddings
from .fault_server import FaultServer
from .faults import Fault, FaultState
from .wire import drop_connection

OVERFLOW = "the input length exceeds the context length"
"""Ollama's error when ``/api/embed`` gets an input past the window with ``"truncate": false``."""


class OllamaFaultServer(FaultServer):
    def __init__(self, model: str = "llama3.2", **kwargs: Any) -> None:
        super().__init__(model if ":" in model else f"{model}:latest", **kwargs)

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._api_version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._api_chat)
        app.router.add_post("/api/embed", self._api_embed)
        app.router.add_post("/api/show", self._api_show)

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _api_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def _tags(self, request: web.Request) -> web.Response:
        details = {"format": "gguf", "family": "llama", "parameter_size": "3.2B"}
        model = {"name": self.model, "model": self.model, "modified_at": "2026-01-01T00:00:00Z", "details": details}
        return web.json_response({"models": [model]})

    def _serves(self, name: str) -> bool:
        return name == self.model or f"{name}:latest" == self.model

    async def _api_show(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self._serves(str(body.get("model"))):
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        info = {"general.architecture": "bert"}
        if self.max_model_len is not None:
            info["bert.context_length"] = self.max_model_len  # type: ignore[assignment]
        return web.json_response({"modelfile": "", "details": {"family": "bert"}, "model_info": info})

    async def _preamble(self, body: dict[str, Any], state: FaultState) -> web.Response | None:
        """The answer a fault or an unknown model gives before any work, or None to go on."""
        opts = state.options
        if state.fault is Fault.STATUS:
            return web.json_response({"error": opts.get("message", "injected failure")}, status=opts.get("status", 500))
        if state.fault is Fault.HANG:
            assert self._release is not None
            await self._release.wait()
            return web.json_response({"error": "hang released"}, status=503)
        if state.fault is Fault.DELAY:
            await asyncio.sleep(float(opts.get("delay", 1.0)))
        if not self._serves(str(body.get("model"))):
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        return None

    async def _api_embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        state = self._received(request, body)
        if (early := await self._preamble(body, state)) is not None:
            return early
        texts = embeddings.inputs(body)
        if not texts:
            return web.json_response({"error": "invalid input type"}, status=400)
        limit = self.max_model_len
        too_long = limit is not None and any(embeddings.token_count(text) > limit for text in texts)
        if too_long and body.get("truncate", True) is False:
            return web.json_response({"error": OVERFLOW}, status=400)
        truncate = -1 if limit is not None else None
        document = embeddings.response(self.model, texts, {"truncate_prompt_tokens": truncate}, limit,
                                       int(body.get("dimensions") or self.embedding_dimensions))  # fmt: skip
        if state.fault is Fault.CUT:
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        vectors = [item["embedding"] for item in document["data"]]
        tokens = document["usage"]["prompt_tokens"]
        return web.json_response({"model": self.model, "embeddings": vectors, "total_duration": 5_000_000,
                                  "load_duration": 1_000_000, "prompt_eval_count": tokens})  # fmt: skip

    async def _api_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state = self._received(request, body)
        opts = state.options
        if (early := await self._preamble(body, state)) is not None:
            return early
        words, reason = self._words({"max_tokens": (body.get("options") or {}).get("num_predict")})
        stats = {"total_duration": 5_000_000, "load_duration": 1_000_000, "prompt_eval_count": 7,
                 "prompt_eval_duration": 1_000_000, "eval_count": len(words), "eval_duration": 3_000_000}  # fmt: skip
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if body.get("stream", True) is False:
            if state.fault is Fault.CUT:
                drop_connection(request)
                return web.Response(status=500)
            message = {"role": "assistant", "content": "".join(words)}
            if self.reasoning:
                message["thinking"] = self.reasoning
            return web.json_response({"model": self.model, "created_at": created, "message": message, "done": True,
                                      "done_reason": reason, **stats})  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        after = int(opts.get("after_chunks", len(words) // 2))
        for i, word in enumerate(words):
            if i == after and state.fault is Fault.CUT:
                drop_connection(request)
                return response
            part = {
                "model": self.model,
                "created_at": created,
                "message": {"role": "assistant", "content": word},
                "done": False,
            }
            await response.write((json.dumps(part) + "\n").encode())
        final = {"model": self.model, "created_at": created, "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": reason, **stats}  # fmt: skip
        await response.write((json.dumps(final) + "\n").encode())
        await response.write_eof()
        return response

"""An Ollama-shaped server (its native API) with the same run-time faults as ``FaultServer``.

Ollama cannot be installed here, so this follows its documented API: ``POST /api/chat`` streams
newline-delimited JSON unless ``"stream": false``, options in ``options`` (``num_predict``,
``num_ctx``, ...), token counts ``prompt_eval_count``/``eval_count``, durations in nanoseconds,
``GET /api/tags`` lists models as ``name:tag``, errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from .fault_server import Fault, FaultServer, drop_connection


class OllamaFaultServer(FaultServer):
    def __init__(self, model: str = "llama3.2", **kwargs: Any) -> None:
        super().__init__(model if ":" in model else f"{model}:latest", **kwargs)

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._api_version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._api_chat)

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

    async def _api_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state = self._received(request, body)
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

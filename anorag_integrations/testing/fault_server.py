"""A vLLM-shaped OpenAI-compatible server on loopback whose failures are switched at run time.

Real servers cannot be made to time out, answer 503 or cut a stream on demand; this one can. It
speaks vLLM's protocol where it matters to a client (``/health``, ``/v1/models`` with
``max_model_len``, ``/metrics`` names, error bodies, ``stop_reason``, usage in streams only with
``stream_options.include_usage``) and answers with a fixed text, one word per stream chunk; on
``/v1/embeddings`` it answers a deterministic vector per input (``embeddings.py``). Like vLLM it can
serve one model under several names and hold LoRA adapters, listed and answered as vLLM does, loaded
and unloaded at run time through vLLM's endpoints (``served.py``)::

    with FaultServer(model="m") as server:            # runs in a background thread
        server.set_fault(Fault.STATUS, status=503, times=2)
        ...  # point a route at server.base_url

    FaultServer("m", served_names=["m", "m-alias"], adapters={"sql": "m"}, runtime_lora=True)

This module holds the endpoints and the request pipeline (counted, queued, faulted, answered); the
server is built in layers, each its own module: ``loop_server`` (its thread and loop), ``control``
(settings, counters, the fault switch), ``replies`` (plain answers), ``streams`` (streamed answers).
The faults are in ``faults``, vLLM's error bodies and token counts in ``wire``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import embeddings, malformed, served
from .control import priority_refused
from .embeddings import overflow_message
from .faults import DELAY_S, Fault, FaultState
from .streams import Streams
from .wire import NOT_COMPATIBLE, Dropped, drop_connection, error, schema_instance, usage

__all__ = ["Fault", "FaultServer", "FaultState", "drop_connection", "schema_instance"]

_Reply = Callable[[web.Request, dict[str, Any], FaultState], Awaitable[web.StreamResponse]]
"""What answers a chat or embeddings request that no fault answered first."""

METRIC_NAMES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    "vllm_old": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc"),
    "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}
"""(running, waiting, KV-cache use) as each server names them; llama.cpp has no KV gauge."""


class FaultServer(Streams):
    """The server; ``hits`` counts chat and embeddings requests, ``requests`` keeps their bodies (newest last)
    and ``request_models`` the model each named.

    ``last_authorization`` is the last ``Authorization`` header received, so tests can check a key
    reached the server while staying out of logs and errors. ``traceparents`` holds the W3C
    ``traceparent`` header of each kept request (None when it had none), in step with ``requests``.
    Its settings and the fault switch are described in ``control.ServerControl``.
    """

    def _add_routes(self, app: web.Application) -> None:
        """The endpoints this server speaks (vLLM's); a server for another API overrides this."""
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora_adapter)

    # --- what the server is: health, version, metrics, models ---------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if not self.health_endpoint:
            raise web.HTTPNotFound()
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-fault-server"})

    async def _metrics(self, request: web.Request) -> web.Response:
        names = METRIC_NAMES.get(self.metrics or "")
        if names is None:
            raise web.HTTPNotFound()
        label = f'{{engine="0",model_name="{self.model}"}}' if self.metrics != "llamacpp" else ""
        values = (self.running, self.waiting, self.kv_usage)
        text = "".join(
            f"# TYPE {name} gauge\n{name}{label} {value}\n" for name, value in zip(names, values, strict=False)
        )
        if self.metrics == "vllm":  # automatic prefix caching, in prompt tokens (a prompt seen before is a hit)
            for name, value in (("queries", self.prefix_queries), ("hits", self.prefix_hits)):
                text += (
                    f"# TYPE vllm:prefix_cache_{name}_total counter\nvllm:prefix_cache_{name}_total{label} {value}\n"
                )
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        """Each served name (``max_model_len``: the window), then each adapter (``max_model_len``: null)."""
        if self._models_fault is not None:
            return malformed.models_answer(self._models_fault)
        created = int(time.time())
        window = self.reported_max_model_len if self.reported_max_model_len is not None else self.max_model_len
        data = []
        for name in self.served_names:
            card = served.model_card(name, root=self.model_root, parent=None, created=created)
            if window is not None:  # servers other than vLLM may not report it
                card["max_model_len"] = window
            data.append(card)
        with self._lock:
            adapters = list(self._adapters.items())
        for name, adapter in adapters:
            card = served.model_card(name, root=adapter.root, parent=adapter.parent, created=created)
            data.append({**card, "max_model_len": None})
        return web.json_response({"object": "list", "data": data})

    # --- runtime LoRA adapters: vLLM's endpoints with VLLM_ALLOW_RUNTIME_LORA_UPDATING -----------------

    async def _load_lora_adapter(self, request: web.Request) -> web.Response:
        if not self.runtime_lora:
            return web.json_response(served.NOT_ROUTED, status=404)
        raw = await request.read()
        with self._lock:  # no await from here to the change: two loads of one name cannot both succeed
            held = dict(self._adapters)
        response, loaded = served.load_adapter(raw, request.content_type, self.served_names, held)
        if loaded is not None:
            name, adapter = loaded
            self.add_adapter(name, adapter.parent, root=adapter.root)
        return response

    async def _unload_lora_adapter(self, request: web.Request) -> web.Response:
        if not self.runtime_lora:
            return web.json_response(served.NOT_ROUTED, status=404)
        raw = await request.read()
        with self._lock:
            held = dict(self._adapters)
        response, name = served.unload_adapter(raw, request.content_type, held)
        if name is not None:
            self.remove_adapter(name)
        return response

    # --- the requests faults apply to: chat and embeddings ------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._chat_reply)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._embedding_reply, pooling=True)

    async def _handle(self, request: web.Request, reply: _Reply, *, pooling: bool = False) -> web.StreamResponse:
        """A chat or embeddings request: counted, queued (``max_running``), faulted, else ``reply``.

        A client that disconnects aborts the request where it is, waiting or running (the app cancels its
        handler, as vLLM aborts it): its slot and the ``waiting``/``running`` counts come back at once.
        """
        body = await request.json()
        state = self._received(request, body)
        opts = state.options
        priority = body.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            return error(400, f"priority: Input should be a valid integer, got {priority!r}", param="priority")
        if priority != 0 and self.scheduling != "priority":
            return error(400, priority_refused(priority))
        if self._slots is not None:
            self.waiting += 1
            try:
                await self._slots.acquire(priority)
            finally:
                self.waiting -= 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if state.fault is Fault.STATUS:
                return error(opts.get("status", 500), opts.get("message", "injected failure"), opts.get("retry_after"))
            if state.fault is Fault.HANG or (state.fault is Fault.STALL and not body.get("stream")):
                assert self._release is not None
                await self._release.wait()
                return error(503, "hang released")
            if state.fault is Fault.HTML:
                return malformed.html_page(int(opts.get("status", 200)))
            if state.fault is Fault.DELAY or (state.fault is Fault.SLOW_FIRST_TOKEN and not body.get("stream")):
                await asyncio.sleep(float(opts.get("delay", DELAY_S)))
            if not self.serves(body.get("model")):  # vLLM's pooling server words its 404 differently
                return served.not_found(body.get("model"), self.served_names, pooling=pooling)
            return await reply(request, body, state)
        except Dropped as dropped:
            return dropped.response  # aiohttp finds the connection closed and ends the request quietly
        finally:
            self.running -= 1
            if self._slots is not None:
                self._slots.release()

    async def _chat_reply(self, request: web.Request, body: dict[str, Any], state: FaultState) -> web.StreamResponse:
        prompt_tokens = usage(body, 0)["prompt_tokens"]
        if self.max_model_len is not None and prompt_tokens > self.max_model_len:
            return error(400, overflow_message(self.max_model_len, prompt_tokens), param="input_tokens")
        if state.fault is Fault.CUT and not body.get("stream"):
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            return error(400, NOT_COMPATIBLE)
        if body.get("tools") and body.get("tool_choice", "auto") == "auto" and not self.auto_tool_choice:
            message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            return error(400, message)
        if body.get("stream") and state.fault is not Fault.UNSTREAMED:
            return await self._stream(request, body, state)
        return await self._answer(request, self._completion(body), state, listing="choices")

    async def _embedding_reply(
        self, request: web.Request, body: dict[str, Any], state: FaultState
    ) -> web.StreamResponse:
        """``/v1/embeddings`` as vLLM's pooling server answers it (``embeddings.py``); a CUT drops the connection."""
        texts = embeddings.inputs(body)
        if texts is None:
            return error(400, "input must be a string or a list of strings (token ids are not emulated)")
        if (found := embeddings.problem(texts, body, self.max_model_len)) is not None:
            message, param = found
            return error(400, message, param=param)
        if state.fault is Fault.CUT:
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        document = embeddings.response(
            self.answered_as(body), texts, body, self.max_model_len, self.embedding_dimensions
        )
        return await self._answer(request, document, state, listing="data")

"""A vLLM-shaped OpenAI-compatible server on loopback whose failures are switched at run time.

Real servers cannot be made to time out, answer 503 or cut a stream on demand; this one can. It
speaks vLLM's protocol where it matters to a client (``/health``, ``/v1/models`` with
``max_model_len``, ``/metrics`` names, error bodies, ``stop_reason``, usage in streams only with
``stream_options.include_usage``) and answers with a fixed text, one word per stream chunk; on
``/v1/embeddings`` it answers a deterministic vector per input (``embeddings.py``)::

    with FaultServer(model="m") as server:            # runs in a background thread
        server.set_fault(Fault.STATUS, status=503, times=2)
        ...  # point a route at server.base_url
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web

from . import embeddings, malformed
from .embeddings import overflow_message
from .malformed import MODELS_FAULTS, Write


class Fault(StrEnum):
    """What chat and embeddings requests get (``set_fault``); ``FaultServer.models_fault`` breaks ``GET /v1/models``.

    On ``/v1/embeddings`` the stream-only faults (ERROR_EVENT, SSE_NOISE) change nothing, STALL hangs,
    NO_CHOICES answers ``"data": []`` and CUT drops the connection before answering.

    From HTML on, the malformed answers a hostile server or a broken proxy sends: HTTP 200 (unless
    said) whose content a client must cope with or fail cleanly on (``malformed`` builds them).
    """

    NONE = "none"
    # Answer with an HTTP error status (options: status, retry_after, message). The Retry-After header
    # is sent as str(retry_after), as given: 3600, "inf", "nan", "-5", an HTTP date, any garbage (but
    # control characters other than tab, which aiohttp refuses to send: set_fault raises ValueError).
    STATUS = "status"
    HANG = "hang"  # accept the request and never answer (until the fault is cleared or the server stops)
    REFUSE = "refuse"  # stop listening: connections are refused
    CUT = "cut"  # close the connection mid-response (streams: after `after_chunks` content chunks)
    ERROR_EVENT = "error_event"  # HTTP 200 stream with `data: {"error": ...}` after `after_chunks` chunks
    SLOW_FIRST_TOKEN = "slow_first_token"  # wait `delay` seconds before the first chunk / the response
    DELAY = "delay"  # wait `delay` seconds before answering every request (a slow but healthy server)
    # A captive portal's / load balancer's page: `text/html`, status `status` (default 200), for plain
    # and stream requests alike, before the request is checked (a proxy answers, not the server).
    HTML = "html"
    # Plain: `application/json`, the completion's first `keep` bytes (default half), then the connection
    # is closed (Content-Length matches, Connection: close). Stream: `after_chunks` content chunks
    # (default half), then a `data: {...` event whose JSON is cut to `keep` bytes, then the end (no [DONE]).
    TRUNCATED_JSON = "truncated_json"
    # Plain: `application/json` whose body is `body` (default `{"id": garbage, not json`). Stream: the
    # stream is whole but a `data: <body>` event comes after `after_chunks` content chunks (default half).
    INVALID_JSON = "invalid_json"
    # Plain: `application/json` whose body is `value` as JSON (default "ok": `"ok"`; None sends `null`).
    # Stream: `count` (default 3) events `data: "ok"` and then `data: [DONE]`, nothing else.
    STRING_BODY = "string_body"
    # Plain: a well-formed completion with `"choices": []`. Stream: every chunk has `"choices": []` (so
    # never a finish_reason), usage when asked, then `data: [DONE]`.
    NO_CHOICES = "no_choices"
    # Stream: `: comment`, `retry: 100`, `id: 7`, `event: ping` and `data: {}` blocks (all before the
    # first chunk, then one before each), among the normal chunks. `complete=False`: the stream ends
    # cleanly after `after_chunks` content chunks (default half) and noise, without finish_reason or
    # [DONE]. Plain requests are answered normally.
    SSE_NOISE = "sse_noise"
    # The normal answer (plain or stream), its body sent one byte at a time, `interval` seconds apart
    # (default 0.2), headers at once: no read times out, the whole takes long. Clearing (or changing)
    # the fault sends the rest at once; stopping the server drops the connection at once.
    TRICKLE = "trickle"
    # Stream: `after_chunks` content chunks (default half), then nothing at all, the connection kept open,
    # until the fault is cleared (the rest follows) or the server stops. Plain requests: as HANG.
    STALL = "stall"


class _Dropped(Exception):
    """The connection is gone mid-response (the client left or the server stops): end the handler quietly."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("connection dropped")
        self.response = response


@dataclass
class _FaultState:
    fault: Fault = Fault.NONE
    remaining: int | None = None  # how many more requests it applies to; None = until cleared
    options: dict[str, Any] = field(default_factory=dict)


_Reply = Callable[[web.Request, dict[str, Any], _FaultState], Awaitable[web.StreamResponse]]
"""What answers a chat or embeddings request that no fault answered first."""

_PERMISSION = {
    "id": "modelperm-0",
    "object": "model_permission",
    "created": 0,
    "allow_create_engine": False,
    "allow_sampling": True,
    "allow_logprobs": True,
    "allow_search_indices": False,
    "allow_view": True,
    "allow_fine_tuning": False,
    "organization": "*",
    "group": None,
    "is_blocking": False,
}
"""The model permission vLLM lists with every served model (its /v1/models, 0.32)."""


class FaultServer:
    """The server; ``hits`` counts chat and embeddings requests, ``requests`` keeps their bodies (newest last).

    ``last_authorization`` is the last ``Authorization`` header received, so tests can check a key
    reached the server while staying out of logs and errors. ``traceparents`` holds the W3C
    ``traceparent`` header of each kept request (None when it had none), in step with ``requests``.
    """

    def __init__(
        self,
        model: str = "fake-model",
        *,
        reply: str = "The quick brown fox jumps over the lazy dog.",
        max_model_len: int | None = 4096,
        host: str = "127.0.0.1",
        port: int = 0,
        health_endpoint: bool = True,
        auto_tool_choice: bool = True,
        keep_requests: int = 1000,
        max_running: int | None = None,
        metrics: str | None = "vllm",
    ) -> None:
        self.model = model
        self.reply = reply
        self.max_model_len = max_model_len
        self.host = host
        self.port = port
        self.health_endpoint = health_endpoint
        self.auto_tool_choice = auto_tool_choice
        """As vLLM's --enable-auto-tool-choice: without it, tool_choice="auto" gets a 400."""
        self.reasoning: str | None = None
        """Reasoning text sent before the answer (vLLM's reasoning parser), in ``reasoning_field``."""
        self.reasoning_field = "reasoning"
        self.tool_arguments: Any = {}
        """Arguments of the tool call the server makes when the request offers tools (any JSON value:
        a small model can write ``[1, 2]`` where the schema wants an object)."""
        self.max_running = max_running
        """As vLLM's --max-num-seqs: requests beyond it wait (``num_requests_waiting``); None: no limit."""
        self.metrics = metrics
        """Metric names ``/metrics`` uses: "vllm", "vllm_old" (gpu_cache_usage_perc), "llamacpp"; None: 404."""
        self.kv_usage = 0.0
        """What ``/metrics`` reports as KV-cache use (0-1)."""
        self.latency = 0.0
        """Seconds every answer takes (a healthy server's service time), before any fault's delay."""
        self._models_fault: str | None = None
        self.hits = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._prompts: set[int] = set()
        self.structured_outputs = True
        """As vLLM's grammar backend: answers follow ``structured_outputs.json`` (False: ignored, as a server
        without one would)."""
        self.running = 0
        self.most_running = 0
        """The most requests this server has had running at once (``max_running`` bounds it)."""
        self.waiting = 0
        self.embedding_dimensions = embeddings.DIMENSIONS
        """Length of the vectors ``/v1/embeddings`` answers (see ``embeddings.fake_vector``)."""
        self._slots: asyncio.Semaphore | None = None
        self.requests: list[dict[str, Any]] = []
        self.last_authorization: str | None = None
        self.traceparents: list[str | None] = []
        self._keep = keep_requests
        self._state = _FaultState()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._release: asyncio.Event | None = None
        self._stopping = False

    # --- control, from any thread ------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def models_fault(self) -> str | None:
        """How ``GET /v1/models`` is malformed (None: it answers normally); chat requests don't change it.

        All HTTP 200: "html" (a ``text/html`` page), "null" (``null``), "invalid" (not JSON), "string"
        (``"x"``), "no_data" (``{"object": "list"}``, no ``data``).
        """
        return self._models_fault

    @models_fault.setter
    def models_fault(self, kind: str | None) -> None:
        if kind is not None and kind not in MODELS_FAULTS:
            raise ValueError(f"models_fault must be None or one of {', '.join(MODELS_FAULTS)}, not {kind!r}")
        self._models_fault = kind

    def set_fault(self, fault: Fault | str | None, *, times: int | None = None, **options: Any) -> None:
        """Switch the fault for the next ``times`` chat requests (all when None); None clears it.

        ``every=N`` among the options applies it to every Nth chat request only (an occasional fault).
        """
        fault = Fault(fault or Fault.NONE)
        if fault is Fault.STATUS and options.get("retry_after") is not None:
            _header_value(options["retry_after"])  # fail here, not as a dropped connection later
        previous = self._state.fault
        with self._lock:
            self._state = _FaultState(fault, times, options)
        if previous in (Fault.HANG, Fault.TRICKLE, Fault.STALL) and fault is not previous:
            self._call(self._wake_hung())  # hung requests answer, trickling ones send the rest at once
        if fault is Fault.REFUSE and previous is not Fault.REFUSE:
            self._call(self._stop_listening())
        elif previous is Fault.REFUSE and fault is not Fault.REFUSE:
            self._call(self._listen())

    def start(self) -> FaultServer:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name=f"fault-server-{self.model}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the event loop thread -----------------------------------------------------------------------

    def _call(self, coro: Any) -> None:
        assert self._loop is not None, "server not started"
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._release = asyncio.Event()
        self._stopping = False
        if self.max_running is not None:
            self._slots = asyncio.Semaphore(self.max_running)
        app = web.Application()
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(self._listen())
        ready.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # handlers still sleeping or hung at shutdown
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    def _add_routes(self, app: web.Application) -> None:
        """The endpoints this server speaks (vLLM's); a server for another API overrides this."""
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _stop_listening(self) -> None:
        """Stop accepting and drop kept-alive connections, as a dead process would."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        for handler in list(server.connections if server is not None else ()):
            handler.force_close()

    async def _wake_hung(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    async def _shutdown(self) -> None:
        self._stopping = True  # trickling handlers drop their connection instead of finishing
        await self._wake_hung()
        if self._runner is not None:
            await self._runner.cleanup()

    def _received(self, request: web.Request, body: dict[str, Any]) -> _FaultState:
        """Count and keep a chat request; the fault that applies to it."""
        self.hits += 1
        if "messages" in body:
            self._count_prefix(body)
        self.last_authorization = request.headers.get("Authorization")
        self.requests.append(body)
        del self.requests[: -self._keep]
        self.traceparents.append(request.headers.get("traceparent"))
        del self.traceparents[: -self._keep]
        return self._take_fault()

    def _count_prefix(self, body: Mapping[str, Any]) -> None:
        """vLLM's prefix-cache counters, roughly: a prompt seen before is all hits."""
        tokens = _usage(body, 0)["prompt_tokens"]
        key = hash(json.dumps(body.get("messages"), sort_keys=True, default=str))
        self.prefix_queries += tokens
        if key in self._prompts:
            self.prefix_hits += tokens
        elif len(self._prompts) < 10_000:
            self._prompts.add(key)

    def _take_fault(self) -> _FaultState:
        with self._lock:
            state = self._state
            every = int(state.options.get("every", 1))
            if every > 1 and self.hits % every:
                return _FaultState()
            if state.remaining is None:
                return state
            if state.remaining <= 0:
                return _FaultState()
            state.remaining -= 1
            return _FaultState(state.fault, None, state.options)

    # --- endpoints -----------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if not self.health_endpoint:
            raise web.HTTPNotFound()
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-fault-server"})

    async def _metrics(self, request: web.Request) -> web.Response:
        names = _METRIC_NAMES.get(self.metrics or "")
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
        if self._models_fault is not None:
            return malformed.models_answer(self._models_fault)
        model = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "permission": [_PERMISSION],
        }
        if self.max_model_len is not None:  # servers other than vLLM may not report it
            model["max_model_len"] = self.max_model_len
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._chat_reply)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._embedding_reply)

    async def _handle(self, request: web.Request, reply: _Reply) -> web.StreamResponse:
        """A chat or embeddings request: counted, queued (``max_running``), faulted, else ``reply``."""
        body = await request.json()
        state = self._received(request, body)
        opts = state.options
        if self._slots is not None:
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if state.fault is Fault.STATUS:
                return _error(opts.get("status", 500), opts.get("message", "injected failure"), opts.get("retry_after"))
            if state.fault is Fault.HANG or (state.fault is Fault.STALL and not body.get("stream")):
                assert self._release is not None
                await self._release.wait()
                return _error(503, "hang released")
            if state.fault is Fault.HTML:
                return malformed.html_page(int(opts.get("status", 200)))
            if state.fault is Fault.DELAY or (state.fault is Fault.SLOW_FIRST_TOKEN and not body.get("stream")):
                await asyncio.sleep(float(opts.get("delay", 1.0)))
            if body.get("model") != self.model:
                message = f"The model `{body.get('model')}` does not exist. Valid aliases: {self.model}."
                return _error(404, message, err_type="NotFoundError", param="model")
            return await reply(request, body, state)
        except _Dropped as dropped:
            return dropped.response  # aiohttp finds the connection closed and ends the request quietly
        finally:
            self.running -= 1
            if self._slots is not None:
                self._slots.release()

    async def _chat_reply(self, request: web.Request, body: dict[str, Any], state: _FaultState) -> web.StreamResponse:
        prompt_tokens = _usage(body, 0)["prompt_tokens"]
        if self.max_model_len is not None and prompt_tokens > self.max_model_len:
            return _error(400, overflow_message(self.max_model_len, prompt_tokens), param="input_tokens")
        if state.fault is Fault.CUT and not body.get("stream"):
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            return _error(400, _NOT_COMPATIBLE)
        if body.get("tools") and body.get("tool_choice", "auto") == "auto" and not self.auto_tool_choice:
            message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            return _error(400, message)
        if body.get("stream"):
            return await self._stream(request, body, state)
        return await self._answer(request, self._completion(body), state, listing="choices")

    async def _embedding_reply(
        self, request: web.Request, body: dict[str, Any], state: _FaultState
    ) -> web.StreamResponse:
        """``/v1/embeddings`` as vLLM's pooling server answers it (``embeddings.py``); a CUT drops the connection."""
        texts = embeddings.inputs(body)
        if texts is None:
            return _error(400, "input must be a string or a list of strings (token ids are not emulated)")
        if (found := embeddings.problem(texts, body, self.max_model_len)) is not None:
            message, param = found
            return _error(400, message, param=param)
        if state.fault is Fault.CUT:
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        document = embeddings.response(self.model, texts, body, self.max_model_len, self.embedding_dimensions)
        return await self._answer(request, document, state, listing="data")

    async def _answer(
        self, request: web.Request, document: dict[str, Any], state: _FaultState, *, listing: str
    ) -> web.StreamResponse:
        """The answer to a plain (not stream) request, ``document`` as the fault makes it.

        ``listing`` names the document's list of results (``choices``, ``data``), empty under NO_CHOICES.
        """
        opts = state.options
        if state.fault is Fault.NO_CHOICES:
            document[listing] = []
        if state.fault is Fault.INVALID_JSON:
            return malformed.json_text(str(opts.get("body", malformed.INVALID_JSON)))
        if state.fault is Fault.STRING_BODY:
            return malformed.json_text(json.dumps(opts.get("value", "ok")))
        data = json.dumps(document).encode()
        if state.fault is Fault.TRUNCATED_JSON:
            keep = opts.get("keep")
            return malformed.json_text(malformed.truncated(data, None if keep is None else int(keep)), close=True)
        if state.fault is not Fault.TRICKLE:
            return web.json_response(document)
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        response.content_length = len(data)
        await response.prepare(request)
        await self._trickler(request, response, opts)(data)
        await response.write_eof()
        return response

    def _trickler(self, request: web.Request, response: web.StreamResponse, opts: Mapping[str, Any]) -> Write:
        """A writer that sends one byte every ``interval`` seconds until the fault is cleared (then the
        rest at once) or the server stops (then it drops the connection); ``_Dropped`` when the connection is gone."""
        interval = float(opts.get("interval", 0.2))
        assert self._release is not None
        released = self._release

        async def write(data: bytes) -> None:
            try:
                rest = await malformed.trickle(response.write, data, interval, released)
                if rest and not self._stopping:
                    await response.write(rest)
            except ConnectionResetError as exc:  # the client gave up
                raise _Dropped(response) from exc
            if rest and self._stopping:
                drop_connection(request)
                raise _Dropped(response)

        return write

    def _text(self, body: Mapping[str, Any]) -> str:
        """The reply; with ``continue_final_message``, the rest of it after the final assistant message."""
        messages = body.get("messages") or [{}]
        last = messages[-1]
        if body.get("continue_final_message") and last.get("role") == "assistant":
            prefix = str(last.get("content") or "")
            return self.reply[len(prefix) :] if self.reply.startswith(prefix) else self.reply
        schema = (body.get("structured_outputs") or {}).get("json")
        if schema is not None and self.structured_outputs and not _is_json(self.reply):
            return json.dumps(schema_instance(schema))  # vLLM's grammar backend: the answer fits the schema
        return self.reply

    def _words(self, body: Mapping[str, Any]) -> tuple[list[str], str]:
        text, _ = _stopped(self._text(body), body)
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1].rstrip()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _tool(self, body: Mapping[str, Any]) -> str | None:
        """The tool the server calls: the forced one, else the first offered (None: answer in text)."""
        tools, choice = body.get("tools") or [], body.get("tool_choice", "auto")
        if not tools or choice == "none":
            return None
        if isinstance(choice, dict):
            return str(choice["function"]["name"])
        return str(tools[0]["function"]["name"])

    def _completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        words, finish = self._words(body)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(words), "tool_calls": []}
        message[self.reasoning_field] = self.reasoning
        if (tool := self._tool(body)) is not None:
            arguments = json.dumps(self.tool_arguments)
            message["content"], finish = None, "tool_calls"
            message["tool_calls"] = [
                {
                    "id": f"chatcmpl-tool-{uuid.uuid4().hex[:8]}",
                    "type": "function",
                    "function": {"name": tool, "arguments": arguments},
                }
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": _stopped(self._text(body), body)[1] if finish == "stop" else None,
                }
            ],
            "usage": _usage(body, len(words)),
        }

    async def _stream(self, request: web.Request, body: Mapping[str, Any], state: _FaultState) -> web.StreamResponse:
        opts = state.options
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if state.fault is Fault.STRING_BODY:
            await response.write(malformed.value_events(opts.get("value", "ok"), int(opts.get("count", 3))))
            await response.write_eof()
            return response
        write: Write = response.write
        if state.fault is Fault.TRICKLE:
            write = self._trickler(request, response, opts)
        elif state.fault is Fault.SSE_NOISE:
            write = malformed.noisy(response.write)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stop_reason = _stopped(self._text(body), body)[1]

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
            }
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:  # as vLLM: stop_reason on the finishing chunk only
                choice["stop_reason"] = stop_reason if finish == "stop" else None
            data["choices"] = [choice] if choices and state.fault is not Fault.NO_CHOICES else []
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()

        await write(chunk({"role": "assistant", "content": ""}))
        if state.fault is Fault.SLOW_FIRST_TOKEN:
            await asyncio.sleep(float(opts.get("delay", 1.0)))
        words, finish = self._words(body)
        for piece in (self.reasoning or "").split(" ") if self.reasoning else ():
            await write(chunk({self.reasoning_field: piece + " "}))
        if (tool := self._tool(body)) is not None:
            # As vLLM streams tool calls: name first with arguments null, then the arguments in pieces.
            head = {
                "index": 0,
                "id": f"chatcmpl-tool-{uuid.uuid4().hex[:8]}",
                "type": "function",
                "function": {"name": tool, "arguments": None},
            }
            await write(chunk({"tool_calls": [head]}))
            arguments = json.dumps(self.tool_arguments)
            half = len(arguments) // 2
            for part in (arguments[:half], arguments[half:]):
                await write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
            words, finish = [], "tool_calls"
        after = int(opts.get("after_chunks", len(words) // 2))
        for i, word in enumerate(words):
            if i == after and state.fault is Fault.CUT:
                drop_connection(request)
                return response
            if i == after and state.fault is Fault.STALL:
                assert self._release is not None
                await self._release.wait()
            if i == after and state.fault is Fault.ERROR_EVENT:
                error = {
                    "error": {
                        "message": opts.get("message", "injected error"),
                        "type": "InternalServerError",
                        "param": None,
                        "code": int(opts.get("status", 500)),
                    }
                }
                await write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                return response
            if i == after and state.fault is Fault.TRUNCATED_JSON:
                keep = opts.get("keep")
                await write(malformed.truncated_event(chunk({"content": word}), None if keep is None else int(keep)))
                response.force_close()
                await response.write_eof()
                return response
            if i == after and state.fault is Fault.INVALID_JSON:
                await write(f"data: {opts.get('body', malformed.INVALID_JSON)}\n\n".encode())
            if i == after and state.fault is Fault.SSE_NOISE and not opts.get("complete", True):
                await write(b"")  # noise, and no finish_reason or [DONE]
                await response.write_eof()
                return response
            await write(chunk({"content": word}))
        await write(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await write(chunk({}, usage=_usage(body, len(words)), choices=False))
        await write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


_METRIC_NAMES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    "vllm_old": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc"),
    "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}
"""(running, waiting, KV-cache use) as each server names them; llama.cpp has no KV gauge."""


def drop_connection(request: web.Request) -> None:
    """Close the client's connection mid-response, as a crashing server or a proxy would."""
    assert request.transport is not None
    request.transport.close()


def _usage(body: Mapping[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _error(
    status: int, message: str, retry_after: object = None, err_type: str | None = None, param: str | None = None
) -> web.Response:
    """vLLM's error body; ``Retry-After: str(retry_after)`` unless None (any value, sent as given)."""
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}
    body = {
        "error": {
            "message": message,
            "type": err_type or kinds.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }
    headers = {"Retry-After": _header_value(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


def _header_value(value: object) -> str:
    """``str(value)``, which aiohttp can send as a header value: no control character but tab (ValueError)."""
    text = str(value)
    if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in text):
        raise ValueError(f"a header value cannot hold control characters (but tab): {text!r}")
    return text


_NOT_COMPATIBLE = (
    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you "
    "want the model to continue the final message, and add_generation_prompt when you want to add a header that "
    "will prompt it to start a new assistant message instead."
)


def _stopped(text: str, body: Mapping[str, Any]) -> tuple[str, str | None]:
    """``text`` cut before the first stop string it contains, and that string (vLLM's ``stop_reason``)."""
    stops = body.get("stop") or []
    found = [(text.find(stop), stop) for stop in ([stops] if isinstance(stops, str) else stops) if stop in text]
    if not found:
        return text, None
    at, stop = min(found)
    return text[:at], stop


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def schema_instance(schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None) -> Any:
    """The smallest value that fits a JSON schema (what a grammar-constrained model could answer)."""
    defs = defs if defs is not None else schema.get("$defs") or schema.get("definitions") or {}
    if "$ref" in schema:
        return schema_instance(defs[str(schema["$ref"]).rsplit("/", 1)[-1]], defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return schema_instance(schema[key][0], defs)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {name: schema_instance(sub, defs) for name, sub in (schema.get("properties") or {}).items()}
    return {"array": [], "string": "text", "integer": 0, "number": 0.0, "boolean": False, "null": None}.get(kind)

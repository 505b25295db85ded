"""A vLLM-shaped OpenAI-compatible server on loopback whose failures are switched at run time.

Real servers cannot be made to time out, answer 503 or cut a stream on demand; this one can. It
speaks vLLM's protocol where it matters to a client (``/health``, ``/v1/models`` with
``max_model_len``, ``/metrics`` names, error bodies, ``stop_reason``, usage in streams only with
``stream_options.include_usage``) and answers with a fixed text, one word per stream chunk::

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web


class Fault(StrEnum):
    NONE = "none"
    STATUS = "status"  # answer with an HTTP error status (options: status, retry_after, message)
    HANG = "hang"  # accept the request and never answer (until the fault is cleared or the server stops)
    REFUSE = "refuse"  # stop listening: connections are refused
    CUT = "cut"  # close the connection mid-response (streams: after `after_chunks` content chunks)
    ERROR_EVENT = "error_event"  # HTTP 200 stream with `data: {"error": ...}` after `after_chunks` chunks
    SLOW_FIRST_TOKEN = "slow_first_token"  # wait `delay` seconds before the first chunk / the response
    DELAY = "delay"  # wait `delay` seconds before answering every request (a slow but healthy server)


@dataclass
class _FaultState:
    fault: Fault = Fault.NONE
    remaining: int | None = None  # how many more requests it applies to; None = until cleared
    options: dict[str, Any] = field(default_factory=dict)


class FaultServer:
    """The server; ``hits`` counts chat requests, ``requests`` keeps their bodies (newest last).

    ``last_authorization`` is the last ``Authorization`` header received, so tests can check a key
    reached the server while staying out of logs and errors.
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
        self.tool_arguments: dict[str, Any] = {}
        """Arguments of the tool call the server makes when the request offers tools."""
        self.max_running = max_running
        """As vLLM's --max-num-seqs: requests beyond it wait (``num_requests_waiting``); None: no limit."""
        self.metrics = metrics
        """Metric names ``/metrics`` uses: "vllm", "vllm_old" (gpu_cache_usage_perc), "llamacpp"; None: 404."""
        self.kv_usage = 0.0
        """What ``/metrics`` reports as KV-cache use (0-1)."""
        self.latency = 0.0
        """Seconds every answer takes (a healthy server's service time), before any fault's delay."""
        self.hits = 0
        self.running = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self.requests: list[dict[str, Any]] = []
        self.last_authorization: str | None = None
        self._keep = keep_requests
        self._state = _FaultState()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._release: asyncio.Event | None = None

    # --- control, from any thread ------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def set_fault(self, fault: Fault | str | None, *, times: int | None = None, **options: Any) -> None:
        """Switch the fault for the next ``times`` chat requests (all when None); None clears it.

        ``every=N`` among the options applies it to every Nth chat request only (an occasional fault).
        """
        fault = Fault(fault or Fault.NONE)
        previous = self._state.fault
        with self._lock:
            self._state = _FaultState(fault, times, options)
        if previous is Fault.HANG and fault is not Fault.HANG:
            self._call(self._wake_hung())
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
        await self._wake_hung()
        if self._runner is not None:
            await self._runner.cleanup()

    def _received(self, request: web.Request, body: dict[str, Any]) -> _FaultState:
        """Count and keep a chat request; the fault that applies to it."""
        self.hits += 1
        self.last_authorization = request.headers.get("Authorization")
        self.requests.append(body)
        del self.requests[: -self._keep]
        return self._take_fault()

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
        label = f'{{model_name="{self.model}"}}' if self.metrics != "llamacpp" else ""
        values = (self.running, self.waiting, self.kv_usage)
        text = "".join(
            f"# TYPE {name} gauge\n{name}{label} {value}\n" for name, value in zip(names, values, strict=False)
        )
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
        }
        if self.max_model_len is not None:  # servers other than vLLM may not report it
            model["max_model_len"] = self.max_model_len
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
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
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if state.fault is Fault.STATUS:
                return _error(opts.get("status", 500), opts.get("message", "injected failure"), opts.get("retry_after"))
            if state.fault is Fault.HANG:
                assert self._release is not None
                await self._release.wait()
                return _error(503, "hang released")
            if state.fault is Fault.DELAY or (state.fault is Fault.SLOW_FIRST_TOKEN and not body.get("stream")):
                await asyncio.sleep(float(opts.get("delay", 1.0)))
            if body.get("model") != self.model:
                return _error(404, f"The model `{body.get('model')}` does not exist.", err_type="NotFoundError")
            if state.fault is Fault.CUT and not body.get("stream"):
                drop_connection(request)
                return web.Response(status=500)  # never sent: the connection is gone
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                return _error(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            if body.get("tools") and body.get("tool_choice", "auto") == "auto" and not self.auto_tool_choice:
                message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
                return _error(400, message)
            if body.get("stream"):
                return await self._stream(request, body, state)
            return web.json_response(self._completion(body))
        finally:
            self.running -= 1
            if self._slots is not None:
                self._slots.release()

    def _text(self, body: Mapping[str, Any]) -> str:
        """The reply; with ``continue_final_message``, the rest of it after the final assistant message."""
        messages = body.get("messages") or [{}]
        last = messages[-1]
        if body.get("continue_final_message") and last.get("role") == "assistant":
            prefix = str(last.get("content") or "")
            return self.reply[len(prefix) :] if self.reply.startswith(prefix) else self.reply
        return self.reply

    def _words(self, body: Mapping[str, Any]) -> tuple[list[str], str]:
        words = [w + " " for w in self._text(body).split(" ")]
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
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            ],
            "usage": _usage(body, len(words)),
        }

    async def _stream(self, request: web.Request, body: Mapping[str, Any], state: _FaultState) -> web.StreamResponse:
        opts = state.options
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
            }
            data["choices"] = (
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}]
                if choices
                else []
            )
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}))
        if state.fault is Fault.SLOW_FIRST_TOKEN:
            await asyncio.sleep(float(opts.get("delay", 1.0)))
        words, finish = self._words(body)
        for piece in (self.reasoning or "").split(" ") if self.reasoning else ():
            await response.write(chunk({self.reasoning_field: piece + " "}))
        if (tool := self._tool(body)) is not None:
            # As vLLM streams tool calls: name first with arguments null, then the arguments in pieces.
            head = {
                "index": 0,
                "id": f"chatcmpl-tool-{uuid.uuid4().hex[:8]}",
                "type": "function",
                "function": {"name": tool, "arguments": None},
            }
            await response.write(chunk({"tool_calls": [head]}))
            arguments = json.dumps(self.tool_arguments)
            half = len(arguments) // 2
            for part in (arguments[:half], arguments[half:]):
                await response.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
            words, finish = [], "tool_calls"
        after = int(opts.get("after_chunks", len(words) // 2))
        for i, word in enumerate(words):
            if i == after and state.fault is Fault.CUT:
                drop_connection(request)
                return response
            if i == after and state.fault is Fault.ERROR_EVENT:
                error = {
                    "error": {
                        "message": opts.get("message", "injected error"),
                        "type": "InternalServerError",
                        "param": None,
                        "code": int(opts.get("status", 500)),
                    }
                }
                await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                return response
            await response.write(chunk({"content": word}))
        await response.write(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(chunk({}, usage=_usage(body, len(words)), choices=False))
        await response.write(b"data: [DONE]\n\n")
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


def _error(status: int, message: str, retry_after: float | None = None, err_type: str | None = None) -> web.Response:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}
    body = {
        "error": {
            "message": message,
            "type": err_type or kinds.get(status, "InternalServerError"),
            "param": None,
            "code": status,
        }
    }
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)

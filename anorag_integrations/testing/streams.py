"""FaultServer's streamed answers: vLLM's chunks (role, reasoning, tool calls, one word each, usage, [DONE]).

A stream is where most faults bite mid-answer: cut after some chunks, an error event, a truncated or
invalid event, noise between events, a stall or a trickle. Each fault's place in the stream is its
``after_chunks`` option (default: half the words); what each fault sends is documented on ``Fault``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from . import malformed, wire
from .faults import DELAY_S, Fault, FaultState
from .malformed import Write
from .replies import Replies
from .wire import drop_connection, stopped


class Streams(Replies):
    """``stream: true`` chat requests, answered as vLLM streams them, with the fault in force."""

    async def _stream(self, request: web.Request, body: Mapping[str, Any], state: FaultState) -> web.StreamResponse:
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
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.answered_as(body)
        stop_reason = stopped(self._text(body), body)[1]

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
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
            await asyncio.sleep(float(opts.get("delay", DELAY_S)))
        words, finish = self._words(body)
        for piece in (self.reasoning or "").split(" ") if self.reasoning else ():
            await write(chunk({self.reasoning_field: piece + " "}))
        if tools := self._tools(body):
            # As vLLM streams tool calls, one after the other: name first with arguments null, then the
            # arguments in pieces.
            for index, tool in enumerate(tools):
                head = {
                    "index": index,
                    "id": self._call_id(),
                    "type": "function",
                    "function": {"name": tool, "arguments": None},
                }
                await write(chunk({"tool_calls": [head]}))
                arguments = json.dumps(self.tool_arguments)
                half = len(arguments) // 2
                for part in (arguments[:half], arguments[half:]):
                    await write(chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
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
            await write(chunk({}, usage=wire.usage(body, len(words)), choices=False))
        await write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

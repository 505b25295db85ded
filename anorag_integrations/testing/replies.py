"""FaultServer's plain (not stream) answers: what a chat completion holds, and how a fault mangles an answer.

The content is shared with streams (``streams.py``): the reply text as the request's stop strings,
``max_tokens``, ``continue_final_message`` and ``structured_outputs`` make it, and the tool call
the server makes when tools are offered. ``_answer`` sends a finished document as the fault in
force has it (no choices, invalid or truncated JSON, a bare string, a trickle).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from . import malformed
from .control import ServerControl
from .faults import Fault, FaultState
from .malformed import Write
from .wire import Dropped, drop_connection, is_json, schema_instance, stopped, usage

TRICKLE_INTERVAL_S = 0.2
"""Seconds between two bytes of a TRICKLE answer, unless its ``interval`` option says otherwise."""


class Replies(ServerControl):
    """Completions built from the server's settings, and plain answers sent under a fault."""

    async def _answer(
        self, request: web.Request, document: dict[str, Any], state: FaultState, *, listing: str
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
        rest at once) or the server stops (then it drops the connection); ``Dropped`` when the connection is gone."""
        interval = float(opts.get("interval", TRICKLE_INTERVAL_S))
        assert self._release is not None
        released = self._release

        async def write(data: bytes) -> None:
            try:
                rest = await malformed.trickle(response.write, data, interval, released)
                if rest and not self._stopping:
                    await response.write(rest)
            except ConnectionResetError as exc:  # the client gave up
                raise Dropped(response) from exc
            if rest and self._stopping:
                drop_connection(request)
                raise Dropped(response)

        return write

    def _text(self, body: Mapping[str, Any]) -> str:
        """The reply; with ``continue_final_message``, the rest of it after the final assistant message."""
        messages = body.get("messages") or [{}]
        last = messages[-1]
        if self.echo:
            return f"echo: {last.get('content')}"
        if body.get("continue_final_message") and last.get("role") == "assistant":
            prefix = str(last.get("content") or "")
            return self.reply[len(prefix) :] if self.reply.startswith(prefix) else self.reply
        schema = (body.get("structured_outputs") or {}).get("json")
        if schema is not None and self.structured_outputs and not is_json(self.reply):
            return json.dumps(schema_instance(schema))  # vLLM's grammar backend: the answer fits the schema
        return self.reply

    def _words(self, body: Mapping[str, Any]) -> tuple[list[str], str]:
        """The reply in tokens (one word each, with its space) and the finish reason."""
        text, _ = stopped(self._text(body), body)
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1].rstrip()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _tools(self, body: Mapping[str, Any]) -> list[str]:
        """The tools the server calls, ``tool_calls`` of them (one with ``parallel_tool_calls: false``): the
        forced one, else those offered in turn; none (answer in text) when none is offered, with
        ``tool_choice: "none"``, and with "auto" right after a tool's result, as a model that has read it."""
        tools, choice = body.get("tools") or [], body.get("tool_choice", "auto")
        last = (body.get("messages") or [{}])[-1]
        if not tools or choice == "none" or (choice == "auto" and last.get("role") == "tool"):
            return []
        count = 1 if body.get("parallel_tool_calls") is False else self.tool_calls
        if isinstance(choice, dict):
            return [str(choice["function"]["name"])] * count
        return [str(tools[i % len(tools)]["function"]["name"]) for i in range(count)]

    def _call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex[:8]}"

    def _completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        words, finish = self._words(body)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(words), "tool_calls": []}
        message[self.reasoning_field] = self.reasoning
        if tools := self._tools(body):
            arguments = json.dumps(self.tool_arguments)
            message["content"], finish = None, "tool_calls"
            message["tool_calls"] = [
                {"id": self._call_id(), "type": "function", "function": {"name": tool, "arguments": arguments}}
                for tool in tools
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.answered_as(body),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": stopped(self._text(body), body)[1] if finish == "stop" else None,
                }
            ],
            "usage": usage(body, len(words)),
        }

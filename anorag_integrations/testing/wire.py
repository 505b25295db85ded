"""vLLM's wire format where FaultServer's replies need it: error bodies, usage, stop strings, schema answers.

Plain functions of a request body (no server state), shared by the plain answers (``replies.py``),
the streams (``streams.py``) and the request pipeline (``fault_server.py``); ``drop_connection`` and
``Dropped`` are how a handler ends a connection mid-answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

NOT_COMPATIBLE = (
    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you "
    "want the model to continue the final message, and add_generation_prompt when you want to add a header that "
    "will prompt it to start a new assistant message instead."
)
"""vLLM's 400 when a request sets both flags (``add_generation_prompt`` defaults to true)."""


class Dropped(Exception):
    """The connection is gone mid-response (the client left or the server stops): end the handler quietly."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("connection dropped")
        self.response = response


def drop_connection(request: web.Request) -> None:
    """Close the client's connection mid-response, as a crashing server or a proxy would."""
    assert request.transport is not None
    request.transport.close()


def usage(body: Mapping[str, Any], completion_tokens: int) -> dict[str, int]:
    """Token counts of a chat request (one token per word of its messages) and its answer."""
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def error(
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
    headers = {"Retry-After": header_value(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


def header_value(value: object) -> str:
    """``str(value)``, which aiohttp can send as a header value: no control character but tab (ValueError)."""
    text = str(value)
    if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in text):
        raise ValueError(f"a header value cannot hold control characters (but tab): {text!r}")
    return text


def stopped(text: str, body: Mapping[str, Any]) -> tuple[str, str | None]:
    """``text`` cut before the first stop string it contains, and that string (vLLM's ``stop_reason``)."""
    stops = body.get("stop") or []
    found = [(text.find(stop), stop) for stop in ([stops] if isinstance(stops, str) else stops) if stop in text]
    if not found:
        return text, None
    at, stop = min(found)
    return text[:at], stop


def is_json(text: str) -> bool:
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

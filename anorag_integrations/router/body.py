"""The body a chat request sends: built from the caller's keywords, checked, and reworked for a continuation.

Keywords the openai SDK knows are passed to it as they are; any other (vLLM's extras: ``top_k``,
``guided_json``, ...) goes into ``extra_body``. What the SDK would only fail on later is refused up
front with :class:`~.errors.InvalidRequestError` (messages that are not mappings, ``extra_*`` keywords
that are not mappings, header names or values with line breaks); :func:`why_unsendable` tells, after an
attempt failed, whether the SDK could not even encode the body (the caller's mistake, not the route's).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from openai import NotGiven, Omit
from openai.resources.chat.completions import Completions

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from ..config import Params

SDK_PARAMS = frozenset(inspect.signature(Completions.create).parameters) - {"self", "messages", "model", "stream"}
"""Keyword arguments the openai SDK accepts; any other goes into ``extra_body`` (vLLM's extras)."""
DEFAULTED = ("temperature", "max_tokens", "top_p")
"""Sampling keywords a call takes from the config's ``params`` when the caller does not give them."""
NOT_BODY = frozenset({"extra_headers", "extra_query", "extra_body"})
"""The SDK's keywords that are not sent as body fields as they are (``extra_body`` is merged into it)."""

RESERVED_CHAT = {
    "stream": "call stream() / astream() for a stream, chat() / achat() for one answer",
    "messages": "the messages are the call's first argument",
}
"""Body fields the router sets itself: a caller's (an adapter's model_kwargs, a bind()) would break every
answer, and count against routes that did nothing wrong."""

Messages = Iterable[Mapping[str, Any]]


def reserved(params: Mapping[str, Any], fields: Mapping[str, str]) -> None:
    """InvalidRequestError when ``params`` (or its ``extra_body``) sets a field the router sets itself."""
    extra = params.get("extra_body")
    for name, instead in fields.items():
        if name in params or (isinstance(extra, Mapping) and name in extra):
            raise InvalidRequestError(f"{name!r} is set by the router, not by the caller: {instead}")


def chat_body(defaults: Params, messages: Messages, params: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The body of a chat request (``model`` apart): the caller's other keywords, ``params``, completed in place."""
    for key in DEFAULTED:
        default = getattr(defaults, key)
        if default is not None and key not in params:
            params[key] = default
    reserved(params, RESERVED_CHAT)
    extra = {k: params.pop(k) for k in list(params) if k not in SDK_PARAMS}
    if extra:
        params["extra_body"] = {**extra, **(params.get("extra_body") or {})}
    if stream:
        params.setdefault("stream_options", {"include_usage": True})
    params["messages"] = _messages(messages)
    check_extras(params)
    return params


def continued_body(body: Mapping[str, Any], delivered: str, delivered_tokens: int) -> dict[str, Any]:
    """The body that continues a cut stream: the delivered text as a final assistant message.

    vLLM's ``continue_final_message`` (with ``add_generation_prompt: false``) makes the model go on
    from the end of that message, so the caller's stream resumes without repeating text. Token
    limits shrink by the content chunks already delivered (about one token each).
    """
    continued = dict(body)
    continued["messages"] = [*body["messages"], {"role": "assistant", "content": delivered}]
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    continued["extra_body"] = {**(continued.get("extra_body") or {}), **extra}
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(continued.get(key), int):
            continued[key] = max(1, continued[key] - delivered_tokens)
    return continued


def why_unsendable(body: Mapping[str, Any]) -> str | None:
    """Why the SDK cannot serialise ``body`` as JSON (the caller's mistake), or None when it can.

    Asked only after an attempt raised a TypeError, ValueError or RecursionError, to tell the caller's NaN,
    unserialisable object or structure nested past Python's recursion limit from a server's unusable
    answer; it uses the SDK's own encoder.
    """
    payload = {k: v for k, v in body.items() if k not in NOT_BODY}
    payload.update(body.get("extra_body") or {})
    try:
        _sdk_dumps(payload)
    except (TypeError, ValueError) as exc:
        return str(exc)
    except RecursionError:
        return "it is nested deeper than Python's recursion limit allows encoding"
    return None


def prefix_pieces(messages: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """What the prefix policies hash of a conversation: each message's role and text, in order."""
    for message in messages:
        yield f"{message.get('role')}\x1f{_text(message.get('content'))}\x1e"


def check_extras(params: Mapping[str, Any]) -> None:
    """The SDK's extra_* keywords must be mappings; header names and values text without line breaks."""
    for key in NOT_BODY:
        value = params.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidRequestError(f"{key} must be a mapping, got {type(value).__name__}")
    for name, value in (params.get("extra_headers") or {}).items():
        if not isinstance(name, str) or not isinstance(value, str | None | Omit | NotGiven):
            raise InvalidRequestError(f"extra_headers must map text to text, got {name!r:.40}: {value!r:.40}")
        if any(c in name + (value if isinstance(value, str) else "") for c in "\r\n\0"):
            raise InvalidRequestError(f"extra_headers[{name!r:.40}] contains a line break or NUL")


def _messages(messages: Any) -> list[Any]:
    """The caller's messages as a list of mappings, or InvalidRequestError saying what is wrong."""
    try:
        listed = list(messages)
    except TypeError:
        raise InvalidRequestError(
            f"messages must be a list of {{'role': ..., 'content': ...}} mappings, got {type(messages).__name__}"
        ) from None
    for index, message in enumerate(listed):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{index}] must be a mapping with role and content, got {message!r:.80}")
    return listed


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a part whose text is not text (None, a number) adds nothing: the server judges it
        return "".join(text for part in content if isinstance(part, dict) and isinstance(text := part.get("text"), str))
    return ""


try:  # the encoder the openai SDK sends bodies with (datetime, pydantic models; no NaN)
    from openai._utils._json import openapi_dumps as _sdk_dumps
except ImportError:  # pragma: no cover - older SDKs: the same rules, by hand

    def _sdk_dumps(obj: Any) -> bytes:
        return json.dumps(obj, allow_nan=False, default=_plain).encode()

    def _plain(value: Any) -> Any:
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json", exclude_unset=True, by_alias=True)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

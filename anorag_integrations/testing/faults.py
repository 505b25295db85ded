"""The faults a ``FaultServer`` can be switched to (``Fault``) and the one in force (``FaultState``).

``FaultServer.set_fault`` takes a ``Fault`` and its options; each request then takes a
``FaultState`` (``FaultServer._take_fault``), so a fault limited to a number of requests or to
every Nth one is decided once per request, under the server's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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
    # Stream: the plain answer, one `application/json` completion, as a server or proxy that ignores
    # `stream: true` sends (no event stream at all). Plain requests are answered normally.
    UNSTREAMED = "unstreamed"


DELAY_S = 1.0
"""Seconds DELAY and SLOW_FIRST_TOKEN wait, unless their ``delay`` option says otherwise."""

HELD = (Fault.HANG, Fault.TRICKLE, Fault.STALL)
"""Faults that hold requests open until the fault is cleared or changed (then they are released)."""


@dataclass
class FaultState:
    """The fault in force and its options (see ``Fault``); what one request gets is a copy without a count."""

    fault: Fault = Fault.NONE
    remaining: int | None = None  # how many more requests it applies to; None = until cleared
    options: dict[str, Any] = field(default_factory=dict)

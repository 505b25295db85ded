"""What an active probe of a route found, and what that does to the route (its breaker, the fleet's copy).

``Route.probe``/``aprobe`` ask the server (``/health``, then ``/v1/models``) through the route's
transport seam (``_probe_models``, which ``OllamaRoute`` replaces); ``record_probe`` turns what came
back into the route's ``ProbeResult`` the same way for every kind of server.

A context window a server reports is taken only when it is one (:func:`context_window`): a whole
number of tokens from 1 to ``MAX_CONTEXT_WINDOW``. Anything else (``-1``, ``0``, ``1e30``, ``"4096"``,
``true``) is treated as unknown, with one warning naming the route: one server's nonsense must not
make the router refuse every input before sending.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import forks
from ..classify import REFUSED, classify, refused

if TYPE_CHECKING:
    from .route import Route

log = logging.getLogger("anorag_integrations.router")

MAX_CONTEXT_WINDOW = 100_000_000
"""The largest context window taken from a server, in tokens (the largest models' today: 10 M); past it, a
reported ``max_model_len`` is nonsense, ignored."""


@dataclass(slots=True)
class ProbeResult:
    """What the last active probe of a route saw."""

    healthy: bool | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    error: str | None = None
    checked_at: float | None = None
    parents: dict[str, str] = field(default_factory=dict)
    """Listed adapters (LoRA) and the model each adapts."""


class Listed(NamedTuple):
    """One entry of a server's model list: its name, its context window as reported (any JSON value, which
    :func:`context_window` takes or ignores) and, for an adapter (LoRA), the model it adapts."""

    name: str
    max_model_len: Any = None
    parent: str | None = None


def record_probe(route: Route, started: float, models: list[Listed], exc: BaseException | None) -> ProbeResult:
    """The probe begun at ``started`` (``perf_counter``) found ``models``, or failed with ``exc``.

    The result becomes the route's ``probe_result`` (the fleet is told): a failure, or a server that
    does not serve the route's model, forces the breaker open; a healthy answer ends its cool-down.
    """
    result = ProbeResult(latency_ms=round((time.perf_counter() - started) * 1000, 2), checked_at=time.time())
    if exc is not None:
        result.healthy = False
        result.error = str(
            classify(exc, route=route.name, url=route.base_url, model=route.model, timeout=route.probe_timeout)
        )
        route.breaker.force_open()
        if refused(exc):
            route.cut_in_flight(REFUSED)
    else:
        result.models = [entry.name for entry in models]
        result.max_model_len = context_window(
            route, next((entry.max_model_len for entry in models if entry.name == route.model), None)
        )
        route.listed_models(models, result.checked_at or time.time())
        result.parents = dict(route.parents)
        result.healthy = not result.models or route.serves(result.models)
        if result.healthy:
            route.breaker.probe_succeeded()
        else:
            result.error = (
                f"route {route.name!r} ({route.base_url}): server serves {result.models}, not {route.model!r} "
                f"(hint: {route.missing_model_hint})"
            )
            route.breaker.force_open()
    route.probe_result = result
    if route.listener is not None:
        route.listener.probed(route.name)
    return result


def model_entry(model: Any) -> Listed:
    """A served model as the server lists it: its name, its context window (vLLM: ``max_model_len``;
    llama.cpp: ``meta.n_ctx``) and, for a LoRA adapter, its ``parent`` (vLLM)."""
    extra = model.model_extra or {}
    length = extra.get("max_model_len")
    if length is None:
        meta = extra.get("meta")
        length = meta.get("n_ctx") if isinstance(meta, dict) else None
    parent = extra.get("parent")
    name = model.id if isinstance(model.id, str) else ""  # a listing's non-string id is no name (left out)
    return Listed(name, length, parent if isinstance(parent, str) and parent else None)


def context_window(route: Route, reported: object) -> int | None:
    """``reported`` as a context window in tokens when it is one, else None (unknown).

    A whole number from 1 to ``MAX_CONTEXT_WINDOW`` (``4096.0`` counts as 4096); anything else is
    ignored, with one warning per route.
    """
    if reported is None:
        return None
    if type(reported) is float and reported.is_integer():
        reported = int(reported)
    if type(reported) is int and 0 < reported <= MAX_CONTEXT_WINDOW:
        return reported
    with _WARNED_LOCK:
        if route in _WARNED:
            return None
        _WARNED.add(route)
    log.warning(
        "route %r (%s): the server reports max_model_len %s, which is not a context window (a whole number of "
        "tokens from 1 to %d); ignored: inputs are not checked against it before sending",
        route.name,
        route.base_url,
        _shown(reported),
        MAX_CONTEXT_WINDOW,
    )
    return None


_WARNED: weakref.WeakSet[Route] = weakref.WeakSet()
"""Routes whose server's nonsensical context window was warned of (once each)."""
_WARNED_LOCK = forks.lock()


def _shown(value: object, limit: int = 60) -> str:
    """A server's value for a log line: its repr, capped (a server may send a megabyte where a number goes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

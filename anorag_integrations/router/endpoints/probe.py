"""What an active probe of a route found, and what that does to the route (its breaker, the fleet's copy).

``Route.probe``/``aprobe`` ask the server (``/health``, then ``/v1/models``) through the route's
transport seam (``_probe_models``, which ``OllamaRoute`` replaces); ``record_probe`` turns what came
back into the route's ``ProbeResult`` the same way for every kind of server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..classify import classify

if TYPE_CHECKING:
    from .route import Route


@dataclass(slots=True)
class ProbeResult:
    """What the last active probe of a route saw."""

    healthy: bool | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    error: str | None = None
    checked_at: float | None = None


def record_probe(
    route: Route, started: float, models: list[tuple[str, int | None]], exc: BaseException | None
) -> ProbeResult:
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
    else:
        result.models = [name for name, _ in models]
        result.max_model_len = next((length for name, length in models if name == route.model), None)
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


def model_entry(model: Any) -> tuple[str, int | None]:
    """A served model's name and context window (vLLM: ``max_model_len``; llama.cpp: ``meta.n_ctx``)."""
    extra = model.model_extra or {}
    length = extra.get("max_model_len") or (extra.get("meta") or {}).get("n_ctx")
    return str(model.id), int(length) if isinstance(length, int | float) else None

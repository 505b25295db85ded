"""One endpoint: its SDK clients, timeouts, breaker, last probe result and live statistics."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import openai

from .errors import classify
from .health import CircuitBreaker
from .stats import RouteStats

if TYPE_CHECKING:
    from openai.pagination import SyncPage
    from openai.types import Model

    from ..config import Config, RouteConfig


@dataclass(slots=True)
class ProbeResult:
    """What the last active probe of a route saw."""

    healthy: bool | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    error: str | None = None
    checked_at: float | None = None


class Route:
    """An OpenAI-compatible server serving ``model`` at ``base_url``; the SDK's own retries are off."""

    def __init__(self, name: str, cfg: RouteConfig, config: Config) -> None:
        self.name = name
        self.base_url = cfg.base_url
        self.model = cfg.model
        self.weight = cfg.weight
        self.timeout = cfg.timeout or config.params.timeout
        self.configured_max_model_len = cfg.max_model_len
        self.probe_timeout = config.health.probe_timeout
        self._api_key = cfg.api_key
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key.get_secret_value(), max_retries=0, timeout=self.timeout
        )
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = (
            weakref.WeakKeyDictionary()
        )
        self._aclients_lock = threading.Lock()
        self.breaker = CircuitBreaker(config.health.failure_threshold, config.health.cooldown)
        self.stats = RouteStats()
        self.probe_result = ProbeResult()
        self.not_before = 0.0
        """Monotonic time before which the route is skipped (a ``Retry-After`` it sent)."""

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    @property
    def aclient(self) -> openai.AsyncOpenAI:
        """The async client of the running event loop (connection pools cannot cross loops)."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            with self._aclients_lock:
                client = self._aclients.get(loop)
                if client is None:
                    client = openai.AsyncOpenAI(
                        base_url=self.base_url,
                        api_key=self._api_key.get_secret_value(),
                        max_retries=0,
                        timeout=self.timeout,
                    )
                    self._aclients[loop] = client
        return client

    @property
    def max_model_len(self) -> int | None:
        """Context window: what the server reported (``/v1/models``), else the configured value."""
        return self.probe_result.max_model_len or self.configured_max_model_len

    def available(self, now: float) -> bool:
        """Whether the route may be offered to the policy now."""
        return now >= self.not_before and self.breaker.available()

    @property
    def server_root(self) -> str:
        """The server's root URL (``/health`` and ``/metrics`` live there, not under ``/v1``)."""
        parts = urlsplit(self.base_url)
        path = parts.path[: -len("/v1")] if parts.path.endswith("/v1") else parts.path
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    # --- active probing -------------------------------------------------------------------------

    def probe(self) -> ProbeResult:
        """``GET /health`` (``/v1/models`` when 404), then read served models; update the breaker."""
        started = time.perf_counter()
        options: Any = {"timeout": self.probe_timeout}
        try:
            with contextlib.suppress(openai.NotFoundError):  # no /health: /v1/models answers for it
                self.client.get(f"{self.server_root}/health", cast_to=object, options=options)
            page = self.client.models.list(timeout=self.probe_timeout)
        except openai.APIError as exc:
            return self._probed(started, None, exc)
        return self._probed(started, page, None)

    async def aprobe(self) -> ProbeResult:
        """Async twin of :meth:`probe`."""
        started = time.perf_counter()
        options: Any = {"timeout": self.probe_timeout}
        client = self.aclient
        try:
            with contextlib.suppress(openai.NotFoundError):
                await client.get(f"{self.server_root}/health", cast_to=object, options=options)
            page = await client.models.list(timeout=self.probe_timeout)
        except openai.APIError as exc:
            return self._probed(started, None, exc)
        return self._probed(started, page, None)

    def _probed(self, started: float, page: SyncPage[Model] | Any, exc: BaseException | None) -> ProbeResult:
        result = ProbeResult(latency_ms=round((time.perf_counter() - started) * 1000, 2), checked_at=time.time())
        if exc is not None:
            result.healthy = False
            result.error = str(
                classify(exc, route=self.name, url=self.base_url, model=self.model, timeout=self.probe_timeout)
            )
            self.breaker.force_open()
        else:
            data = list(getattr(page, "data", []) or [])
            result.models = [m.id for m in data]
            for m in data:
                if m.id == self.model:
                    extra = m.model_extra or {}
                    length = extra.get("max_model_len") or (extra.get("meta") or {}).get("n_ctx")
                    result.max_model_len = int(length) if isinstance(length, int | float) else None
            result.healthy = not result.models or self.model in result.models
            if result.healthy:
                self.breaker.probe_succeeded()
            else:
                result.error = (
                    f"route {self.name!r} ({self.base_url}): server serves {result.models}, not {self.model!r} "
                    "(hint: set the route's model to a served name, or start the server with --served-model-name)"
                )
                self.breaker.force_open()
        self.probe_result = result
        return result

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        """Close this loop's async client; clients of other (finished) loops are left to the GC."""
        loop = asyncio.get_running_loop()
        client = self._aclients.pop(loop, None)
        if client is not None:
            await client.close()

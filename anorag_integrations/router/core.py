"""Router: the public calls over the configured routes, and the router's lifecycle.

What happens to one request lives beside this file, one concern each: ``call.py`` (the request and
its bounds), ``rounds.py`` (picking routes, failing over, backing off), ``lease.py`` (one attempt's
bookkeeping, its only owner), ``streams.py`` (streams and their continuation) and ``hedge.py``
(racing a slow request against a copy). What it looks like from outside: ``observability.py``
(Prometheus metrics read from the statistics at scrape time) and ``tracing.py`` (OpenTelemetry
spans). ``close()`` ends every call in flight with ``RouterClosed``, and every later call raises it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from . import observability
from .call import Call, CallInfo, Control, Messages, attach, call_info, wall_clock
from .errors import RouterClosed
from .health import BreakerState, Poller, Prober
from .hedge import Hedger, race
from .policies import make_policy
from .rounds import arounds, rounds
from .route import Route
from .stats import CallOutcomes
from .streams import astream, stream
from .tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from ..config import Config

__all__ = ["CallInfo", "Router", "call_info"]

log = logging.getLogger("anorag_integrations.router")


class Router:
    """Routes chat completions over the configured servers (see the module docstring)."""

    def __init__(
        self, config: Config, *, start_prober: bool = True, tracer_provider: TracerProvider | None = None
    ) -> None:
        """``tracer_provider``: trace with this provider instead of OpenTelemetry's global one."""
        self.config = config
        self.routes: dict[str, Route] = {name: _make_route(name, rc, config) for name, rc in config.routes.items()}
        fallback = config.fallback_route
        self._fallback = self.routes[fallback] if fallback else None
        self._primary = [r for r in self.routes.values() if r is not self._fallback]
        self._on_fallback = False
        self.policy = make_policy(config.lb_policy, **config.policy_options())
        self.prober = Prober(self.routes.values(), config.health.probe_interval)
        self.scraper: Poller | None = None
        """Reads every route's ``/metrics`` when the policy uses server queues (``least_queue``)."""
        if getattr(self.policy, "scrapes_metrics", False):
            self.scraper = Poller(
                self.routes.values(),
                config.least_queue.interval,
                lambda r: r.scrape_load(),
                lambda r: r.ascrape_load(),
                "anorag-metrics-scraper",
            )
        self.hedger = Hedger(config.hedge) if config.hedge is not None else None
        self._continuable = any(route.continue_streams for route in self.routes.values())
        self._loop_thread = _LoopThread()
        self._live: set[Control] = set()
        """Calls in flight, so that close() can end them."""
        self._closing = threading.Event()
        self.is_shared = False
        """Handed out by :meth:`shared`: its users drop it rather than close it (see providers)."""
        obs = config.observability
        models = {route.model for route in self.routes.values()}
        self.tracing = Tracing(tracer_provider, models.pop() if len(models) == 1 else None) if obs.tracing else None
        """Where call and attempt spans go (None: ``observability.tracing: false``)."""
        self.outcomes = CallOutcomes()
        """How calls ended, by route and outcome (``anorag_requests_total``)."""
        self._metrics = observability.Exports(self)
        # Nothing in the background holds the router: one that nobody holds is stopped, not leaked.
        self._finalizer = weakref.finalize(
            self, _halt, self.prober, self.scraper, self._loop_thread, list(self.routes.values()), self._metrics
        )
        if obs.prometheus:
            self.register_metrics()
        if start_prober:
            self._background(Poller.start)

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def _background(self, start: Callable[[Poller], None]) -> None:
        """Start the health prober (when probing is on) and the metrics scraper (when there is one)."""
        if self.config.health.probe_interval > 0:
            start(self.prober)
        if self.scraper is not None:
            start(self.scraper)

    @classmethod
    def from_config(cls, path: str | PathLike[str] | None = None, **kwargs: Any) -> Router:
        """Build from ``path`` (else ``$ANORAG_CONFIG``, else ``./config.yaml``)."""
        from ..config import load_config  # config imports router.errors: keep the cycle out of import time

        return cls(load_config(path), **kwargs)

    @classmethod
    def shared(
        cls,
        config_path: str | PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
    ) -> Router:
        """The process-wide router for a config file (or for one ``base_url``), built on first use.

        Adapters call this, so a LangChain and a LlamaIndex model built from the same config share
        one health state: a route that fails under one is avoided by the other. ``api_key``, when
        given, replaces the key of every route. The router lives while someone holds it.
        """
        from .shared import shared_router

        return shared_router(cls, config_path, base_url=base_url, model=model, api_key=api_key)

    def __repr__(self) -> str:
        return f"Router(routes={list(self.routes)}, lb_policy={self.config.lb_policy!r}, source={self.config.source!r})"

    # --- public API -------------------------------------------------------------------------------

    def chat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """One chat completion; ``route=`` pins a route, other keywords go to the server."""
        with self._call(messages, params, stream=False) as call:
            if self._hedges(call):  # the race needs cancellable requests: run it on the router's loop
                return call.answered(self._hedged(call), hedged=True)
            call.enter()
            try:
                lease, response = rounds(self, call, lambda r, t: r.create(call.body_for(r), t))
                lease.succeeded(output_tokens=_completion_tokens(response))
            finally:
                call.exit()
            return call.answered(attach(response, call.info))

    def _hedged(self, call: Call) -> ChatCompletion:
        future = asyncio.run_coroutine_threadsafe(self._ahedged(call), self._loop_thread.loop())
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RouterClosed("the router was closed while this call was in flight") from None
        except BaseException:
            future.cancel()
            raise

    async def achat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """Async twin of :meth:`chat` on the routes' async clients."""
        with self._call(messages, params, stream=False) as call:
            if self._hedges(call):
                return call.answered(await self._ahedged(call), hedged=True)
            return call.answered(await self._achat(call))

    async def _achat(self, call: Call) -> ChatCompletion:
        call.enter()
        try:
            lease, response = await arounds(self, call, lambda r, t: r.acreate(call.body_for(r), t))
            lease.succeeded(output_tokens=_completion_tokens(response))
        finally:
            call.exit()
        return attach(response, call.info)

    def stream(self, messages: Messages, **params: Any) -> Iterator[ChatCompletionChunk]:
        """Streamed chat completion; usage arrives in a last chunk unless ``stream_options`` says otherwise."""
        return stream(self, self._call(messages, params, stream=True))

    def astream(self, messages: Messages, **params: Any) -> AsyncIterator[ChatCompletionChunk]:
        """Async twin of :meth:`stream`."""
        return astream(self, self._call(messages, params, stream=True))

    def health(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Per route: healthy, breaker state, probe latency, served models (probing all now by default)."""
        if probe and self.routes:
            self._check_open()
            with ThreadPoolExecutor(max_workers=min(16, len(self.routes))) as pool:
                list(pool.map(Route.probe, self.routes.values()))
        return {name: self._health_row(route) for name, route in self.routes.items()}

    async def ahealth(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Async twin of :meth:`health`."""
        if probe:
            self._check_open()
            await asyncio.gather(*(route.aprobe() for route in self.routes.values()))
        return {name: self._health_row(route) for name, route in self.routes.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per route: attempts, failures (and by error class), in-flight, failovers, latency and TTFT
        percentiles (ms), tokens/s, and ``outcomes``: the calls that ended on the route, by outcome."""
        ended = self.outcomes.snapshot()
        return {
            name: {"url": r.base_url, "model": r.model, "state": str(r.breaker.state), **r.stats.snapshot(),
                   "outcomes": {outcome: n for (route, outcome), n in ended.items() if route == name}}
            for name, r in self.routes.items()
        }  # fmt: skip

    def register_metrics(self, registry: CollectorRegistry | None = None) -> None:
        """Export this router's metrics in ``registry`` (default: prometheus_client's global one).

        They are read from the router's statistics at each scrape and labelled ``router`` (the
        config's ``observability.name``, else its file's stem); ``close()`` removes them.
        """
        self._metrics.register(registry)

    def serve_metrics(self, port: int = observability.DEFAULT_PORT, addr: str = "127.0.0.1") -> int:
        """Serve the metrics at ``http://addr:port/metrics`` in a daemon thread until ``close()``; the port.

        For apps without an endpoint of their own; port 0 picks a free one. The metrics of the
        registries this router is registered in are served (a private one when there is none).
        """
        self._check_open()
        return self._metrics.serve(port, addr)

    async def astart_prober(self) -> None:
        """Probe (and scrape) in tasks on the running loop instead of threads (build with ``start_prober=False``)."""
        self._background(Poller.astart)

    def close(self) -> None:
        """End every call in flight with ``RouterClosed``, stop the background work, close the clients."""
        if self.closed:
            return
        self._closing.set()
        for ctl in list(self._live):
            ctl.abort()
        self._finalizer.detach()
        self._metrics.close()
        self.prober.stop()
        if self.scraper is not None:
            self.scraper.stop()
        self._loop_thread.stop(self.routes.values())
        for route in self.routes.values():
            route.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`; also closes the running loop's clients."""
        first = not self.closed
        self.close()
        if first:
            await self.prober.astop()
            if self.scraper is not None:
                await self.scraper.astop()
        for route in self.routes.values():
            await route.aclose()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Router:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RouterClosed()

    def _call(self, messages: Messages, params: dict[str, Any], *, stream: bool) -> Call:
        self._check_open()
        return Call(self, messages, params, stream=stream)

    def _served(self, route: Route) -> None:
        """A route served a request: log a switch to or from the fallback route once, not every request."""
        if (route is self._fallback) != self._on_fallback:
            self._on_fallback = route is self._fallback
            if self._on_fallback:
                log.warning(
                    "no primary route available: serving from fallback route %r (%s)", route.name, route.base_url
                )
            else:
                log.warning("primary routes are back: %r served a request", route.name)

    def _health_row(self, route: Route) -> dict[str, Any]:
        probe = route.probe_result
        state = route.breaker.state
        throttled = route.not_before > time.monotonic()
        error = probe.error or route.stats.last_error
        if throttled:
            error = f"throttled by the server (Retry-After) until {wall_clock(route.not_before)}"
        return {
            "url": route.base_url,
            "model": route.model,
            "healthy": state is not BreakerState.OPEN and probe.healthy is not False and not throttled,
            "state": "throttled" if throttled and state is BreakerState.CLOSED else str(state),
            "throttled_until": time.time() + route.not_before - time.monotonic() if throttled else None,
            "latency_ms": probe.latency_ms,
            "models": list(probe.models),
            "max_model_len": probe.max_model_len,
            "error": error,
            "checked_at": probe.checked_at,
        }

    def _hedges(self, call: Call) -> bool:
        """Whether this request may be hedged (hedging on, more than one route, not pinned)."""
        return self.hedger is not None and call.pinned is None and len(self._primary) > 1

    async def _ahedged(self, call: Call) -> ChatCompletion:
        assert self.hedger is not None
        return await race(call, self.hedger, self._achat)


class _LoopThread:
    """The router's own event loop in a daemon thread, started on first use (sync calls that hedge run there)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._stopped = False

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._stopped:
                raise RouterClosed()
            if self._started is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="anorag-hedge-loop", daemon=True)
                thread.start()
                self._started = (loop, thread)
            return self._started[0]

    def stop(self, routes: Any = (), *, wait: bool = True) -> None:
        """Cancel what still runs there, close the routes' clients of that loop, stop it."""
        with self._lock:
            started, self._started, self._stopped = self._started, None, True
        if started is None:
            return
        loop, thread = started

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            for route in routes:
                await route.aclose()

        if not wait:
            loop.call_soon_threadsafe(loop.stop)
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


def _halt(
    prober: Poller,
    scraper: Poller | None,
    loop_thread: _LoopThread,
    routes: list[Route],
    metrics: observability.Exports,
) -> None:
    """A router nobody holds any more: stop its threads without waiting (runs from the garbage collector)."""
    metrics.halt()
    prober.halt()
    if scraper is not None:
        scraper.halt()
    loop_thread.stop(wait=False)
    for route in routes:
        with contextlib.suppress(Exception):
            route.close()


def _make_route(name: str, cfg: Any, config: Config) -> Route:
    if cfg.api == "ollama":
        from .ollama import OllamaRoute

        return OllamaRoute(name, cfg, config)
    return Route(name, cfg, config)


def _completion_tokens(response: ChatCompletion) -> int | None:
    return response.usage.completion_tokens if response.usage is not None else None

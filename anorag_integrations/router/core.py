"""Router: the public calls over the configured routes, and the router's lifecycle.

What happens to one request lives beside this file, one concern each: ``call.py`` (the request, its bounds, its
``Control``), ``body.py`` (what it sends), ``info.py`` (``CallInfo``: what the caller reads), ``rounds.py`` (picking
routes, failing over, backing off), ``lease.py`` (one attempt's bookkeeping, its only owner), ``streams.py``
(streams and their continuation), ``hedge.py`` (racing a slow request against a copy), ``embeddings.py`` (embedding
calls split into batches) and ``loop.py`` (the loop sync calls use when they need one). Below it, one concern per
folder: ``balancing/`` (choosing a route), ``endpoints/`` (one server: clients, breaker, prober), ``fleet/`` (state
shared by app replicas) and ``telemetry/`` (statistics, Prometheus metrics, OpenTelemetry spans).
``close()`` ends every call in flight with ``RouterClosed``, and every later call raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from typing import TYPE_CHECKING, Any

from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from . import embeddings, forks
from .admission import Admission, RetryBudget
from .balancing.prefix_aware import PrefixAware
from .building import load
from .call import Call, Control, Messages
from .endpoints.health import Poller, Prober
from .endpoints.route import Route
from .errors import NoRouteOfKindError, RouterClosed
from .fleet.state import State, make_state
from .hedge import Hedger, race
from .info import CallInfo, attach, call_info
from .loop import LoopThread
from .members import discovery, membership
from .members.membership import Changes, Drain
from .models import Catalog
from .rounds import aserve, make_pools, serve
from .streams import astream, stream
from .telemetry import prometheus, reports
from .telemetry.stats import CallOutcomes
from .telemetry.tracing import Tracing
from .vectors import VectorLengths

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from ..config import Config, RouteConfig
    from .members.dns import DnsWatcher

__all__ = ["CallInfo", "Router", "call_info"]

log = logging.getLogger("anorag_integrations.router")


class Router:
    """Routes chat completions and embeddings over the configured servers (see the module docstring)."""

    def __init__(
        self, config: Config, *, start_prober: bool = True, tracer_provider: TracerProvider | None = None
    ) -> None:
        """``tracer_provider``: trace with this provider instead of OpenTelemetry's global one."""
        self.serving = False
        """Set once the router is built: discovery's changes wait for it."""
        self.watchers: list[DnsWatcher] = discovery.make_watchers(config.discovery, self)
        """One DNS watcher per ``discovery:`` entry (``members/discovery.py``)."""
        config, self.origins, fleet_state = discovery.first_config(config, self.watchers)
        """``origins``: where each route came from: the config, ``add_route`` ("api") or a discovery entry."""
        self.config = config
        self.routes: dict[str, Route] = {name: make_route(name, rc, config) for name, rc in config.routes.items()}
        self.draining: dict[Route, Drain] = {}
        """Routes that left and still have requests in flight (released when the last one ends)."""
        self.owned: set[Route] = set(self.routes.values())
        """Every route this router built and has not released: closed with it, or by its finaliser."""
        self.members_lock = forks.rlock()
        self._loop_thread = LoopThread()
        self.models = Catalog(self.routes, config, self._loop_thread)
        """Which routes serve which model name (``models.py``): a call's ``model=`` picks its group."""
        self.pools = make_pools(config, self.routes)
        """The routes of each kind ("chat", "embedding"), with their policy and fallback route."""
        self.vector_lengths = VectorLengths()
        """The vector length each embedding group answers: a route answering another length fails."""
        self.policy = self.pools["chat"].policy
        self.prober = Prober(self.routes.values(), config.health.probe_interval)
        self.admission = Admission(config.admission, config.params.timeout)
        """Slots per route, the calls waiting for one, what was shed (``admission/``)."""
        admission = self.admission  # the scraper's checks hold it, never the router
        self.scraper: Poller | None = None
        """Reads every route's ``/metrics`` when the policy uses server queues (``least_queue``)."""
        if getattr(self.policy, "scrapes_metrics", False):
            self.scraper = Poller(
                self.routes.values(),
                config.least_queue.interval,
                lambda r: admission.scraped(r, r.scrape_load()),
                lambda r: _ascraped(admission, r),
                "anorag-metrics-scraper",
            )
        self.hedger = Hedger(config.hedge) if config.hedge is not None else None
        budget = config.retry_budget
        self.retry_budget = RetryBudget(budget.ratio, budget.min_per_s, budget.window)
        """Retries and failovers at most a share of calls (fleet-wide with shared state)."""
        self.state: State = make_state(
            fleet_state,
            self.routes,
            self.hedger,
            config.observability.name or prometheus.default_name(config.source),
            config.params.max_retry_after,
            self.retry_budget,
        )
        """What this router shares with the other replicas of its fleet (``state:``; local: nothing)."""
        self._share_prefixes()
        if config.state.backend != "local":
            self.prober.gate = self.state.leads  # one replica probes each route; all read its results
        self.continuable = any(route.continue_streams for route in self.routes.values())
        """Whether any route may continue a cut stream."""
        self._live: set[Control] = set()
        """Calls in flight, so that close() can end them."""
        self._closing = forks.event()
        self.is_shared = False
        """Handed out by :meth:`shared`: its users drop it rather than close it (see providers)."""
        obs = config.observability
        self.tracing = Tracing(tracer_provider) if obs.tracing else None
        """Where call and attempt spans go (None: ``observability.tracing: false``)."""
        self.outcomes = CallOutcomes()
        """How calls ended, by route and outcome (``anorag_requests_total``)."""
        self._metrics = prometheus.Exports(self)
        # Nothing in the background holds the router: one that nobody holds is stopped, not leaked.
        self._finalizer = weakref.finalize(
            self,
            _halt,
            self.prober,
            self.scraper,
            self._loop_thread,
            self.owned,
            self._metrics,
            self.state,
            self.watchers,
        )
        if obs.prometheus:
            self.register_metrics()
        self.state.start()
        if start_prober:
            self._background(Poller.start)
        self.serving = True
        for watcher in self.watchers:
            watcher.start()
        forks.renew_in_child(self)  # after the state, which renews itself first

    def renew_after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``): new clients and event loop, the prober running again.

        The calls in flight at the fork are the parent's; the shared state renews itself (``fleet/``).
        """
        self._live.clear()
        self.admission.renew_after_fork()
        for route in self.routes.values():
            route.renew_after_fork()
        self._loop_thread.renew_after_fork()
        self._metrics.renew_after_fork()
        if not self.closed:
            for watcher in self.watchers:
                watcher.renew_after_fork()
            self.prober.renew_after_fork()
            if self.scraper is not None:
                self.scraper.renew_after_fork()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def _background(self, start: Callable[[Poller], None]) -> None:
        """Start the health prober (when probing is on) and the metrics scraper (when there is one)."""
        if self.config.health.probe_interval > 0:
            self.state.probing_started()
            start(self.prober)
        if self.scraper is not None:
            start(self.scraper)

    @classmethod
    def from_config(
        cls, config: str | PathLike[str] | Mapping[str, Any] | Config | None = None, **kwargs: Any
    ) -> Router:
        """Build from a config file's path (default ``$ANORAG_CONFIG``, else ``./config.yaml``), or a parsed one.

        A mapping is the document a file holds, ``llm:`` key and all (``{"llm": {"routes": {...}}}``),
        read as :func:`~anorag_integrations.config.config_from_dict` reads it: ``VLLM_*`` overrides apply,
        and a problem raises ``ConfigError``. A ``Config`` is used as it is.
        """
        return cls(load(config), **kwargs)

    @classmethod
    def shared(
        cls,
        config_path: str | PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        kind: str = "chat",
    ) -> Router:
        """The process-wide router for a config file (or for one ``base_url``), built on first use.

        Adapters call this, so a LangChain and a LlamaIndex model built from the same config share
        one health state: a route that fails under one is avoided by the other, and chat models and
        embeddings share one router. ``api_key``, when given, replaces the key of every route;
        ``kind`` is the kind of the single route a ``base_url`` makes ("chat" or "embedding"). The
        router lives while someone holds it.
        """
        from .shared import shared_router

        return shared_router(cls, config_path, base_url=base_url, model=model, api_key=api_key, kind=kind)

    def __repr__(self) -> str:
        return f"Router(routes={list(self.routes)}, lb_policy={self.config.lb_policy!r}, source={self.config.source!r})"

    def _share_prefixes(self) -> None:
        """With shared state, each ``prefix_aware`` index learns from every replica (``fleet/redis_prefix.py``)."""
        policies = {kind: pool.policy for kind, pool in self.pools.items() if isinstance(pool.policy, PrefixAware)}
        options = self.config.prefix_aware
        share = self.state.share_prefixes(policies, options.max_blocks, options.block_chars) if policies else None
        for policy in policies.values():
            policy.fleet = share

    # --- public API -------------------------------------------------------------------------------

    def chat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """One chat completion; ``route=`` pins a route, other keywords go to the server."""
        with self._call(messages, params, stream=False) as call:
            if self._hedges(call):  # the race needs cancellable requests: run it on the router's loop
                return call.answered(self._hedged(call), hedged=True)
            response = serve(self, call, lambda r, t: r.create(call.body_for(r), t), _completion_tokens)
            return call.answered(attach(response, call.info))

    def _hedged(self, call: Call) -> ChatCompletion:
        return call.on_loop(self._loop_thread, self._ahedged(call))

    async def achat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """Async twin of :meth:`chat` on the routes' async clients."""
        with self._call(messages, params, stream=False) as call:
            if self._hedges(call):
                return call.answered(await self._ahedged(call), hedged=True)
            return call.answered(await self._achat(call))

    async def _achat(self, call: Call) -> ChatCompletion:
        response = await aserve(self, call, lambda r, t: r.acreate(call.body_for(r), t), _completion_tokens)
        return attach(response, call.info)

    def stream(self, messages: Messages, **params: Any) -> Iterator[ChatCompletionChunk]:
        """Streamed chat completion; usage arrives in a last chunk unless ``stream_options`` says otherwise."""
        return stream(self, self._call(messages, params, stream=True))

    def astream(self, messages: Messages, **params: Any) -> AsyncIterator[ChatCompletionChunk]:
        """Async twin of :meth:`stream`."""
        return astream(self, self._call(messages, params, stream=True))

    def embed(self, texts: str | Sequence[str], **params: Any) -> CreateEmbeddingResponse:
        """Embeddings of ``texts`` from the routes of kind ``embedding``: one vector per text, in input order.

        Inputs go out in batches of ``embedding.batch_size`` (``batch_size=`` per call), at most
        ``embedding.max_concurrency`` at once; each batch fails over on its own, so a failed batch is
        resent alone. ``truncate=`` overrides ``embedding.truncate``; ``route=``, ``timeout``,
        ``deadline`` and ``max_retries`` work as for :meth:`chat`; other keywords go to the server.
        Usage is summed over the batches; :func:`call_info` tells which route served each batch.
        """
        return embeddings.embed(self, self._embedding_call(params), texts)

    async def aembed(self, texts: str | Sequence[str], **params: Any) -> CreateEmbeddingResponse:
        """Async twin of :meth:`embed` on the routes' async clients."""
        return await embeddings.aembed(self, self._embedding_call(params), texts)

    def health(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Per route: healthy, breaker state, probe latency, served models (probing all now by default)."""
        if probe and self.routes:
            self.check_open()
            with ThreadPoolExecutor(max_workers=min(16, len(self.routes))) as pool:
                list(pool.map(Route.probe, self.routes.values()))
        return {name: reports.health_row(route) for name, route in self.routes.items()}

    async def ahealth(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Async twin of :meth:`health`."""
        if probe:
            self.check_open()
            await asyncio.gather(*(route.aprobe() for route in self.routes.values()))
        return {name: reports.health_row(route) for name, route in self.routes.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per route: attempts, failures (and by error class), in-flight, failovers, latency and TTFT
        percentiles (ms), tokens/s, ``outcomes`` (the calls that ended on the route, by outcome; ``models``: by
        model, then outcome), ``serves`` (the model names it serves now), and the
        prefix-cache hit rate: ``prefix_hit_rate_predicted`` by ``prefix_aware``'s index (None under other
        policies), ``prefix_hit_rate_measured`` from the server's ``/metrics`` when it is read and exports one."""
        return reports.stats(self)

    def overload(self) -> dict[str, Any]:
        """Overload control: the queue of calls waiting for a route (depth by priority, drain rate), calls shed
        (by ``why/priority``), the retry budget, and per route its concurrency limit, in flight and saturation."""
        return reports.overload(self)

    # --- membership: routes added, removed and reloaded live (``members/``) -------------------------------

    def add_route(self, name: str, route: RouteConfig | Mapping[str, Any]) -> Changes:
        """Add a route while serving (a ``routes:`` entry's keys); ``ConfigError`` if the name is taken or the
        route is invalid. A reload keeps it (it is not the file's)."""
        return membership.add(self, name, route)

    def remove_route(self, name: str) -> Drain:
        """Take a route out of service: no new request goes there, those in flight (streams included) finish,
        then its clients, breaker, statistics, prefix index and metric series are released (``Drain``)."""
        return membership.remove(self, name)

    def reload(self, config: str | PathLike[str] | Mapping[str, Any] | Config | None = None) -> Changes:
        """Read the config again (the file it came from, or ``config``) and apply the difference while serving.

        Routes whose settings are unchanged are kept as they are; new ones are added, the others drain. A
        config that does not load raises ``ConfigError`` and the running one keeps serving. Sections that shape
        the router itself (lb_policy, state, hedge, ...) keep their running values, with a warning.
        """
        return membership.reload(self, load(config if config is not None else self.config.source))

    def found(self, index: int, addresses: frozenset[str]) -> None:
        """Discovery entry ``index`` resolved to ``addresses``: its routes become one per address."""
        discovery.found(self, index, addresses)

    def register_metrics(self, registry: CollectorRegistry | None = None) -> None:
        """Export this router's metrics in ``registry`` (default: prometheus_client's global one).

        They are read from the router's statistics at each scrape and labelled ``router`` (the
        config's ``observability.name``, else its file's stem); ``close()`` removes them.
        """
        self._metrics.register(registry)

    def serve_metrics(self, port: int = prometheus.DEFAULT_PORT, addr: str = "127.0.0.1") -> int:
        """Serve the metrics at ``http://addr:port/metrics`` in a daemon thread until ``close()``; the port.

        For apps without an endpoint of their own; port 0 picks a free one. The metrics of the
        registries this router is registered in are served (a private one when there is none).
        """
        self.check_open()
        return self._metrics.serve(port, addr)

    async def astart_prober(self) -> None:
        """Probe (and scrape) in tasks on the running loop instead of threads (build with ``start_prober=False``)."""
        self._background(Poller.astart)

    def close(self) -> None:
        """End every call in flight with ``RouterClosed``, stop the background work, close the clients."""
        if self.closed:
            return
        self._closing.set()
        self.admission.close()
        for ctl in list(self._live):
            ctl.abort()
        self._finalizer.detach()
        for watcher in self.watchers:
            watcher.stop()
        self._metrics.close()
        self.prober.stop()
        self.state.stop()
        if self.scraper is not None:
            self.scraper.stop()
        with self.members_lock:
            owned = [*self.routes.values(), *self.draining]
            drains = list(self.draining.values())
            self.draining.clear()
        self._loop_thread.stop(owned)
        for route in owned:
            route.close()
        for drain in drains:  # closed: a stream a caller holds unread can never hand its ticket back to us now
            drain.set()

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

    def check_open(self) -> None:
        if self.closed:
            raise RouterClosed()

    def _call(self, messages: Messages, params: dict[str, Any], *, stream: bool) -> Call:
        self._check_kind("chat")
        return Call(self, messages, params, stream=stream)

    def _embedding_call(self, params: dict[str, Any]) -> embeddings.EmbeddingCall:
        self._check_kind("embedding")
        return embeddings.EmbeddingCall(self, params)

    def _check_kind(self, kind: str) -> None:
        """The router is open and has routes of ``kind``; else RouterClosed or NoRouteOfKindError."""
        self.check_open()
        pool = self.pools[kind]
        if not pool.primary and pool.fallback is None:
            raise NoRouteOfKindError(kind, self.config.source)

    def _served(self, route: Route) -> None:
        """A route served a request: log a switch to or from the fallback route once, not every request."""
        pool = self.pools[route.kind]
        if (route is pool.fallback) != pool.on_fallback:
            pool.on_fallback = route is pool.fallback
            if pool.on_fallback:
                log.warning(
                    "no primary route available: serving from fallback route %r (%s)", route.name, route.base_url
                )
            else:
                log.warning("primary routes are back: %r served a request", route.name)

    def _hedges(self, call: Call) -> bool:
        """Whether this request may be hedged (hedging on, more than one route serving its model, not pinned)."""
        return self.hedger is not None and call.pinned is None and len(self.models.group(call.kind, call.model)) > 1

    async def _ahedged(self, call: Call) -> ChatCompletion:
        assert self.hedger is not None
        return await race(call, self.hedger, self._achat)


def _halt(
    prober: Poller,
    scraper: Poller | None,
    loop_thread: LoopThread,
    routes: set[Route],
    metrics: prometheus.Exports,
    state: State,
    watchers: list[DnsWatcher],
) -> None:
    """A router nobody holds any more: stop its threads without waiting (runs from the garbage collector)."""
    for watcher in watchers:
        watcher.halt()
    metrics.halt()
    prober.halt()
    state.halt()
    if scraper is not None:
        scraper.halt()
    loop_thread.stop(wait=False)
    for route in list(routes):
        with contextlib.suppress(Exception):
            route.close()


async def _ascraped(admission: Admission, route: Route) -> None:
    admission.scraped(route, await route.ascrape_load())


def make_route(name: str, cfg: Any, config: Config) -> Route:
    if cfg.api == "ollama":
        from .endpoints.ollama import OllamaRoute

        return OllamaRoute(name, cfg, config)
    return Route(name, cfg, config)


def _completion_tokens(response: ChatCompletion) -> int | None:
    return response.usage.completion_tokens if response.usage is not None else None

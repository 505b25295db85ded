"""One endpoint: its SDK clients, timeouts, breaker, last probe result and live statistics.

``Route`` speaks the OpenAI-compatible API (vLLM, llama.cpp, OpenAI, Ollama's ``/v1``). Its
transport methods (``create``, ``acreate``, ``open_stream``, ``aopen_stream``; ``embed`` and
``aembed`` on routes of kind embedding) and ``_probe_models`` are the seam another API plugs into
(``OllamaRoute`` in ``ollama.py``): everything above them, failover, breakers and statistics, stays
one piece of code. Its pieces live beside it: the SDK clients (one per event loop) in ``clients.py``,
the checks on answers in ``answers.py``, what a probe found and does in ``probe.py``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import openai
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from .. import forks
from ..admission.limit import ConcurrencyLimit
from ..bounds import watched_transport
from ..fleet.state import Elsewhere
from ..secrets import MASK, redact_url, split_credentials
from ..telemetry.stats import RouteStats
from .answers import checked, checked_embeddings
from .clients import KEEPALIVE_S, LIMITS, SDK_HTTPX, AsyncChunkStream, ChunkStream, PerLoop, prepared, tls_context
from .health import CircuitBreaker
from .probe import Listed, ProbeResult, context_window, model_entry, record_probe

if TYPE_CHECKING:
    from ...config import Config, RouteConfig
    from ..balancing.server_load import LoadReport
    from ..lease import Lease

__all__ = [
    "KEEPALIVE_S",
    "LIMITS",
    "MIN_MASKED_KEY",
    "SDK_HTTPX",
    "AsyncChunkStream",
    "ChunkStream",
    "PerLoop",
    "ProbeResult",
    "Route",
    "RouteListener",
    "checked",
    "checked_embeddings",
]

log = logging.getLogger("anorag_integrations.router")

MAX_MODEL_NAME = 256
"""Longest model name taken from a server's listing (longer ones are no names: left out)."""
MAX_LISTED = 1024
"""Most names taken from one server's listing (served names and adapters; the rest are left out, with a warning)."""
MIN_MASKED_KEY = 6
"""Shorter api keys ("EMPTY" and the like) are placeholders, not secrets: masking them would garble text."""


class RouteListener(Protocol):
    """What shares a route's throttling and probe results with other replicas (``state.py``); local memory only."""

    def throttled(self, route: str) -> None:
        """``route`` sent a ``Retry-After``: its ``not_before`` moved later."""
        ...

    def probed(self, route: str) -> None:
        """``route`` has a new ``probe_result``."""
        ...


class Route:
    """An OpenAI-compatible server serving ``model`` at ``base_url``; the SDK's own retries are off."""

    def __init__(self, name: str, cfg: RouteConfig, config: Config) -> None:
        self.name = name
        self.kind = cfg.kind
        """What the route serves: "chat" or "embedding" (a call only goes to routes of its kind)."""
        self.base_url = redact_url(cfg.base_url)
        """Shown in errors, logs, ``stats()``, ``health()`` and reprs: credentials masked as ``***@``."""
        self._url, credentials = split_credentials(cfg.base_url)
        """What the clients request: ``base_url`` without userinfo, whose credentials go as basic auth."""
        self._auth = credentials  # (user, password): basic auth in httpx, httpx2 and Ollama's client alike
        parts = urlsplit(self._url)
        self.address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        """The server's host and port, without credentials (``server.address`` / ``server.port`` on spans)."""
        self.model = cfg.model
        self.aliases = frozenset(cfg.aliases)
        """Names callers may use for ``model`` (``aliases:``): the route sends ``model`` for them."""
        self.listed: frozenset[str] = frozenset()
        """The names the server listed at its last ``/v1/models`` (served-name aliases, LoRA adapters)."""
        self.parents: dict[str, str] = {}
        """Listed names that are adapters (LoRA), with the model each adapts (vLLM's ``parent``)."""
        self.dropped: dict[str, float] = {}
        """Names the server answered 404 for (wall time): out of the route's groups until listed again (replaced
        under ``_names_lock``, never changed in place)."""
        self._names_lock = forks.lock()
        self.models_changed: Callable[[], None] = _nothing
        """Told when the names the route serves change (the router's model catalog rebuilds its groups)."""
        self.weight = cfg.weight
        self.timeout = cfg.timeout or config.params.timeout
        self.configured_max_model_len = cfg.max_model_len
        self.probe_timeout = config.health.probe_timeout
        self._api_key = cfg.api_key
        self._client: openai.OpenAI | None = None
        self._connect(cfg)
        self.breaker = CircuitBreaker(config.health.failure_threshold, config.health.cooldown)
        self.breaker.name = name
        self.listener: RouteListener | None = None
        """Shared state told of throttling and probe results (None: this process alone)."""
        self.elsewhere = Elsewhere()
        """What the fleet's other replicas report about this route (shared state only)."""
        self.stats = RouteStats()
        self.leases: set[Lease] = set()
        """The attempts in flight here (``cut_in_flight`` ends them when the server stops listening)."""
        self.probe_result = ProbeResult()
        self.peeked = False
        """Whether a call already read the context window (:meth:`peek_context_window`), found or not."""
        self.peeked_max_model_len: int | None = None
        self.not_before = 0.0
        """Monotonic time before which the route is skipped (a ``Retry-After`` it sent)."""
        self.load: LoadReport | None = None
        """The server's queue at the last ``/metrics`` scrape (``least_queue``); None: no data."""
        self.continue_streams = cfg.continue_streams
        admission = config.admission
        self.limit = ConcurrencyLimit(
            cfg.max_concurrency, admission.initial_limit, admission.max_limit, admission.tolerance
        )
        """How many attempts the route is sent at once (``admission/``; counted under the router's admission lock)."""
        self.send_priority = cfg.send_priority
        """Whether calls' ``priority`` goes on to the server (vLLM ``--scheduling-policy priority``)."""
        self.propagate = cfg.propagate
        """The trace headers a traced attempt sends this route (``propagate:``; see ``tracing.carrier``)."""

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    missing_model_hint = "set the route's model to a served name, or start the server with --served-model-name"

    def _connect(self, cfg: RouteConfig) -> None:
        """Prepare the SDK clients, built on first use (a client costs milliseconds; fleets can be large)."""
        key = self._api_key.get_secret_value()
        self._aclients = PerLoop(
            lambda: openai.AsyncOpenAI(
                base_url=self._url,
                api_key=key,
                max_retries=0,
                timeout=self.timeout,
                http_client=openai.DefaultAsyncHttpxClient(limits=LIMITS, auth=self._auth, verify=tls_context()),
            ),
            lambda client: client.close(),
        )

    @property
    def client(self) -> openai.OpenAI:
        """The sync client, built on first use and kept for the route's life so its connections are pooled."""
        client = self._client
        if client is None:
            with forks.building():
                if self._client is None:
                    self._client = prepared(self._sync_client())
                client = self._client
        return client

    def _sync_client(self) -> openai.OpenAI:
        key = self._api_key.get_secret_value()
        return openai.OpenAI(
            base_url=self._url,
            api_key=key,
            max_retries=0,
            timeout=self.timeout,
            http_client=openai.DefaultHttpxClient(
                transport=watched_transport(SDK_HTTPX, limits=LIMITS, verify=tls_context()), auth=self._auth
            ),
        )

    @property
    def aclient(self) -> openai.AsyncOpenAI:
        """The async client of the running event loop."""
        return self._aclients.get()

    # --- transport: one request, no retries (the router owns those) ---------------------------------

    def create(self, body: dict[str, Any], timeout: float) -> ChatCompletion:
        return checked(self.client.chat.completions.create(**body, timeout=timeout))

    async def acreate(self, body: dict[str, Any], timeout: float) -> ChatCompletion:
        return checked(await self.aclient.chat.completions.create(**body, timeout=timeout))

    def open_stream(self, body: dict[str, Any], timeout: float) -> ChunkStream:
        stream: ChunkStream = self.client.chat.completions.create(**body, stream=True, timeout=timeout)
        return stream

    async def aopen_stream(self, body: dict[str, Any], timeout: float) -> AsyncChunkStream:
        stream: AsyncChunkStream = await self.aclient.chat.completions.create(**body, stream=True, timeout=timeout)
        return stream

    def embed(self, body: dict[str, Any], timeout: float) -> CreateEmbeddingResponse:
        response = self.client.embeddings.create(**body, timeout=timeout)
        return checked_embeddings(response, len(body["input"]), self.model)

    async def aembed(self, body: dict[str, Any], timeout: float) -> CreateEmbeddingResponse:
        response = await self.aclient.embeddings.create(**body, timeout=timeout)
        return checked_embeddings(response, len(body["input"]), self.model)

    @property
    def max_model_len(self) -> int | None:
        """Context window: what the server reported (``/v1/models``) when it is one, else the configured value.

        A reported value is taken through ``context_window`` here too: a probe result adopted from
        another replica (shared state) was never checked by this one.
        """
        return (
            context_window(self, self.probe_result.max_model_len)
            or context_window(self, self.peeked_max_model_len)
            or self.configured_max_model_len
        )

    def peek_context_window(self, timeout: float) -> None:
        """Read the context window from ``/v1/models`` once, within ``timeout``; any failure leaves it unknown.

        For a call that wants it before sending: unlike :meth:`probe` it never counts against the
        route (its breaker is the requests' and the prober's business).
        """
        self.peeked = True
        with contextlib.suppress(Exception):
            self.peeked_max_model_len = context_window(self, _window(self._list(timeout), self.model))

    async def apeek_context_window(self, timeout: float) -> None:
        """Async twin of :meth:`peek_context_window`."""
        self.peeked = True
        with contextlib.suppress(Exception):
            self.peeked_max_model_len = context_window(self, _window(await self._alist(timeout), self.model))

    def throttle(self, wait_s: float) -> None:
        """Skip the route for ``wait_s`` seconds from now (it sent a ``Retry-After``); the fleet is told."""
        self.not_before = max(self.not_before, time.monotonic() + wait_s)
        if self.listener is not None:
            self.listener.throttled(self.name)

    @property
    def outstanding(self) -> int:
        """Requests in flight on the route: this replica's, plus the other replicas' with shared state."""
        return self.stats.in_flight + self.elsewhere.in_flight

    def latency_estimate(self) -> float | None:
        """The moving-average latency ``least_latency`` ranks by: this replica's, averaged with the fleet's."""
        own = self.stats.ewma_latency_s
        others = self.elsewhere
        if not others.latency_n:
            return own
        if own is None:
            return others.latency_sum / others.latency_n
        return (own + others.latency_sum) / (1 + others.latency_n)

    def cut_in_flight(self, reason: str) -> None:
        """The server stopped listening (connection refused): its attempts in flight will never be answered (vLLM
        keeps their connections open after SIGTERM), so end them now: their calls fail over or continue."""
        leases = list(self.leases)
        if leases:
            log.warning("route %r (%s): %s; cutting its %d attempts in flight", self.name, self.base_url, reason,
                        len(leases))  # fmt: skip
        for lease in leases:
            lease.cut(reason)

    def available(self, now: float) -> bool:
        """Whether the route may be offered to the policy now."""
        return now >= self.not_before and self.breaker.available()

    @property
    def server_root(self) -> str:
        """The server's root URL (``/health`` and ``/metrics`` live there, not under ``/v1``)."""
        parts = urlsplit(self._url)
        path = parts.path[: -len("/v1")] if parts.path.endswith("/v1") else parts.path
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    # --- active probing -------------------------------------------------------------------------

    def probe(self) -> ProbeResult:
        """Ask the server whether it is up and what it serves; update the breaker."""
        started = time.perf_counter()
        try:
            models = self._probe_models()
        except Exception as exc:  # whatever the server sent, the route is unhealthy, not the prober dead
            return record_probe(self, started, [], exc)
        return record_probe(self, started, models, None)

    async def aprobe(self) -> ProbeResult:
        """Async twin of :meth:`probe`."""
        started = time.perf_counter()
        try:
            models = await self._aprobe_models()
        except Exception as exc:
            return record_probe(self, started, [], exc)
        return record_probe(self, started, models, None)

    def _probe_models(self) -> list[Listed]:
        """``GET /health`` (``/v1/models`` answers for it when 404), then the served models."""
        options: Any = {"timeout": self.probe_timeout}
        with contextlib.suppress(openai.NotFoundError):
            self.client.get(f"{self.server_root}/health", cast_to=object, options=options)
        return self._list(self.probe_timeout)

    async def _aprobe_models(self) -> list[Listed]:
        options: Any = {"timeout": self.probe_timeout}
        with contextlib.suppress(openai.NotFoundError):
            await self.aclient.get(f"{self.server_root}/health", cast_to=object, options=options)
        return await self._alist(self.probe_timeout)

    def _list(self, timeout: float) -> list[Listed]:
        """The served models (``GET /v1/models``): the seam another API replaces with its own listing."""
        return [model_entry(m) for m in self.client.models.list(timeout=timeout).data]

    async def _alist(self, timeout: float) -> list[Listed]:
        return [model_entry(m) for m in (await self.aclient.models.list(timeout=timeout)).data]

    # --- load scraping (least_queue) ---------------------------------------------------------------

    def scrape_load(self) -> LoadReport | None:
        """Read the server's queue from ``/metrics``; None (and ``load`` cleared) when it cannot."""
        in_flight = self.stats.in_flight
        try:
            text = self.client.get(f"{self.server_root}/metrics", cast_to=str, options=self._scrape_options)
        except Exception:  # no usable /metrics: the policy falls back to in-flight counts
            text = ""
        return self._scraped(text, in_flight)

    async def ascrape_load(self) -> LoadReport | None:
        """Async twin of :meth:`scrape_load`."""
        in_flight = self.stats.in_flight
        try:
            text = await self.aclient.get(f"{self.server_root}/metrics", cast_to=str, options=self._scrape_options)
        except Exception:
            text = ""
        return self._scraped(text, in_flight)

    @property
    def _scrape_options(self) -> Any:
        return {"timeout": self.probe_timeout}

    def _scraped(self, text: str, in_flight: int) -> LoadReport | None:
        from ..balancing.server_load import parse_load

        try:
            self.load = parse_load(text, in_flight) if isinstance(text, str) and text else None
        except Exception:  # not Prometheus text (a proxy's error page, say)
            self.load = None
        return self.load

    def serves(self, models: list[str]) -> bool:
        return self.model in models

    # --- the model names the route serves (model groups, ``models.py``) ---------------------------------

    def served_names(self) -> frozenset[str]:
        """Its model, its aliases and what its server lists, less the names the server answered 404 for (the
        aliases go with the model: they are sent as it)."""
        names = self.aliases | self.listed | {self.model}
        dropped = self.dropped  # replaced, never changed in place: a consistent snapshot
        if not dropped:
            return names
        return names.difference(dropped, self.aliases if self.model in dropped else ())

    def listed_models(self, listing: Sequence[Listed], at: float) -> None:
        """The server's ``/v1/models`` (seen at wall time ``at``): its names join the route's groups, and a name
        dropped (404) before ``at`` is back. Names that are no names (too long, past ``MAX_LISTED``) are left out."""
        kept = [entry for entry in listing if 0 < len(entry.name) <= MAX_MODEL_NAME][:MAX_LISTED]
        if len(kept) < len(listing):
            log.warning(
                "route %r (%s): its server lists %d models; %d kept (names of 1 to %d characters, at most %d)",
                self.name, self.base_url, len(listing), len(kept), MAX_MODEL_NAME, MAX_LISTED,
            )  # fmt: skip
        names = frozenset(self._listed_names(entry.name for entry in kept))
        parents = {entry.name: entry.parent for entry in kept if entry.parent and entry.parent != entry.name}
        with self._names_lock:
            dropped = {name: when for name, when in self.dropped.items() if name not in names or when > at}
            changed = names != self.listed or len(dropped) != len(self.dropped)
            self.listed, self.parents, self.dropped = names, parents, dropped
        if changed:
            self.models_changed()

    def _listed_names(self, names: Iterable[str]) -> Iterable[str]:
        """The names a listing makes callable (Ollama's route adds each tag's name without ``:latest``)."""
        return names

    def unknown_model_fix(self, name: str) -> str | None:
        """How this kind of server is made to serve ``name``, for an error saying nobody does (None: nothing
        beyond restarting it with another ``--served-model-name``, which the error says already)."""
        return None

    def drop_model(self, name: str) -> bool:
        """The server answered 404 for ``name``: the route leaves that name's group (if it was not out already).
        False: the route was never thought to serve it."""
        with self._names_lock:
            if name in self.dropped:
                return True  # a concurrent request's 404 took it out first
            if name not in self.served_names():
                return False
            self.dropped = {**self.dropped, name: time.time()}
        self.models_changed()
        return True

    async def alist_models(self, timeout: float) -> None:
        """Read ``/v1/models`` once (a name nobody is known to serve, a name dropped a while ago); never counted
        against the route, and any failure leaves what it serves as it was."""
        at = time.time()
        with contextlib.suppress(Exception):
            self.listed_models(await self._alist(timeout), at)

    def masked(self, text: str) -> str:
        """``text`` with this route's api key (a server may echo it in an error) and URL credentials masked."""
        key = self._api_key.get_secret_value()
        if len(key) >= MIN_MASKED_KEY:
            text = text.replace(key, MASK)
        return redact_url(text)

    # --- lifecycle -------------------------------------------------------------------------------

    def renew_after_fork(self) -> None:
        """In a forked child: new clients (no pooled connection read by both processes), and none of the
        parent's calls in flight: no in-flight count, no half-open trial held."""
        self._client = None  # the sync client, built again on first use
        self._renew_clients()
        self.stats.renew_after_fork()
        self.breaker.renew_after_fork()
        self.limit.in_flight = self.limit.reserved = 0

    def _renew_clients(self) -> None:
        """Those :meth:`_connect` prepared (the sync client is dropped above)."""
        self._aclients.renew_after_fork()

    def close(self) -> None:
        if self._client is not None:  # built only if it was used
            self._client.close()

    async def aclose(self) -> None:
        """Close this loop's async client (those of other loops close with their loops)."""
        await self._aclients.aclose()

    def release(self) -> None:
        """The route left the router and its last request ended: close its clients, on every loop."""
        with contextlib.suppress(Exception):
            self.close()
        self._aclients.close_all()


def _window(listing: Iterable[Listed], model: str) -> object:
    """The context window a listing reports for ``model`` (None: not listed, or not said)."""
    return next((entry.max_model_len for entry in listing if entry.name == model), None)


def _nothing() -> None:
    """A route outside any router: nobody to tell that its names changed."""

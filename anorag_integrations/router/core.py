"""Router: sends each request to one of several routes, failing over and retrying as configured.

One request runs in *rounds* (``1 + max_retries``). In a round the policy picks among the routes
available now; a transient failure moves the request to the next pick, a permanent one is raised at
once; ``fallback_route`` is tried last. The first round runs without tenacity (a request served
at once pays nothing for retrying); later rounds run under tenacity, which waits between them
(exponential with jitter, at least any ``Retry-After``), all bounded by the request ``deadline``.
Streams fail over the same way until their first chunk with content has been delivered; after that
a failure continues the answer on a route with ``continue_streams`` (vLLM's
``continue_final_message``), else raises ``StreamInterruptedError`` with exactly what was delivered.
With ``hedge`` configured, a non-streaming request still unanswered after the threshold is raced
against a copy on another route (see ``hedge.py``).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any, TypeVar

import openai
from openai.resources.chat.completions import Completions
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_random_exponential,
)

from .errors import (
    AllRoutesFailed,
    Attempt,
    PermanentRouteError,
    RouteError,
    RouterError,
    StreamCut,
    StreamInterruptedError,
    classify,
    trips_breaker,
)
from .health import BreakerState, Poller, Prober
from .hedge import Hedger
from .policies import make_policy, stable_hash
from .route import Route

if TYPE_CHECKING:
    from ..config import Config

BACKOFF_INITIAL_S = 0.25
"""Scale of the first wait between rounds (tenacity's random exponential)."""
BACKOFF_MAX_S = 8.0
"""Longest wait between two rounds, unless a ``Retry-After`` asks for more."""

SDK_PARAMS = frozenset(inspect.signature(Completions.create).parameters) - {"self", "messages", "model", "stream"}
"""Keyword arguments the openai SDK accepts; any other goes into ``extra_body`` (vLLM's extras)."""

log = logging.getLogger("anorag_integrations.router")
_T = TypeVar("_T")
Messages = Iterable[Mapping[str, Any]]


@dataclass(slots=True)
class CallInfo:
    """How the router served one request: read it with :func:`call_info` on a response or chunk."""

    route: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    rounds: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    hedge: str | None = None
    """The route a hedged copy of the request went to (None: not hedged)."""
    continued: int = 0
    """Times a cut stream was continued on another route (``continue_streams``)."""


_INFO_ATTR = "_anorag_call"


def call_info(obj: ChatCompletion | ChatCompletionChunk) -> CallInfo | None:
    """The :class:`CallInfo` the router attached to a response or a stream chunk, if any."""
    return getattr(obj, _INFO_ATTR, None)


def _attach(obj: _T, info: CallInfo) -> _T:
    object.__setattr__(obj, _INFO_ATTR, info)  # a plain attribute: model_dump() stays the SDK's
    return obj


def _has_payload(chunk: ChatCompletionChunk) -> bool:
    """Whether a chunk carries something the caller must see (text, reasoning, tools, finish, usage)."""
    if chunk.usage is not None:
        return True
    for choice in chunk.choices:
        delta = choice.delta
        extra = delta.model_extra or {}
        if (
            choice.finish_reason
            or delta.content
            or delta.tool_calls
            or extra.get("reasoning")
            or extra.get("reasoning_content")
        ):
            return True
    return False


_SHARED: dict[tuple[object, ...], Router] = {}
_SHARED_LOCK = threading.Lock()


class _Call:
    """The state of one request across its attempts."""

    def __init__(self, router: Router, messages: Messages, params: dict[str, Any], *, stream: bool) -> None:
        cfg = router.config.params
        self.started = time.monotonic()
        self.pinned: Route | None = None
        name = params.pop("route", None)
        if name is not None:
            try:
                self.pinned = router.routes[name]
            except KeyError:
                raise ValueError(f"unknown route {name!r}; routes: {', '.join(router.routes)}") from None
        self.timeout: float | None = params.pop("timeout", None)
        self.max_retries: int = params.pop("max_retries", None)
        if self.max_retries is None:
            self.max_retries = cfg.max_retries
        deadline = params.pop("deadline", None) or cfg.deadline
        self.deadline = None if deadline is None else self.started + deadline
        self.model: str | None = params.pop("model", None)
        for key in ("temperature", "max_tokens", "top_p"):
            default = getattr(cfg, key)
            if default is not None and key not in params:
                params[key] = default
        extra = {k: params.pop(k) for k in list(params) if k not in SDK_PARAMS}
        if extra:
            params["extra_body"] = {**extra, **(params.get("extra_body") or {})}
        if stream:
            params.setdefault("stream_options", {"include_usage": True})
        params["messages"] = list(messages)
        self.body = params
        self.info = CallInfo()
        self.retry_after = 0.0
        self.avoid: frozenset[str] = frozenset()
        """Routes this call must not use (a hedged copy avoids the original's route)."""
        self.active: Route | None = None
        """The route of the attempt in progress."""
        self.continuing = False
        """Only routes with ``continue_streams: true`` may take this call (it continues a cut stream)."""
        self._prefix: tuple[int, int] | None = None

    def _twin(self, avoid: frozenset[str]) -> _Call:
        """The same request as a fresh call: one round, on any route but those in ``avoid``."""
        twin = copy.copy(self)
        twin.info, twin.retry_after, twin.active = CallInfo(), 0.0, None
        twin.max_retries, twin.avoid = 0, avoid
        return twin

    def hedge_copy(self, avoid: Route) -> _Call:
        """The request for a hedged copy, on any route but ``avoid``."""
        return self._twin(self.avoid | {avoid.name})

    def continuation(self, delivered: str, delivered_tokens: int, avoid: set[str]) -> _Call:
        """The request that continues a cut stream: the delivered text as a final assistant message.

        vLLM's ``continue_final_message`` (with ``add_generation_prompt: false``) makes the model go on
        from the end of that message, so the caller's stream resumes without repeating text. Token
        limits shrink by the content chunks already delivered (about one token each).
        """
        twin = self._twin(self.avoid | avoid)
        twin.continuing = True
        body = dict(self.body)
        body["messages"] = [*self.body["messages"], {"role": "assistant", "content": delivered}]
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        body["extra_body"] = {**(body.get("extra_body") or {}), **extra}
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = max(1, body[key] - delivered_tokens)
        twin.body = body
        return twin

    def prefix_key(self, chars: int) -> int:
        """A stable hash of the conversation's first ``chars`` characters (roles and text)."""
        if self._prefix is None or self._prefix[0] != chars:
            parts: list[str] = []
            size = 0
            for message in self.body["messages"]:
                text = f"{message.get('role')}\x1f{_text(message.get('content'))}\x1e"
                parts.append(text)
                size += len(text)
                if size >= chars:
                    break
            self._prefix = (chars, stable_hash("".join(parts)[:chars]))
        return self._prefix[1]

    def body_for(self, route: Route) -> dict[str, Any]:
        return {**self.body, "model": self.model or route.model}

    def start_round(self) -> None:
        self.info.rounds += 1
        self.retry_after = 0.0

    def attempt_timeout(self, route: Route) -> float:
        timeout = self.timeout or route.timeout
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.exhausted("deadline exceeded")
        return min(timeout, left)

    def exhausted(self, reason: str | None = None) -> AllRoutesFailed:
        if reason is None:
            reason = (
                "every available route failed"
                if self.info.attempts
                else "no route available (all circuit breakers open)"
            )
        return AllRoutesFailed(self.info.attempts, reason)


_BACKOFF = wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)


@dataclass(slots=True)
class _Round:
    """What tenacity's backoff reads of a retry state: the number of the attempt that failed."""

    attempt_number: int


class _Policy:
    """Tenacity's stop and wait for the rounds after the first (tenacity's attempt n is round n + 1)."""

    def __init__(self, call: _Call) -> None:
        self.call = call

    def before_round(self, round_: int) -> float:
        """Seconds to wait before ``round_`` (>= 2): backoff, at least any ``Retry-After``, within the deadline."""
        wait = max(_BACKOFF(_Round(round_ - 1)), self.call.retry_after)  # type: ignore[arg-type]
        if self.call.deadline is not None:
            wait = min(wait, max(0.0, self.call.deadline - time.monotonic()))
        return wait

    def wait(self, state: RetryCallState) -> float:
        return self.before_round(state.attempt_number + 2)

    def stop(self, state: RetryCallState) -> bool:
        return self._over(state.attempt_number, state.upcoming_sleep)

    def second_round(self) -> float | None:
        """Seconds to wait before round 2, or None when the request may not have one."""
        wait = self.before_round(2)
        return None if self._over(0, wait) else wait

    def _over(self, retries_done: int, upcoming_sleep: float) -> bool:
        call = self.call
        if retries_done >= call.max_retries:
            return True
        return call.deadline is not None and time.monotonic() + upcoming_sleep >= call.deadline

    def retrying(self, kind: type[_T]) -> _T:
        return kind(stop=self.stop, wait=self.wait, retry=retry_if_exception_type(AllRoutesFailed), reraise=True)  # type: ignore[call-arg]


@dataclass(slots=True)
class _Opened:
    """A stream whose first content chunk has arrived: the chunks so far and the rest to read."""

    stream: Any
    pending: list[ChatCompletionChunk]
    ttft_s: float


class Router:
    """Routes chat completions over the configured servers (see the module docstring)."""

    def __init__(self, config: Config, *, start_prober: bool = True) -> None:
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
        self._hedge_loop: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._lock = threading.Lock()
        if start_prober:
            self._background(Poller.start)

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
        given, replaces the key of every route.
        """
        from ..config import config_file, config_from_dict, load_config

        if base_url is not None:
            key: tuple[object, ...] = ("url", base_url, model, api_key)
        else:
            file = config_file(config_path)
            key = ("file", str(file.resolve()) if file.is_file() else "", api_key)  # "": the environment alone
        with _SHARED_LOCK:
            router = _SHARED.get(key)
            if router is None:
                if base_url is not None:
                    if not model:
                        raise ValueError("base_url needs model= (the server's --served-model-name)")
                    route = {"base_url": base_url, "model": model, **({"api_key": api_key} if api_key else {})}
                    config = config_from_dict({"llm": {"routes": {"default": route}}}, source="arguments", env={})
                else:
                    config = load_config(config_path)
                    if api_key is not None:
                        config = config.with_api_key(api_key)
                router = _SHARED[key] = cls(config)
            return router

    def __repr__(self) -> str:
        return f"Router(routes={list(self.routes)}, lb_policy={self.config.lb_policy!r}, source={self.config.source!r})"

    # --- public API -------------------------------------------------------------------------------

    def chat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """One chat completion; ``route=`` pins a route, other keywords go to the server."""
        call = _Call(self, messages, params, stream=False)
        if self._hedges(call):  # the race needs cancellable requests: run it on the router's loop
            future = asyncio.run_coroutine_threadsafe(self._ahedged(call), self._loop())
            try:
                return future.result()
            except BaseException:
                future.cancel()
                raise
        route, t0, response = self._rounds(call, lambda r, t: r.create(call.body_for(r), t))
        self._done(call, route, t0, usage_tokens=_completion_tokens(response))
        return _attach(response, call.info)

    async def achat(self, messages: Messages, **params: Any) -> ChatCompletion:
        """Async twin of :meth:`chat` on the routes' async clients."""
        call = _Call(self, messages, params, stream=False)
        if self._hedges(call):
            return await self._ahedged(call)
        return await self._achat(call)

    async def _achat(self, call: _Call) -> ChatCompletion:
        route, t0, response = await self._arounds(call, lambda r, t: r.acreate(call.body_for(r), t))
        self._done(call, route, t0, usage_tokens=_completion_tokens(response))
        return _attach(response, call.info)

    def stream(self, messages: Messages, **params: Any) -> Iterator[ChatCompletionChunk]:
        """Streamed chat completion; usage arrives in a last chunk unless ``stream_options`` says otherwise."""
        call = _Call(self, messages, params, stream=True)
        return self._stream(call)

    def astream(self, messages: Messages, **params: Any) -> AsyncIterator[ChatCompletionChunk]:
        """Async twin of :meth:`stream`."""
        call = _Call(self, messages, params, stream=True)
        return self._astream(call)

    def health(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Per route: healthy, breaker state, probe latency, served models (probing all now by default)."""
        if probe and self.routes:
            with ThreadPoolExecutor(max_workers=min(16, len(self.routes))) as pool:
                list(pool.map(Route.probe, self.routes.values()))
        return {name: self._health_row(route) for name, route in self.routes.items()}

    async def ahealth(self, *, probe: bool = True) -> dict[str, dict[str, Any]]:
        """Async twin of :meth:`health`."""
        if probe:
            await asyncio.gather(*(route.aprobe() for route in self.routes.values()))
        return {name: self._health_row(route) for name, route in self.routes.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per route: requests, failures, in-flight, latency and TTFT percentiles (ms), tokens/s."""
        return {
            name: {"url": r.base_url, "model": r.model, "state": str(r.breaker.state), **r.stats.snapshot()}
            for name, r in self.routes.items()
        }

    async def astart_prober(self) -> None:
        """Probe (and scrape) in tasks on the running loop instead of threads (build with ``start_prober=False``)."""
        self._background(Poller.astart)

    def close(self) -> None:
        self.prober.stop()
        if self.scraper is not None:
            self.scraper.stop()
        self._stop_loop()
        for route in self.routes.values():
            route.close()

    async def aclose(self) -> None:
        await self.prober.astop()
        if self.scraper is not None:
            await self.scraper.astop()
        self._stop_loop()
        for route in self.routes.values():
            await route.aclose()
            route.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Router:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- choosing and bookkeeping (shared by sync and async) --------------------------------------

    def _rounds(self, call: _Call, send: Callable[[Route, float], _T]) -> tuple[Route, float, _T]:
        """Every round of one request until a route answers: the first plainly, the rest under tenacity."""
        try:
            return self._round(call, send)
        except AllRoutesFailed:
            policy = _Policy(call)
            if (wait := policy.second_round()) is None:
                raise
        time.sleep(wait)
        for attempt in policy.retrying(Retrying):
            with attempt:
                return self._round(call, send)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _arounds(self, call: _Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Route, float, _T]:
        """Async twin of :meth:`_rounds`."""
        try:
            return await self._around(call, send)
        except AllRoutesFailed:
            policy = _Policy(call)
            if (wait := policy.second_round()) is None:
                raise
        await asyncio.sleep(wait)
        async for attempt in policy.retrying(AsyncRetrying):
            with attempt:
                return await self._around(call, send)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _select(self, call: _Call, tried: set[str]) -> Route | None:
        """The next route to try in this round, or None when the round is exhausted."""
        if call.pinned is not None:
            return None if call.pinned.name in tried else call.pinned
        now = time.monotonic()
        lost: set[str] = set()  # half-open trials a concurrent request took first

        def usable(route: Route) -> bool:
            return (
                route.name not in tried
                and route.name not in lost
                and route.available(now)
                and (route.continue_streams or not call.continuing)
            )

        while (route := self.policy.pick(self._primary, usable, call)) is not None:
            if route.breaker.acquire():
                return route
            lost.add(route.name)
        fb = self._fallback
        if fb is not None and usable(fb) and fb.breaker.acquire():
            return fb
        return None

    def _failed(self, call: _Call, route: Route, exc: BaseException, t0: float) -> RouteError:
        """Record a failed attempt; raise at once when no other route would do better."""
        error = classify(
            exc,
            route=route.name,
            url=route.base_url,
            model=call.model or route.model,
            timeout=call.timeout or route.timeout,
        )
        route.stats.failed(f"{type(error).__name__}: {error.message}")
        if trips_breaker(error):
            was_open = route.breaker.state is BreakerState.OPEN
            route.breaker.record_failure()
            if not was_open and route.breaker.state is BreakerState.OPEN:
                log.warning("route %r: circuit breaker opened after: %s", route.name, error)
        else:
            route.breaker.release()
        if error.retry_after is not None:
            route.not_before = time.monotonic() + error.retry_after
            call.retry_after = max(call.retry_after, error.retry_after)
        call.info.attempts.append(Attempt(route.name, error, time.perf_counter() - t0, call.info.rounds))
        if isinstance(error, PermanentRouteError):
            raise error from exc
        log.info("failing over: %s", error)
        return error

    @staticmethod
    def _abandoned(route: Route) -> None:
        route.stats.abandoned()
        route.breaker.release()

    def _done(
        self, call: _Call, route: Route, t0: float, *, usage_tokens: int | None, ttft_s: float | None = None
    ) -> None:
        latency = time.perf_counter() - t0
        if (route is self._fallback) != self._on_fallback:  # log the switch once, not every request
            self._on_fallback = route is self._fallback
            if self._on_fallback:
                log.warning(
                    "no primary route available: serving from fallback route %r (%s)", route.name, route.base_url
                )
            else:
                log.warning("primary routes are back: %r served a request", route.name)
        route.stats.succeeded(latency, ttft_s=ttft_s, output_tokens=usage_tokens)
        route.breaker.record_success()
        call.info.route, call.info.latency_s, call.info.ttft_s = route.name, latency, ttft_s

    def _attempts(self, call: _Call) -> Iterator[tuple[Route, float, float]]:
        """One round: each route to try, with its attempt timeout and start time."""
        call.start_round()
        tried: set[str] = set(call.avoid)
        while (route := self._select(call, tried)) is not None:
            tried.add(route.name)
            call.active = route
            timeout = call.attempt_timeout(route)
            route.stats.started()
            yield route, timeout, time.perf_counter()

    def _round(self, call: _Call, send: Callable[[Route, float], _T]) -> tuple[Route, float, _T]:
        for route, timeout, t0 in self._attempts(call):
            try:
                result = send(route, timeout)
            except (openai.APIError, RouteError) as exc:
                self._failed(call, route, exc, t0)
            except BaseException:
                self._abandoned(route)
                raise
            else:
                call.info.route = route.name  # streams: known from the first chunk on
                return route, t0, result
        raise call.exhausted()

    async def _around(self, call: _Call, send: Callable[[Route, float], Awaitable[_T]]) -> tuple[Route, float, _T]:
        for route, timeout, t0 in self._attempts(call):
            try:
                result = await send(route, timeout)
            except (openai.APIError, RouteError) as exc:
                self._failed(call, route, exc, t0)
            except BaseException:
                self._abandoned(route)
                raise
            else:
                call.info.route = route.name
                return route, t0, result
        raise call.exhausted()

    def _health_row(self, route: Route) -> dict[str, Any]:
        probe = route.probe_result
        state = route.breaker.state
        return {
            "url": route.base_url,
            "model": route.model,
            "healthy": state is not BreakerState.OPEN and probe.healthy is not False,
            "state": str(state),
            "latency_ms": probe.latency_ms,
            "models": list(probe.models),
            "max_model_len": probe.max_model_len,
            "error": probe.error or route.stats.last_error,
            "checked_at": probe.checked_at,
        }

    # --- hedging ------------------------------------------------------------------------------------

    def _hedges(self, call: _Call) -> bool:
        """Whether this request may be hedged (hedging on, more than one route, not pinned)."""
        return self.hedger is not None and call.pinned is None and len(self._primary) > 1

    async def _ahedged(self, call: _Call) -> ChatCompletion:
        """Race the request against a copy on another route sent after the threshold; cancel the loser."""
        hedger = self.hedger
        assert hedger is not None
        hedger.earn()
        first: asyncio.Future[ChatCompletion] = asyncio.ensure_future(self._achat(call))
        await asyncio.sleep(0)  # the task picks its route before its first await
        delay = hedger.delay(call.active) if call.active is not None else None
        if delay is None:
            return await _shielded(first)
        done, _ = await asyncio.wait({first}, timeout=delay)
        if done or call.active is None or not hedger.spend():
            return await _shielded(first)
        twin = call.hedge_copy(avoid=call.active)
        second: asyncio.Future[ChatCompletion] = asyncio.ensure_future(self._achat(twin))
        owner = {first: call, second: twin}
        pending, winner = {first, second}, first  # both failing: the original's error is raised
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                settled = [t for t in done if t.exception() is None or isinstance(t.exception(), PermanentRouteError)]
                if settled:
                    winner = settled[0]
                    break
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)  # let the loser record itself as abandoned
        return self._hedge_result(winner, owner[winner], call, twin)

    def _hedge_result(
        self, winner: asyncio.Future[ChatCompletion], by: _Call, call: _Call, twin: _Call
    ) -> ChatCompletion:
        """The winner's response (or error), its info telling both calls' attempts and the hedge route."""
        assert self.hedger is not None
        if twin.active is None:
            self.hedger.refund()  # the copy found no other route to go to
        else:
            twin.active.stats.hedged(won=by is twin and winner.exception() is None)
        by.info.attempts = call.info.attempts + twin.info.attempts
        by.info.hedge = twin.active.name if twin.active is not None else None
        return _attach(winner.result(), by.info)

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The router's own event loop thread, started on first use (sync calls that hedge run there)."""
        with self._lock:
            if self._hedge_loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="anorag-hedge-loop", daemon=True)
                thread.start()
                self._hedge_loop = (loop, thread)
            return self._hedge_loop[0]

    def _stop_loop(self) -> None:
        with self._lock:
            started, self._hedge_loop = self._hedge_loop, None
        if started is None:
            return
        loop, thread = started

        async def close_clients() -> None:
            for route in self.routes.values():
                await route.aclose()

        asyncio.run_coroutine_threadsafe(close_clients(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    # --- streams ------------------------------------------------------------------------------------

    def _open(self, call: _Call, route: Route, timeout: float) -> _Opened:
        """Start a stream on ``route`` and read up to its first chunk with content."""
        t0 = time.perf_counter()
        stream = route.open_stream(call.body_for(route), timeout)
        pending: list[ChatCompletionChunk] = []
        try:
            for chunk in stream:
                pending.append(chunk)
                if _has_payload(chunk):
                    return _Opened(stream, pending, time.perf_counter() - t0)
        except BaseException:
            stream.close()
            raise
        raise _cut(route, "before any content")

    async def _aopen(self, call: _Call, route: Route, timeout: float) -> _Opened:
        t0 = time.perf_counter()
        stream = await route.aopen_stream(call.body_for(route), timeout)
        pending: list[ChatCompletionChunk] = []
        try:
            async for chunk in stream:
                pending.append(chunk)
                if _has_payload(chunk):
                    return _Opened(stream, pending, time.perf_counter() - t0)
        except BaseException:
            await stream.close()
            raise
        raise _cut(route, "before any content")

    def _stream(self, call: _Call) -> Iterator[ChatCompletionChunk]:
        route, t0, opened = self._rounds(call, lambda r, t: self._open(call, r, t))
        tally = _Tally()
        while True:
            try:
                for chunk in itertools.chain(opened.pending, opened.stream):
                    tally.add(chunk)
                    yield _attach(chunk, call.info)
                tally.check(route)
                break
            except (openai.APIError, RouteError) as exc:
                error, cause = self._interrupted(call, route, t0, tally, exc), exc
            except BaseException:
                self._abandoned(route)
                raise
            finally:
                opened.stream.close()
            twin, interrupted = self._continuation(call, tally, error)
            try:
                route, t0, opened = self._rounds(twin, functools.partial(self._open, twin))
            except RouterError as failed:
                raise self._not_continued(call, twin, interrupted, failed) from cause
            self._continued(call, twin, opened)
        self._done(call, route, t0, usage_tokens=tally.tokens, ttft_s=opened.ttft_s)

    async def _astream(self, call: _Call) -> AsyncIterator[ChatCompletionChunk]:
        route, t0, opened = await self._arounds(call, lambda r, t: self._aopen(call, r, t))
        tally = _Tally()
        while True:
            try:
                for chunk in opened.pending:
                    tally.add(chunk)
                    yield _attach(chunk, call.info)
                async for chunk in opened.stream:
                    tally.add(chunk)
                    yield _attach(chunk, call.info)
                tally.check(route)
                break
            except (openai.APIError, RouteError) as exc:
                error, cause = self._interrupted(call, route, t0, tally, exc), exc
            except BaseException:
                self._abandoned(route)
                raise
            finally:
                await opened.stream.close()
            twin, interrupted = self._continuation(call, tally, error)
            try:
                route, t0, opened = await self._arounds(twin, functools.partial(self._aopen, twin))
            except RouterError as failed:
                raise self._not_continued(call, twin, interrupted, failed) from cause
            self._continued(call, twin, opened)
        self._done(call, route, t0, usage_tokens=tally.tokens, ttft_s=opened.ttft_s)

    def _interrupted(self, call: _Call, route: Route, t0: float, tally: _Tally, exc: BaseException) -> RouterError:
        """A stream broke after delivery began: typed permanent error, or what was delivered."""
        tally.cut.add(route.name)
        try:
            error = self._failed(call, route, exc, t0)
        except PermanentRouteError as permanent:
            return permanent
        return StreamInterruptedError(
            route=route.name,
            url=route.base_url,
            delivered_chunks=tally.chunks,
            delivered_text="".join(tally.text),
            cause=error,
        )

    def _continuation(self, call: _Call, tally: _Tally, error: RouterError) -> tuple[_Call, StreamInterruptedError]:
        """The call that continues a cut stream elsewhere; raises ``error`` when it cannot be continued."""
        if not isinstance(error, StreamInterruptedError):
            raise error
        if not self._continuable:
            raise error  # no route has continue_streams: true (the default)
        if tally.other:
            raise error.not_continued("reasoning or tool calls had been delivered; only text can be continued")
        return call.continuation("".join(tally.text), tally.content_chunks, tally.cut), error

    @staticmethod
    def _not_continued(
        call: _Call, twin: _Call, error: StreamInterruptedError, failed: RouterError
    ) -> StreamInterruptedError:
        """``error``, saying why the continuation failed; the continuation's attempts join the call's."""
        call.info.attempts += twin.info.attempts
        reason = (
            "no other route with continue_streams: true is available"
            if isinstance(failed, AllRoutesFailed) and not twin.info.attempts
            else str(failed)
        )
        return error.not_continued(reason)

    @staticmethod
    def _continued(call: _Call, twin: _Call, opened: _Opened) -> None:
        """Splice a continuation into the caller's stream: no second role chunk, the first stream's id."""
        call.info.attempts += twin.info.attempts
        call.info.continued += 1
        call.info.route = twin.info.route
        opened.pending = [chunk for chunk in opened.pending if _has_payload(chunk)]
        log.info("stream continued on route %r after a cut", twin.info.route)


async def _shielded(task: asyncio.Future[_T]) -> _T:
    """Await ``task``; if the caller is cancelled, cancel it too and wait for it to clean up."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise


def _make_route(name: str, cfg: Any, config: Config) -> Route:
    if cfg.api == "ollama":
        from .ollama import OllamaRoute

        return OllamaRoute(name, cfg, config)
    return Route(name, cfg, config)


class _Tally:
    """What a stream has delivered so far: chunks, text of choice 0, anything else, finish and usage.

    After a continuation it also gives every chunk the first stream's id, so the caller sees one stream.
    """

    __slots__ = ("chunks", "content_chunks", "cut", "finished", "other", "stream_id", "text", "tokens")

    def __init__(self) -> None:
        self.chunks = 0
        self.content_chunks = 0
        self.text: list[str] = []
        self.other = False
        """Something besides text of choice 0 was delivered (reasoning, tool calls, other choices)."""
        self.finished = False
        self.tokens: int | None = None
        self.stream_id: str | None = None
        self.cut: set[str] = set()
        """Routes whose stream of this answer was cut."""

    def add(self, chunk: ChatCompletionChunk) -> None:
        self.chunks += 1
        if self.stream_id is None:
            self.stream_id = chunk.id
        elif self.cut:
            chunk.id = self.stream_id
        for choice in chunk.choices:
            delta = choice.delta
            if choice.index == 0 and delta.content:
                self.text.append(delta.content)
                self.content_chunks += 1
            else:
                extra = delta.model_extra or {}
                if delta.tool_calls or delta.content or extra.get("reasoning") or extra.get("reasoning_content"):
                    self.other = True
            if choice.finish_reason:
                self.finished = True
        if chunk.usage is not None:
            self.tokens = chunk.usage.completion_tokens

    def check(self, route: Route) -> None:
        if not self.finished:
            raise _cut(route, f"after {self.chunks} chunks")


def _cut(route: Route, when: str) -> StreamCut:
    return StreamCut(
        f"stream ended without a finish reason {when} (connection closed early)",
        route=route.name,
        url=route.base_url,
        hint="the server closed the connection mid-answer; check its logs",
    )


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _completion_tokens(response: ChatCompletion) -> int | None:
    return response.usage.completion_tokens if response.usage is not None else None

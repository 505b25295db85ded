"""One request across its attempts: the ``Call`` (route, bounds, retries, session) and its ``Control``.

``Call`` is built once per public call (``chat``, ``stream``, ...) from the caller's keywords and the
config's defaults; hedged copies and stream continuations are derived from it. Its bounds are the
attempt timeout, the request deadline and ``max_retries``; ``Control`` lets ``Router.close()`` end it
while it runs. What it sends is built in ``body.py``; what the caller reads afterwards
(:class:`CallInfo`, :func:`call_info`) lives in ``info.py`` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Self, TypeVar

from openai.types.chat import ChatCompletion

from .balancing.policies import stable_hash
from .balancing.prefix_index import conversation_blocks, text_blocks
from .body import Messages, chat_body, continued_body, prefix_pieces, why_unsendable
from .errors import AllRoutesFailed, ContextOverflowError, InvalidRequestError, RouterClosed
from .info import CallInfo, attach, call_info
from .loop import LoopThread, Overdue
from .telemetry import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .core import Router
    from .endpoints.route import Route
    from .lease import Lease

_T = TypeVar("_T")

__all__ = ["Call", "CallInfo", "Control", "Messages", "attach", "call_info", "wall_clock"]

SESSION_ID_CHARS = 256
"""A longer session id is kept as its SHA-256 digest (the table holds ids, not megabytes)."""


def seconds(name: str, value: object) -> float | None:
    """A caller's ``timeout`` / ``deadline``: None, or a positive finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(
            f"{name} must be a positive number of seconds (or None for the default), got {value!r}"
        )
    return float(value)


class Call:
    """The state of one request across its attempts.

    ``with call:`` spans the whole public call, hedged copies and continuations included: it starts
    the call's trace span and, at the end, counts the call's outcome and ends the span. ``enter()`` /
    ``exit()`` register each running copy with ``Router.close()``.
    """

    kind = "chat"
    """The kind of route this call goes to (``kind:`` in a route's config)."""
    operation = "chat"
    """The GenAI operation name of the call's trace span."""
    body: dict[str, Any]
    """What is sent (``model`` apart, which each route fills in: see :meth:`body_for`)."""

    def __init__(self, router: Router, messages: Messages, params: dict[str, Any], *, stream: bool) -> None:
        self._start(router, params, stream=stream)
        self.body = chat_body(router.config.params, messages, params, stream=stream)

    def _start(self, router: Router, params: dict[str, Any], *, stream: bool) -> None:
        """What every kind of call takes from the caller's keywords (route, bounds, model) and starts with."""
        cfg = router.config.params
        self.router = router
        self.stream = stream
        self.started = time.monotonic()
        self.pinned: Route | None = None
        name = params.pop("route", None)
        if name is not None:
            try:
                self.pinned = router.routes[name]
            except KeyError:
                raise InvalidRequestError(f"unknown route {name!r}; routes: {', '.join(router.routes)}") from None
            if self.pinned.kind != self.kind:
                raise InvalidRequestError(
                    f"route {name!r} serves {self.pinned.kind}, not {self.kind}; "
                    f"{self.kind} routes: {', '.join(router.config.route_names(self.kind))}"
                )
        self.timeout = seconds("timeout", params.pop("timeout", None))
        self.max_retries: int = params.pop("max_retries", None)
        if self.max_retries is None:
            self.max_retries = cfg.max_retries
        elif isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidRequestError(f"max_retries must be a whole number >= 0, got {self.max_retries!r}")
        deadline = seconds("deadline", params.pop("deadline", None)) or cfg.deadline
        self.deadline = None if deadline is None else self.started + deadline
        requested = params.pop("model", None)
        if requested is not None and (not isinstance(requested, str) or not requested):
            raise InvalidRequestError(f"model must be a non-empty model name, got {type(requested).__name__}")
        self.requested_model: str | None = requested
        """The caller's ``model=`` (None: the default route's model)."""
        self.model: str = requested or router.models.default[self.kind] or ""
        """The model group the call is served from now: the requested one, or a fallback model."""
        self.resolved = self.pinned is not None
        """Whether the call's model is known to be served (a pinned call is sent as asked)."""
        self.tried_models: list[str] = []
        """Models whose routes this call has given up on (``fallbacks``, ``context_window_fallbacks``)."""
        self.next_models: list[str] = []
        """Fallback models still to try, in order."""
        self.first_round = 0
        """The call's round count when its current model's rounds began (``max_retries`` counts per model)."""
        session = params.pop("session_id", None)
        if session is not None and (type(session) not in (str, int) or session == ""):
            raise InvalidRequestError(
                f"session_id must be non-empty text or a whole number, got {type(session).__name__}"
            )
        self.session_id: str | None = None if session is None else _session_key(session)
        """The conversation this request belongs to: it stays on one route while that route is usable."""
        priority = params.pop("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
            raise InvalidRequestError(f"priority must be a whole number (lower is served first), got {priority!r}")
        self.priority: int = priority
        """Lower is served first when calls wait for a route (vLLM's convention); sent on where ``send_priority``."""
        self.granted: Route | None = None
        """A slot on this route was handed to the call while it waited (``admission/queue.py``)."""
        self.retries = 0
        """Attempts after a failure that the retry budget paid for."""
        self.queue_key: tuple[int, int] | None = None
        """Its place in the admission queue, once it waited: kept if it must wait again."""
        self.body = {}
        self.info = CallInfo(requested_model=self.model)
        self.retry_after = 0.0
        """The longest ``Retry-After`` of the current round (seconds, already capped)."""
        self.round_attempts = 0
        self.avoid: frozenset[str] = frozenset()
        """Routes this call must not use (a hedged copy avoids the original's route)."""
        self.active: Route | None = None
        """The route of the attempt in progress."""
        self.continuing = False
        """Only routes with ``continue_streams: true`` may take this call (it continues a cut stream)."""
        self.continues_model: str | None = None
        """The model name the cut stream was sent as: the fallback route continues it only under that name."""
        self._prefix: tuple[int, int] | None = None
        self._blocks: tuple[int, tuple[int, ...]] | None = None
        self.ctl = Control()
        self.span: Span | None = None
        """The call's trace span while it is recorded (see ``tracing.py``); copies share it as their parent."""
        self.role = "request"
        """What this copy of the request is: "request", "hedge" or "continuation" (shown on attempt spans)."""
        self.failed_on: Route | None = None
        """The route whose attempt just failed transiently: the next attempt elsewhere is a failover from it."""
        self.said: dict[str, Any] | None = None
        """What the answer said about itself (model, usage), for the call's span when it ends."""
        router.retry_budget.deposit()

    def __enter__(self) -> Call:
        tracer = self.router.tracing  # tracing off, or no provider at all: two attribute reads, nothing else
        if tracer is not None and (not tracer.follows_global or tracing.otel_global._TRACER_PROVIDER is not None):
            self.span = tracer.start_call(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        info = self.info
        route = info.route or (info.attempts[-1].route if info.attempts else "")
        ended = "success" if exc is None else tracing.outcome(exc)
        if not route or route in self.router.routes:  # a route that left: its outcomes went with it
            self.router.outcomes.add(route, self.served_model(), ended)
        if self.span is not None:
            span, self.span = self.span, None
            tracing.end_call(self, span, ended, exc)

    def answered(self, response: ChatCompletion, *, hedged: bool = False) -> ChatCompletion:
        """The call's response; a hedged call's info becomes the winner's (it may be the copy's); usage traced."""
        if hedged and (info := call_info(response)) is not None:
            self.info = info
        if self.span is not None:
            tracing.answered(self, response)
        return response

    def fresh(self) -> Self:
        """A copy of this request that has not run yet (no attempts, rounds or route); same bounds and span."""
        twin = copy.copy(self)
        twin.info, twin.retry_after, twin.active = CallInfo(requested_model=self.info.requested_model), 0.0, None
        twin.round_attempts, twin.failed_on, twin.granted, twin.retries, twin.queue_key = 0, None, None, 0, None
        twin.tried_models, twin.next_models = list(self.tried_models), list(self.next_models)
        twin.first_round = 0  # its rounds count from its own start (its info is new)
        return twin

    def _twin(self, avoid: frozenset[str]) -> Call:
        """The same request as a fresh call: one round, on any route but those in ``avoid``."""
        twin = self.fresh()
        twin.max_retries, twin.avoid = 0, avoid
        return twin

    def hedge_copy(self, avoid: Route) -> Call:
        """The request for a hedged copy, on any route but ``avoid`` (it runs in a task of its own)."""
        twin = self._twin(self.avoid | {avoid.name})
        twin.ctl = Control()
        twin.role = "hedge"
        return twin

    def continuation(self, delivered: str, delivered_tokens: int, avoid: set[str]) -> Call:
        """The request that continues a cut stream on a route not in ``avoid`` (see :func:`.body.continued_body`)."""
        twin = self._twin(self.avoid | avoid)
        twin.continuing = True
        twin.continues_model = self.info.model
        twin.role = "continuation"
        twin.body = continued_body(self.body, delivered, delivered_tokens)
        twin.forget_prefix()
        return twin

    def prefix_key(self, chars: int) -> int:
        """A stable hash of the conversation's first ``chars`` characters (roles and text)."""
        if self._prefix is None or self._prefix[0] != chars:
            parts: list[str] = []
            size = 0
            for text in self._prefix_texts():
                parts.append(text)
                size += len(text)
                if size >= chars:
                    break
            self._prefix = (chars, stable_hash("".join(parts)[:chars]))
        return self._prefix[1]

    def prefix_blocks(self, block_chars: int) -> tuple[int, ...]:
        """The chained hashes of the conversation's ``block_chars``-character blocks, every cached part and
        no further than the cap (see :func:`.prefix_index.conversation_blocks`); computed once per call."""
        if self._blocks is None or self._blocks[0] != block_chars:
            messages = self.body.get("messages")
            if messages is not None:
                self._blocks = (block_chars, conversation_blocks(messages, block_chars))
            else:  # an embedding batch: its inputs
                self._blocks = (block_chars, text_blocks(self._prefix_texts(), block_chars))
        return self._blocks[1]

    def forget_prefix(self) -> None:
        """The body changed (a batch, a continuation): its prefix key and blocks are computed again."""
        self._prefix = self._blocks = None

    def _prefix_texts(self) -> Iterator[str]:
        """The pieces :meth:`prefix_key` hashes (and :meth:`prefix_blocks`, of a call without messages):
        each message's role and text."""
        return prefix_pieces(self.body["messages"])

    def unsendable(self) -> str | None:
        """Why the SDK cannot serialise the body as JSON (the caller's mistake), or None when it can."""
        return why_unsendable(self.body)

    def served_model(self) -> str:
        """The call's model as statistics and metrics name it: a name some route serves, else "" (a caller's
        unknown name never becomes a label)."""
        models = self.router.models
        return self.model if models.serves(self.kind, self.model) else ""

    def sent_model(self, route: Route) -> str:
        """The model name an attempt on ``route`` sends: an alias becomes the route's model; the fallback
        route, taking a default-model call for a model it does not serve, gets its own; a pinned route
        gets what the caller asked for (its own model when the caller named none)."""
        name = self.model
        if name == route.model or name in route.aliases:
            return route.model
        if route is self.pinned:
            return route.model if self.requested_model is None else name
        return name if name in route.served_names() else route.model

    def resolve(self) -> None:
        """Make sure some route serves the call's model, asking the servers once (sync) if none is known to:
        else :class:`UnknownModelError`, before anything is sent."""
        if not self.resolved:
            self.router.models.look_up(self.kind, self.model, self.left())
            self.resolved = True

    async def aresolve(self) -> None:
        """Async twin of :meth:`resolve`."""
        if not self.resolved:
            await self.router.models.alook_up(self.kind, self.model, self.left())
            self.resolved = True

    def fall_back(self, failed: BaseException) -> bool:
        """Go on to the next fallback model after ``failed`` ended the current one's rounds; False: none left
        (or no time, or this is a hedged copy or a continuation, which stay on their model)."""
        if self.pinned is not None or self.role != "request" or ((left := self.left()) is not None and left <= 0):
            return False
        overflow = isinstance(failed, ContextOverflowError)
        models = self.router.models
        self.tried_models.append(self.model)
        ahead = [m for m in models.fallback_models(self.kind, self.model, overflow) if m not in self.tried_models]
        self.next_models = list(dict.fromkeys(ahead + [m for m in self.next_models if m not in ahead]))
        if not self.next_models:
            return False
        self.model = self.next_models.pop(0)
        self.resolved = False  # the fallback model is looked up like any other, if nobody is known to serve it
        self.info.fallback_reason = "context_window" if overflow else "fallbacks"
        self.info.models_tried = [*self.tried_models]
        self.first_round = self.info.rounds
        return True

    def overflow(self) -> ContextOverflowError | None:
        """The prompt is clearly too long for every route of the call's model (their ``max_model_len``, all
        known): predicted before sending, asked only where ``context_window_fallbacks`` give it somewhere to go."""
        from .embeddings import fewest_tokens  # embeddings builds on this module

        models = self.router.models
        messages = self.body.get("messages")
        if messages is None or not models.window_fallback_for(self.kind, self.model):
            return None
        group = models.group(self.kind, self.model)
        windows = [route.max_model_len for route in group]
        if not group or None in windows:
            return None
        limit = max(w for w in windows if w is not None)
        per_token = self.router.config.embedding.chars_per_token
        reply = next(
            (n for key in ("max_completion_tokens", "max_tokens") if type(n := self.body.get(key)) is int and n >= 0),
            0,
        )  # what vLLM counts: max_completion_tokens first; anything but a whole number is the server's to refuse
        estimate = sum(fewest_tokens(piece, per_token) for piece in prefix_pieces(messages)) + reply
        if estimate <= limit:
            return None
        route = group[0]
        return ContextOverflowError(
            f"the prompt needs at least {estimate} tokens (with max_tokens {reply}), past model {self.model!r}'s "
            f"context window of {limit}; nothing was sent",
            route=route.name,
            url=route.base_url,
            hint="shorten the prompt or lower max_tokens",
            error_class="context_overflow_predicted",
        )

    def body_for(self, route: Route) -> dict[str, Any]:
        """The request body for an attempt on ``route``; a traced attempt's ``traceparent`` goes in its headers."""
        body = {**self.body, "model": self.sent_model(route)}
        if route.send_priority and self.priority:
            body["extra_body"] = {**(body.get("extra_body") or {}), "priority": self.priority}
        if self.span is None:
            return body
        lease = self.ctl.lease
        if lease is not None and lease.headers is not None and lease.route is route:
            return tracing.with_headers(body, lease.headers)
        return body

    def start_round(self) -> None:
        self.info.rounds += 1
        self.retry_after = 0.0
        self.round_attempts = 0

    def left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def on_loop(self, loop: LoopThread, coro: Coroutine[Any, Any, _T]) -> _T:
        """``coro`` run on the router's loop thread, waited for no longer than this call's deadline."""
        try:
            return loop.run(coro, within=self.left())
        except Overdue:
            raise self.exhausted("deadline exceeded") from None

    def attempt_timeout(self, route: Route) -> float:
        """The bound of the next attempt on ``route``: its timeout, within the deadline."""
        timeout = self.timeout or route.timeout
        left = self.left()
        if left is None:
            return timeout
        if left <= 0:
            raise self.exhausted("deadline exceeded")
        return min(timeout, left)

    def exhausted(self, reason: str | None = None) -> AllRoutesFailed:
        if reason is None:
            reason = self._why_none()
        return AllRoutesFailed(self.info.attempts, reason)

    def _why_none(self) -> str:
        if self.round_attempts:
            return "every available route failed"
        if self.pinned is None and not self.router.models.serves(self.kind, self.model):
            return f"no route serves model {self.model!r} now (each answered 404 for it)"
        now = time.monotonic()
        throttled = [r.not_before for r in self.router.routes.values() if r.not_before > now]
        if throttled:
            return f"every available route is throttled by Retry-After until {wall_clock(min(throttled))}"
        if self.info.attempts:
            return "every available route failed"
        return "no route available (all circuit breakers open" + self._last_errors() + ")"

    def _last_errors(self) -> str:
        """What opened the breakers of the call's routes (their last error or failed probe), for a call that could
        try none of them: the hint (a base_url without /v1, a wrong key) must not vanish once a breaker is open."""
        seen: list[str] = []
        for route in self.router.models.candidates(self.kind, self.model):
            error = route.probe_result.error or route.stats.last_error
            if error and error not in seen:
                seen.append(error if len(error) <= 400 else error[:400] + "...")
            if len(seen) == 2:
                break
        return "; last: " + " | ".join(seen) if seen else ""

    def enter(self) -> None:
        """The call starts running: Router.close() can now end it."""
        self.ctl.enter(self.router)

    def exit(self) -> None:
        self.router._live.discard(self.ctl)


class Control:
    """What Router.close() needs to end a running call promptly; a stream's continuation shares its caller's.

    Sync: the watch of the attempt in progress is fired (its socket cut). Async: the task is cancelled,
    but only while it is inside one of the router's own awaits (never in the caller's code between
    two chunks); the cancellation then surfaces as ``RouterClosed``.
    """

    __slots__ = ("aborted", "awaiting", "lease", "loop", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lease: Lease | None = None
        """The attempt in progress."""
        self.awaiting = False
        self.aborted = False
        """Router.close() cut this call short: its cancellation or broken socket means RouterClosed."""

    def enter(self, router: Router) -> None:
        try:
            self.task = asyncio.current_task()
        except RuntimeError:
            self.task = None
        if self.task is not None:
            self.loop = self.task.get_loop()
        router._live.add(self)
        if router.closed:  # close() may have taken its snapshot of the live calls just before
            router._live.discard(self)
            raise RouterClosed()

    def abort(self) -> None:
        self.aborted = True
        lease = self.lease
        if lease is not None and lease.watch is not None:
            lease.watch.fire("router closed")
        if self.task is not None and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self.awaiting and self.task is not None and not self.task.done():
            self.task.cancel("router closed")

    def uncancelled(self) -> bool:
        """A cancellation is Router.close()'s doing: take it back from the task (True), or not ours (False)."""
        if self.aborted and self.task is not None:
            return self.task.uncancel() == 0  # a cancellation of the caller's own, pending too, wins
        return False


def wall_clock(monotonic_at: float) -> str:
    """A monotonic instant as local wall-clock time (for messages)."""
    return time.strftime("%H:%M:%S", time.localtime(time.time() + monotonic_at - time.monotonic()))


def _session_key(session: str | int) -> str:
    """A session id as the session table keeps it: short ids as given, long ones (and huge numbers) as a digest,
    so the table's memory is bounded by its entry count whatever callers send."""
    text = session if isinstance(session, str) else str(session) if session.bit_length() < 800 else hex(session)
    if len(text) <= SESSION_ID_CHARS:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

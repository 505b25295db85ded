"""Embedding calls: the inputs split into batches, each batch a request of its own, reassembled in order.

``Router.embed(texts)`` is one :class:`EmbeddingCall` (its span, its outcome, its deadline); each
batch of ``embedding.batch_size`` inputs is a fresh copy of it (:meth:`EmbeddingCall.batches`) that
goes through the same rounds, leases, breakers and backoff as a chat request, on the routes of kind
``embedding`` only. Batches run ``embedding.max_concurrency`` at a time, so one that fails over is
resent alone while the others keep their answers; the first batch that fails for good ends the call
and cancels the rest (their routes released, nothing counted against them). The vectors come back
in input order, with the usage summed.

A sync call with one batch runs in the caller's thread on the routes' sync clients; with several,
it runs its async twin on the router's own loop (``loop.py``), so the caller needs no event loop.

Inputs past the context window: with ``embedding.truncate: true`` the server cuts them (vLLM's
``truncate_prompt_tokens: -1``: to its ``max_model_len``). Otherwise every input is checked before
anything is sent, against the smallest ``max_model_len`` the call's routes report (read once from
``/v1/models`` when not yet known, in at most a quarter of the call's time left, and never counted
against a route: a route that does not say is simply not checked). An input is refused with
:class:`~.errors.InputTooLongError` when its low estimate is past the window: each
whitespace-separated word is at least one token, and a word of up to 100 characters at least
``len / embedding.chars_per_token`` (8, twice what English text averages); a longer word counts one,
as BERT's WordPiece makes it one ``[UNK]``. The estimate errs low: an input only just too long
reaches the server, whose 400 is a :class:`~.errors.ContextOverflowError`.

The answers are checked (``route.checked_embeddings``: indices, finite numbers, one length per
answer), and so is each answer's vector length against its group's (``vectors.py``): a route serving
another model behind the same name answers a :class:`~.errors.MalformedResponse`, counted against it,
and the batch fails over. Batches whose vectors still differ in length (while a group's length was
being settled) raise :class:`~.errors.MixedEmbeddingsError` rather than mix two vector spaces in one index.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from openai.resources.embeddings import Embeddings
from openai.types import CreateEmbeddingResponse, Embedding
from openai.types.create_embedding_response import Usage

from .body import check_extras, reserved
from .call import Call, Control
from .errors import InputTooLongError, InvalidRequestError, MixedEmbeddingsError
from .info import attach
from .rounds import aserve, serve
from .telemetry import tracing

if TYPE_CHECKING:
    from .core import Router
    from .endpoints.route import Route

SDK_PARAMS = frozenset(inspect.signature(Embeddings.create).parameters) - {"self", "input", "model"}
"""Keyword arguments the openai SDK's ``embeddings.create`` accepts; any other goes into ``extra_body``."""
TRUNCATE_TO_WINDOW = -1
"""vLLM's ``truncate_prompt_tokens`` value meaning "cut to the model's max_model_len" (its pooling protocol)."""


class EmbeddingCall(Call):
    """One ``embed`` call; :meth:`batches` derives the request of each batch."""

    kind = "embedding"
    operation = "embeddings"

    def __init__(self, router: Router, params: dict[str, Any]) -> None:
        self._start(router, params, stream=False)
        cfg = router.config.embedding
        self.batch_size: int = _whole("batch_size", params.pop("batch_size", None)) or cfg.batch_size
        self.max_concurrency: int = (
            _whole("max_concurrency", params.pop("max_concurrency", None)) or cfg.max_concurrency
        )
        truncate = params.pop("truncate", None)
        if truncate is not None and not isinstance(truncate, bool):
            raise InvalidRequestError(f"truncate must be True or False, got {truncate!r}")
        self.truncate: bool = cfg.truncate if truncate is None else truncate
        reserved(params, RESERVED_EMBEDDING)
        extra = {k: params.pop(k) for k in list(params) if k not in SDK_PARAMS}
        check_extras(params)
        extra_body = {**extra, **(params.get("extra_body") or {})}
        if self.truncate:
            extra_body.setdefault("truncate_prompt_tokens", TRUNCATE_TO_WINDOW)
        self.checks_lengths = "truncate_prompt_tokens" not in extra_body
        """Whether inputs are checked against the context window before sending (nobody asked to truncate)."""
        if extra_body:
            params["extra_body"] = extra_body
        self.body = params
        self.lengths = router.vector_lengths

    def batches(self, texts: list[str]) -> list[EmbeddingCall]:
        """The request of each batch: this call's bounds, span and retries, its own attempts and control."""
        parts = []
        for start in range(0, len(texts), self.batch_size):
            part = self.fresh()
            part.ctl = Control()
            part.body = {**self.body, "input": texts[start : start + self.batch_size]}
            part.forget_prefix()
            parts.append(part)
        return parts

    def send(self, route: Route, timeout: float) -> CreateEmbeddingResponse:
        """One attempt of this batch on ``route`` (sync); vectors of another length than the group's are its failure."""
        body = self.body_for(route)
        return self.lengths.check(route, body, route.embed(body, timeout))

    async def asend(self, route: Route, timeout: float) -> CreateEmbeddingResponse:
        body = self.body_for(route)
        return self.lengths.check(route, body, await route.aembed(body, timeout))

    def _prefix_texts(self) -> Iterator[str]:
        """What the prefix policies hash: the batch's inputs."""
        for text in self.body.get("input", ()):
            yield text + "\x1e"

    def embedded(self, response: CreateEmbeddingResponse) -> CreateEmbeddingResponse:
        """The call's response, with its info (gathered from the batches) and what its span records."""
        info = self.info
        info.latency_s = time.monotonic() - self.started
        if self.span is not None:
            self.said = tracing.response_attributes(response.model, None, (), response.usage.prompt_tokens, None)
        return attach(response, info)

    def gather(self, parts: Sequence[EmbeddingCall]) -> None:
        """Fold the batches' attempts, rounds and routes into this call's info (also when the call failed)."""
        info = self.info
        info.attempts = [attempt for part in parts for attempt in part.info.attempts]
        info.rounds = max((part.info.rounds for part in parts), default=0)
        info.batches = [part.info.route for part in parts if part.info.route is not None]
        info.route = info.batches[0] if info.batches else None


RESERVED_EMBEDDING = {"input": "the texts are the call's first argument", "stream": "embeddings are not streamed"}
"""Body fields the router sets itself in an embeddings request."""


def embed(router: Router, call: EmbeddingCall, texts: str | Sequence[str]) -> CreateEmbeddingResponse:
    """``Router.embed``: see the module docstring."""
    with call:
        inputs = _inputs(texts)
        call.resolve()
        if call.checks_lengths and inputs:
            routes = _routes(router, call)
            unknown = [route for route in routes if _unknown(route)]
            if unknown:
                with ThreadPoolExecutor(max_workers=len(unknown)) as pool:
                    list(pool.map(lambda route: route.peek_context_window(_peek_timeout(call, route)), unknown))
            check_lengths(routes, inputs, router.config.embedding.chars_per_token)
        parts = call.batches(inputs)
        try:
            if len(parts) == 1:
                responses = [serve(router, parts[0], parts[0].send, _no_tokens)]
            else:
                responses = call.on_loop(router._loop_thread, _agather(router, call, parts)) if parts else []
        finally:
            call.gather(parts)
        return call.embedded(merged(responses, call))


async def aembed(router: Router, call: EmbeddingCall, texts: str | Sequence[str]) -> CreateEmbeddingResponse:
    """Async twin of :func:`embed`."""
    with call:
        inputs = _inputs(texts)
        await call.aresolve()
        if call.checks_lengths and inputs:
            routes = _routes(router, call)
            await asyncio.gather(
                *(route.apeek_context_window(_peek_timeout(call, route)) for route in routes if _unknown(route))
            )
            check_lengths(routes, inputs, router.config.embedding.chars_per_token)
        parts = call.batches(inputs)
        try:
            responses = await _agather(router, call, parts) if parts else []
        finally:
            call.gather(parts)
        return call.embedded(merged(responses, call))


async def _agather(router: Router, call: EmbeddingCall, parts: list[EmbeddingCall]) -> list[CreateEmbeddingResponse]:
    """Every batch's response, in order: ``max_concurrency`` workers take the batches one after another.

    The first batch that fails for good ends the call: the other workers are cancelled (their
    attempts abandoned, nothing counted against their routes) and its error is raised.
    """
    responses: list[CreateEmbeddingResponse | None] = [None] * len(parts)
    queue = iter(enumerate(parts))  # shared: each batch is taken by exactly one worker

    async def worker() -> None:
        for index, part in queue:
            response = await aserve(router, part, part.asend, _no_tokens)
            responses[index] = response

    workers = [asyncio.ensure_future(worker()) for _ in range(min(call.max_concurrency, len(parts)))]
    try:
        await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        unfinished = [task for task in workers if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)  # let them release their routes before the call ends
    failed = [task for task in workers if not task.cancelled() and task.exception() is not None]
    if failed:
        error = failed[0].exception()
        assert error is not None
        raise error
    return [response for response in responses if response is not None]


def merged(responses: Sequence[CreateEmbeddingResponse], call: EmbeddingCall) -> CreateEmbeddingResponse:
    """The batches' responses as one: vectors in input order (indices renumbered), usage summed.

    MixedEmbeddingsError when batches came back with vectors of different lengths.
    """
    dimensions = {
        len(item.embedding): route
        for response, route in zip(responses, call.info.batches, strict=False)
        for item in response.data[:1]
        if isinstance(item.embedding, list)
    }
    if len(dimensions) > 1:
        raise MixedEmbeddingsError(dimensions)
    if len(responses) == 1:
        response = responses[0]
        response.data.sort(key=lambda item: item.index)
        return response
    data: list[Embedding] = []
    prompt_tokens = total_tokens = 0
    for response in responses:
        offset = len(data)
        for item in sorted(response.data, key=lambda item: item.index):
            item.index += offset
            data.append(item)
        prompt_tokens += response.usage.prompt_tokens  # made whole numbers by route.checked_embeddings
        total_tokens += response.usage.total_tokens
    model = responses[0].model if responses else call.model
    return CreateEmbeddingResponse(
        data=data, model=model, object="list", usage=Usage(prompt_tokens=prompt_tokens, total_tokens=total_tokens)
    )


def check_lengths(routes: Iterable[Route], texts: Sequence[str], chars_per_token: float) -> None:
    """Raise InputTooLongError for the first input clearly past the smallest known context window."""
    known = [(route.max_model_len, route) for route in routes if route.max_model_len]
    if not known:
        return  # nobody says: the server's own 400 will tell
    limit, route = min(known, key=lambda pair: pair[0])
    assert limit is not None
    for index, text in enumerate(texts):
        estimate = fewest_tokens(text, chars_per_token)
        if estimate > limit:
            raise InputTooLongError(route=route.name, url=route.base_url, index=index, estimate=estimate, limit=limit)


LONG_WORD = 100
"""BERT's WordPiece makes a word longer than this one ``[UNK]`` token: such a word counts one."""


def fewest_tokens(text: str, chars_per_token: float) -> int:
    """A low estimate of ``text``'s tokens (see the module docstring)."""
    return sum(1 if len(word) > LONG_WORD else max(1, math.ceil(len(word) / chars_per_token)) for word in text.split())


def _routes(router: Router, call: EmbeddingCall) -> list[Route]:
    """The routes the call may go to (the pinned one, else those serving its model, and the fallback route)."""
    if call.pinned is not None:
        return [call.pinned]
    return router.models.candidates(call.kind, call.model)


def _unknown(route: Route) -> bool:
    """Whether nothing says the route's context window yet (no configured value, never probed or peeked)."""
    return route.max_model_len is None and route.probe_result.checked_at is None and not route.peeked


def _peek_timeout(call: EmbeddingCall, route: Route) -> float:
    """How long reading a route's context window may take: its probe timeout, and at most a quarter of the
    call's time left (the check must not eat the deadline the batches need)."""
    left = call.left()
    bound = route.probe_timeout if left is None else min(route.probe_timeout, left / 4)
    if bound <= 0:
        raise call.exhausted("deadline exceeded")
    return bound


def _inputs(texts: str | Sequence[str]) -> list[str]:
    """The caller's texts as a list of strings (one string is one input), or InvalidRequestError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, Mapping | Set | bytes | bytearray):
        kind = type(texts).__name__
        raise InvalidRequestError(f"texts must be a string or a list of strings, got {kind} (no order of inputs)")
    try:
        listed = list(texts)
    except TypeError:
        raise InvalidRequestError(f"texts must be a string or a list of strings, got {type(texts).__name__}") from None
    for index, text in enumerate(listed):
        if not isinstance(text, str):
            raise InvalidRequestError(f"texts[{index}] must be a string, got {type(text).__name__}")
    return listed


def _whole(name: str, value: object) -> int | None:
    """A caller's positive whole number (None: the config's)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _no_tokens(response: CreateEmbeddingResponse) -> None:
    """Embeddings produce no output tokens (their input tokens are in the response's usage)."""
    return None

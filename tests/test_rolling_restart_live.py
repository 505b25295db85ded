"""A rolling restart of three real vLLM servers (SIGTERM, exit, start again) under steady mixed load: no call lost.

vLLM 0.32 on SIGTERM (its default ``--shutdown-timeout 0``) closes its port at once and aborts its engine,
but the HTTP requests in flight get no more bytes and no error: they hang until the client gives up, and
the process exits only then (see /work/shared/real-servers.md). So every restart here also makes the
router time out the attempts in flight on the server going down: plain calls must fail over, streams
that had delivered text must continue on another route (``continue_streams``) without repeating or
dropping any, and each restarted server must come back into rotation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.cli.servers import free_port, running
from anorag_integrations.cli.vllm import VllmServer

from .conftest import real_config

PROBE_S = 1.0
COOLDOWN_S = 3.0
TIMEOUT_S = 30.0
"""Per attempt (streams: between chunks): how long a request held by a server going down hangs."""
LOAD_S = 120.0
"""The least time the load runs, restarts or not."""
MAX_TOKENS = 32
EXIT_LIMIT_S = TIMEOUT_S + 30.0
"""A SIGTERMed server exits once its held requests are given up (``TIMEOUT_S``), then tears down."""
BACK_LIMIT_S = COOLDOWN_S + PROBE_S + TIMEOUT_S
"""From a restarted server's first 200 on /health to its first success through the router (its first answer is slow)."""

COUNT = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
SEQUENCE = ", ".join(str(i) for i in range(1, 101))
"""SmolLM2 answers COUNT at temperature 0 with the start of this ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1" in 32 tokens):
a repeated or dropped piece of a continued stream breaks the sequence."""
SHORTEST = "1, 2, 3, 4, 5, 6, 7, 8"
"""Less than this (in MAX_TOKENS tokens) means text went missing."""

pytestmark = [pytest.mark.live, pytest.mark.timeout(1200)]


@dataclass
class Outcome:
    """One call of the load: what kind, which route served it, the text, and how it ended."""

    kind: str
    route: str | None = None
    text: str = ""
    finish_reason: str | None = None
    continued: int = 0
    ids: int = 1
    role_chunks: int = 1
    finishes: int = 1
    error: BaseException | None = None
    ended_s: float = 0.0


def streamed(kind: str, chunks: list[Any]) -> Outcome:
    """The outcome of a stream from its chunks."""
    info = call_info(chunks[-1]) if chunks else None
    choices = [choice for chunk in chunks for choice in chunk.choices]
    finishes = [c.finish_reason for c in choices if c.finish_reason]
    return Outcome(
        kind,
        route=info.route if info else None,
        text="".join(c.delta.content or "" for c in choices),
        finish_reason=finishes[-1] if finishes else None,
        continued=info.continued if info else 0,
        ids=len({chunk.id for chunk in chunks}),
        role_chunks=sum(1 for c in choices if c.delta.role),
        finishes=len(finishes),
    )


def answered(kind: str, response: Any) -> Outcome:
    """The outcome of a plain chat completion."""
    info = call_info(response)
    choice = response.choices[0]
    return Outcome(kind, info.route if info else None, choice.message.content or "", choice.finish_reason)


class Load:
    """Steady mixed load until stopped: threads doing ``chat`` and ``stream``, a loop doing ``achat``/``astream``."""

    def __init__(self, router: Router, *, chat_threads: int = 1, stream_threads: int = 1) -> None:
        self.router = router
        self.done = threading.Event()
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()
        self._lock = threading.Lock()
        workers = [self._chats] * chat_threads + [self._streams] * stream_threads + [self._loop]
        self._threads = [threading.Thread(target=work, daemon=True) for work in workers]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self._threads:
            thread.join(TIMEOUT_S * 6)

    def record(self, outcome: Outcome) -> None:
        """Keep one outcome, stamped with when it ended."""
        outcome.ended_s = time.monotonic() - self.started
        with self._lock:
            self.outcomes.append(outcome)

    def _one(self, kind: str, call: Any) -> None:
        try:
            self.record(call())
        except Exception as exc:  # every failure is kept, then asserted on
            self.record(Outcome(kind, error=exc))

    def _chats(self) -> None:
        while not self.done.is_set():
            self._one("chat", lambda: answered("chat", self.router.chat(COUNT)))

    def _streams(self) -> None:
        while not self.done.is_set():
            self._one("stream", lambda: streamed("stream", list(self.router.stream(COUNT))))

    def _loop(self) -> None:
        asyncio.run(self._async_load())

    async def _async_load(self) -> None:
        await asyncio.gather(self._achats(), self._astreams())

    async def _achats(self) -> None:
        while not self.done.is_set():
            try:
                self.record(answered("achat", await self.router.achat(COUNT)))
            except Exception as exc:  # kept, then asserted on
                self.record(Outcome("achat", error=exc))

    async def _astreams(self) -> None:
        while not self.done.is_set():
            try:
                self.record(streamed("astream", [chunk async for chunk in self.router.astream(COUNT)]))
            except Exception as exc:  # kept, then asserted on
                self.record(Outcome("astream", error=exc))


@dataclass
class Restart:
    """One server's restart: seconds from SIGTERM to exit, to /health 200, and to its first success after that."""

    route: str
    exited_s: float
    ready_s: float
    back_s: float | None


def restart(servers: list[Any], index: int, router: Router, route: str) -> Restart:
    """SIGTERM server ``index`` (its main process, as a container runtime would), wait for it to exit, start it
    again on its port, wait for /health, then for the router to serve a call from it again."""
    old = servers[index]
    term = time.monotonic()
    os.kill(old.process.pid, signal.SIGTERM)
    old.process.wait(EXIT_LIMIT_S)
    exited = time.monotonic() - term
    old.stop()  # its process group's leftovers, if any
    servers[index] = pinned(old.port, index).start(wait=False)
    servers[index].wait_ready()
    ready = time.monotonic()
    before = router.stats()[route]["successes"]
    while time.monotonic() - ready < BACK_LIMIT_S:
        if router.stats()[route]["successes"] > before:
            return Restart(route, exited, ready - term, time.monotonic() - ready)
        time.sleep(0.1)  # polling the router's counters, not waiting for an event
    return Restart(route, exited, ready - term, None)


def pinned(port: int, index: int) -> VllmServer:
    """A vLLM server on one core (its OpenMP threads too): three unpinned ones on 2 cores time out under load."""
    return VllmServer(port, cpu=index % (os.cpu_count() or 1))


@pytest.fixture
def three_servers(vllm_room: None) -> Iterator[list[Any]]:
    """Three vLLM servers of this test's own (the session's stop meanwhile); those it restarts are stopped too."""
    with running([pinned(free_port(), i) for i in range(3)]) as servers:
        yield servers


def test_rolling_restart_under_mixed_load_loses_no_call(three_servers: list[Any]) -> None:
    """Each of three servers in turn gets SIGTERM and starts again while calls of four kinds keep coming."""
    config = real_config(
        three_servers,
        "vllm",
        {"timeout": TIMEOUT_S, "continue_streams": True},
        lb_policy="round_robin",
        health={"probe_interval": PROBE_S, "cooldown": COOLDOWN_S, "failure_threshold": 3},
        params={"max_tokens": MAX_TOKENS},
    )
    names = [f"vllm{i}" for i in range(3)]
    with Router(config) as router:
        reference = router.chat(COUNT).choices[0].message.content or ""
        restarts: list[Restart] = []
        with Load(router) as load:
            for index, name in enumerate(names):
                restarts.append(restart(three_servers, index, router, name))
            load.done.wait(max(0.0, LOAD_S - (time.monotonic() - load.started)))  # the load's least duration
            ran_s = time.monotonic() - load.started
        stats = router.stats()

    outcomes = load.outcomes
    failed = [(o.kind, round(o.ended_s, 1), repr(o.error)) for o in outcomes if o.error is not None]
    streams = [o for o in outcomes if o.kind in ("stream", "astream") and o.error is None]
    broken = [
        (o.kind, o.route, o.continued, o.text, o.finish_reason)
        for o in streams
        if not SEQUENCE.startswith(o.text)
        or len(o.text) < len(SHORTEST)
        or o.finishes != 1
        or o.ids != 1
        or o.role_chunks != 1
    ]
    plain = [o for o in outcomes if o.kind in ("chat", "achat") and o.error is None]
    off = sum(1 for o in plain if not SEQUENCE.startswith(o.text))
    by_kind = {kind: sum(1 for o in outcomes if o.kind == kind) for kind in ("chat", "stream", "achat", "astream")}
    routes = {n: (s["successes"], s["failures"], s["continuations"], s["errors"]) for n, s in stats.items()}
    print(
        f"\nrolling restart: {len(outcomes)} calls in {ran_s:.0f}s {by_kind}; reference {reference!r}"
        f"\n  restarts: {restarts}"
        f"\n  continued streams: {sum(1 for o in streams if o.continued)}; "
        f"streams equal to the reference: {sum(1 for o in streams if o.text == reference)}/{len(streams)}; "
        f"plain answers off the sequence (the model's, not asserted): {off}"
        f"\n  per route (successes, failures, continuations, errors): {routes}"
    )
    assert ran_s >= LOAD_S
    assert all(by_kind.values()), by_kind
    assert failed == [], f"{len(failed)} calls failed, the first: {failed[:3]}"
    assert broken == [], f"{len(broken)} streams broken, the first: {broken[:3]}"
    assert [r.route for r in restarts if r.back_s is None] == [], "a restarted server never came back into rotation"

"""Invariants of the router under random schedules of faults, calls, cancellations, cool-downs and closes.

A hypothesis state machine drives one router over three fault servers. After every step:

- every call ended with a result or a typed ``RouterError`` (never a raw exception, never a hang);
- when idle, every in-flight count is 0, no breaker holds a trial slot, no call is registered live;
- at the end, with every server healthy again, every route serves within its cool-down.

``ANORAG_HYPOTHESIS_EXAMPLES`` raises the number of examples for longer runs (default 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from anorag_integrations import Router, RouterClosed, RouterError
from anorag_integrations.testing import FAULT_CORPUS, FaultCase, FaultServer

from .conftest import USER, make_config, three_fault_servers

EXAMPLES = int(os.environ.get("ANORAG_HYPOTHESIS_EXAMPLES", "20"))
NAMES = ("a", "b", "c")
COOLDOWN = 0.2
REPLIES = {f"from {name}" for name in NAMES}

MODES = ["chat", "achat", "stream", "astream"]


def _run(router: Router, mode: str, **params: Any) -> str:
    """One call to its end: the text, or the typed error it raised (anything else fails the test)."""
    try:
        if mode == "chat":
            return router.chat(USER, **params).choices[0].message.content or ""
        if mode == "achat":
            return (asyncio.run(router.achat(USER, **params))).choices[0].message.content or ""
        if mode == "stream":
            return "".join(c.choices[0].delta.content or "" for c in router.stream(USER, **params) if c.choices)

        async def collect() -> str:
            parts = [c.choices[0].delta.content or "" async for c in router.astream(USER, **params) if c.choices]
            return "".join(parts)

        return asyncio.run(collect())
    except RouterError as exc:
        return f"error:{type(exc).__name__}"


class RouterMachine(RuleBasedStateMachine):
    def __init__(self, servers: dict[str, FaultServer]) -> None:
        super().__init__()
        self.servers = servers
        self.router = self._build()

    def _build(self) -> Router:
        config = make_config(
            self.servers,
            route_overrides={name: {"timeout": 0.4} for name in NAMES},
            health={"failure_threshold": 2, "cooldown": COOLDOWN},
            params={"max_retries": 1, "max_retry_after": 0.3},
        )
        return Router(config, start_prober=False)

    def _check(self, outcome: str) -> None:
        assert outcome.startswith("error:") or any(outcome.startswith(reply) for reply in REPLIES), outcome

    @rule(name=st.sampled_from(NAMES), case=st.sampled_from(FAULT_CORPUS))
    def set_fault(self, name: str, case: FaultCase) -> None:
        case.apply(self.servers[name])

    @rule(mode=st.sampled_from(MODES), deadline=st.sampled_from([None, 0.3, 2.0]))
    def call(self, mode: str, deadline: float | None) -> None:
        self._check(_run(self.router, mode, deadline=deadline))

    @rule(modes=st.lists(st.sampled_from(MODES), min_size=2, max_size=6))
    def concurrent_calls(self, modes: list[str]) -> None:
        outcomes: list[str] = []
        threads = [threading.Thread(target=lambda m=m: outcomes.append(_run(self.router, m))) for m in modes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "a call hung"
        assert len(outcomes) == len(modes)
        for outcome in outcomes:
            self._check(outcome)

    @rule(stream=st.booleans(), steps=st.integers(0, 6))
    def cancel_async(self, stream: bool, steps: int) -> None:
        """The caller cancels its task after a few loop iterations, wherever the call has got to."""

        async def go() -> None:
            async def consume() -> None:
                if stream:
                    async for _ in self.router.astream(USER):
                        pass
                else:
                    await self.router.achat(USER)

            task = asyncio.create_task(consume())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RouterError):
                await task

        asyncio.run(go())

    @rule(keep=st.integers(0, 3))
    def abandon_stream(self, keep: int) -> None:
        """The caller stops reading a stream after ``keep`` chunks and closes it."""
        stream = self.router.stream(USER)
        try:
            for index, _ in enumerate(stream):
                if index >= keep:
                    break
        except RouterError:
            pass
        finally:
            stream.close()  # type: ignore[attr-defined]

    @rule()
    def cool_down(self) -> None:
        time.sleep(COOLDOWN)  # the passage of time is what this step models

    @precondition(lambda self: not self.router.closed)
    @rule()
    def close_while_busy(self) -> None:
        """Close the router while calls are in flight: each ends with a result or RouterClosed, promptly."""
        outcomes: list[str] = []
        threads = [threading.Thread(target=lambda m=m: outcomes.append(_run(self.router, m))) for m in MODES]
        for thread in threads:
            thread.start()
        self.router.close()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads), "close() left a call hanging"
        for outcome in outcomes:
            self._check(outcome)
        with pytest.raises(RouterClosed):
            self.router.chat(USER)
        self._idle()
        self.router = self._build()

    @invariant()
    def idle_counters(self) -> None:
        self._idle()

    def _idle(self) -> None:
        for name, route in self.router.routes.items():
            assert route.stats.in_flight == 0, f"{name}: in flight while idle"
            assert not route.breaker.trial_in_flight, f"{name}: trial slot held while idle"
        assert not self.router._live, "a call is still registered as running"

    def teardown(self) -> None:
        try:
            for server in self.servers.values():
                server.set_fault(None)
            time.sleep(COOLDOWN)  # a cool-down passes; then every route must be back
            for name in NAMES:
                response = self.router.chat(USER, route=name)
                assert response.choices[0].message.content == f"from {name}"
            self._idle()
        finally:
            self.router.close()


@pytest.fixture(scope="module")
def three() -> Iterator[dict[str, FaultServer]]:
    """The machine's servers, shared by its examples (each example clears their faults at teardown)."""
    with three_fault_servers() as started:
        yield started


def test_router_invariants_hold_under_random_schedules(three: dict[str, FaultServer]) -> None:
    run_state_machine_as_test(
        lambda: RouterMachine(three),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=bool(os.environ.get("CI")),  # CI explores the same schedules every run
        ),
    )

"""What a hostile server or a careless caller did to the router, one test per way it broke.

Each test reproduces a failure seen on an earlier main (the issue's numbered list) and asserts the
behaviour that replaced it: a result or a typed error, and every counter back to zero.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from anorag_integrations import (
    AllRoutesFailed,
    InvalidRequestError,
    MalformedResponse,
    Router,
    RouterClosed,
    RouterError,
    StreamInterruptedError,
    TransientRouteError,
    call_info,
)
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.shared import live_shared
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config
from .test_failover import MODES, STREAMS, partial, run

MALFORMED = [Fault.HTML, Fault.TRUNCATED_JSON, Fault.INVALID_JSON, Fault.STRING_BODY, Fault.NO_CHOICES]


def idle(router: Router) -> None:
    """Every in-flight count is zero and no breaker holds a trial slot."""
    for name, route in router.routes.items():
        assert route.stats.in_flight == 0, f"route {name} left a request in flight"
        assert not route.breaker.trial_in_flight, f"route {name} holds its half-open trial slot"


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until true (synchronisation on an observable state, not a fixed sleep)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


# --- 1. the half-open trial slot --------------------------------------------------------------------


def test_trial_slot_is_given_back_when_the_deadline_runs_out_after_the_pick(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", "b", health={"cooldown": 0})
    router.routes["b"].breaker.force_open()  # cool-down 0: half-open at once, one trial allowed
    servers["a"].set_fault(Fault.HANG)
    with pytest.raises(AllRoutesFailed, match="deadline"):
        router.chat(USER, deadline=0.3)  # a hangs through the whole deadline; b is picked too late
    servers["a"].set_fault(None)
    idle(router)
    response = router.chat(USER, route="b")  # b still serves: its trial slot was given back
    assert response.choices[0].message.content == "from b"
    assert router.routes["b"].breaker.state is BreakerState.CLOSED


# --- 2. a 200 the router cannot use --------------------------------------------------------------


@pytest.mark.parametrize("fault", MALFORMED)
@pytest.mark.parametrize("mode", MODES)
def test_unusable_200_fails_over_and_counts(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], fault: Fault, mode: str
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(fault, times=1, after_chunks=0)  # streams: broken before any content
    text, info = run(router, mode)
    assert text.startswith("from b")
    assert [a.route for a in info.attempts] == ["a"]
    assert isinstance(info.attempts[0].error, TransientRouteError)  # MalformedResponse, or a cut for NO_CHOICES
    assert router.routes["a"].stats.failures == 1
    idle(router)


@pytest.mark.parametrize("fault", [Fault.TRUNCATED_JSON, Fault.INVALID_JSON])
@pytest.mark.parametrize("mode", STREAMS)
def test_unusable_chunk_after_content_is_a_typed_interruption(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], fault: Fault, mode: str
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(fault, times=1, after_chunks=1)  # "from a": one word delivered, one not
    received, error = partial(router, mode)
    assert isinstance(error, StreamInterruptedError)
    assert error.delivered_text == received and received
    assert isinstance(error.__cause__, MalformedResponse)
    assert router.routes["a"].stats.failures == 1
    idle(router)


@pytest.mark.parametrize("mode", MODES)
def test_sse_noise_ends_in_an_answer_or_a_failover(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(Fault.SSE_NOISE, times=1)
    text, info = run(router, mode)
    assert text.startswith(("from a", "from b"))
    assert info.route == ("a" if text.startswith("from a") else "b")
    idle(router)


@pytest.mark.parametrize("way", ["chat", "stream"])
def test_only_malformed_routes_raise_a_typed_error(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], way: str
) -> None:
    """An HTML page on every route: each attempt is a MalformedResponse, for a plain call as for a stream."""
    router = router_for("a", "b")
    for name in ("a", "b"):
        servers[name].set_fault(Fault.HTML)
    with pytest.raises(AllRoutesFailed) as raised:
        router.chat(USER) if way == "chat" else list(router.stream(USER))
    assert all(isinstance(a.error, MalformedResponse) for a in raised.value.attempts)
    if way == "stream":
        assert [type(a.error) for a in raised.value.attempts] == [MalformedResponse, MalformedResponse]
    idle(router)


# --- 3. asyncio.run per call ----------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_asyncio_run_per_call_leaks_no_loop_client_or_connection(router_for: Callable[..., Router]) -> None:
    router = router_for("a", "b")
    for _ in range(10):
        asyncio.run(router.achat(USER))
    gc.collect()
    fds, threads = _open_fds(), threading.active_count()
    for _ in range(200):
        asyncio.run(router.achat(USER))
    gc.collect()
    assert _open_fds() <= fds + 2
    assert threading.active_count() <= threads
    assert all(len(route._aclients) == 0 for route in router.routes.values())
    loops = [obj for obj in gc.get_objects() if isinstance(obj, asyncio.AbstractEventLoop)]
    assert len([loop for loop in loops if loop.is_closed()]) <= 2
    idle(router)


# --- 4. a malformed /v1/models ----------------------------------------------------------------------


@pytest.mark.parametrize("body", ["html", "null", "invalid", "string", "no_data"])
def test_malformed_models_marks_one_route_unhealthy(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], body: str
) -> None:
    router = router_for("a", "b")
    servers["a"].models_fault = body
    rows = router.health()
    assert rows["a"]["healthy"] is False and rows["a"]["error"]
    assert rows["b"]["healthy"] is True


def test_the_prober_survives_a_route_that_raises(servers: dict[str, FaultServer]) -> None:
    servers["a"].models_fault = "html"
    router = Router(make_config({"a": servers["a"], "b": servers["b"]}, health={"probe_interval": 0.05}))
    try:
        assert wait_for(lambda: router.routes["b"].probe_result.checked_at is not None)
        first = router.routes["b"].probe_result.checked_at
        assert wait_for(lambda: router.routes["b"].probe_result.checked_at != first)  # still probing
        assert router.prober.running
        assert router.routes["a"].probe_result.healthy is False
    finally:
        router.close()


# --- 5. a trickle cannot outlast the deadline --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_deadline_bounds_a_trickling_answer(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str
) -> None:
    router = router_for("a", route_overrides={"a": {"timeout": 30}})
    servers["a"].set_fault(Fault.TRICKLE, interval=0.05)  # a byte every 50 ms: no read ever times out
    started = time.monotonic()
    with pytest.raises(RouterError):
        run(router, mode, deadline=1.0)
    assert time.monotonic() - started < 1.0 + 1.0  # the trickled answer alone takes far longer
    servers["a"].set_fault(None)
    idle(router)


@pytest.mark.parametrize("mode", ["chat", "stream"])
def test_timeout_bounds_a_trickling_attempt_and_fails_over(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str
) -> None:
    router = router_for("a", "b", route_overrides={"a": {"timeout": 0.5}})
    servers["a"].set_fault(Fault.TRICKLE, interval=0.05)
    text, info = run(router, mode)
    assert text.startswith("from b") and info.attempts[0].route == "a"
    assert "timed out" in str(info.attempts[0].error)
    servers["a"].set_fault(None)
    idle(router)


# --- 6. Retry-After extremes ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["3600", "inf", "1e308"])
def test_huge_retry_after_fails_fast_within_the_deadline_and_says_throttled(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], value: str
) -> None:
    router = router_for("a", params={"max_retries": 2})
    servers["a"].set_fault(Fault.STATUS, status=429, retry_after=value)
    started = time.monotonic()
    with pytest.raises(AllRoutesFailed, match="throttled") as raised:
        router.chat(USER, deadline=5)
    assert time.monotonic() - started < 2
    assert "until" in raised.value.reason
    row = router.health(probe=False)["a"]
    assert row["state"] == "throttled" and row["healthy"] is False and row["throttled_until"] is not None
    assert router.routes["a"].not_before - time.monotonic() <= router.config.params.max_retry_after
    idle(router)


@pytest.mark.parametrize("value", ["nan", "-5", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_odd_retry_after_values_are_ignored_or_zero(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], value: str
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(Fault.STATUS, status=429, retry_after=value, times=1)
    text, _ = run(router, "chat")
    assert text == "from b"
    assert router.routes["a"].not_before <= time.monotonic()
    idle(router)


# --- 8. close while busy, and after ------------------------------------------------------------------


def test_close_ends_a_hedged_sync_call_in_flight(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", "b", hedge={"after_ms": 20})
    for server in servers.values():
        server.set_fault(Fault.HANG)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            router.chat(USER)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    assert wait_for(lambda: servers["a"].hits + servers["b"].hits >= 2)  # both copies are out
    router.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert isinstance(outcome[0], RouterClosed)
    idle(router)


def test_close_ends_a_sync_call_in_flight(router_for: Callable[..., Router], servers: dict[str, FaultServer]) -> None:
    router = router_for("a", route_overrides={"a": {"timeout": 30}})
    servers["a"].set_fault(Fault.TRICKLE, interval=0.05)
    outcome: list[BaseException | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_raised(lambda: router.chat(USER))))
    worker.start()
    assert wait_for(lambda: router.routes["a"].stats.in_flight == 1)
    assert wait_for(lambda: servers["a"].hits == 1)
    router.close()
    worker.join(timeout=5)
    assert not worker.is_alive() and isinstance(outcome[0], RouterClosed)
    idle(router)


async def test_close_ends_an_async_call_in_flight(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a")
    servers["a"].set_fault(Fault.HANG)
    task = asyncio.create_task(router.achat(USER))
    while servers["a"].hits == 0:
        await asyncio.sleep(0.005)
    await router.aclose()
    with pytest.raises(RouterClosed):
        await asyncio.wait_for(task, 5)
    idle(router)


def _raised(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


@pytest.mark.parametrize("mode", MODES)
def test_every_call_after_close_raises_router_closed(router_for: Callable[..., Router], mode: str) -> None:
    router = router_for("a")
    router.close()
    with pytest.raises(RouterClosed):
        run(router, mode)
    with pytest.raises(RouterClosed):
        router.health()
    router.close()  # idempotent


def test_a_provider_closing_does_not_close_the_shared_router(servers: dict[str, FaultServer]) -> None:
    from anorag_integrations.providers import VLLMOpenAIProvider

    first = VLLMOpenAIProvider(base_url=servers["a"].base_url, model=MODEL)
    second = VLLMOpenAIProvider(base_url=servers["a"].base_url, model=MODEL)
    assert first.router is second.router
    first.close()
    assert not second.router.closed
    assert second.chat("hello") == "from a"
    assert asyncio.run(second.achat("hello")) == "from a"
    assert second.router.health()["default"]["healthy"]
    second.router.close()


# --- 9. shared routers are bounded ------------------------------------------------------------------


def test_shared_routers_live_only_while_held(servers: dict[str, FaultServer]) -> None:
    gc.collect()
    before, threads = live_shared(), threading.active_count()
    held = [Router.shared(base_url=servers["a"].base_url, model=MODEL, api_key=f"key-{i}") for i in range(30)]
    assert live_shared() == before + 30
    assert held[0] is Router.shared(base_url=servers["a"].base_url, model=MODEL, api_key="key-0")
    del held
    gc.collect()
    assert live_shared() == before
    assert wait_for(lambda: threading.active_count() <= threads)


# --- 10. Ollama routes honour timeout and deadline -----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ollama_route_honours_the_deadline(mode: str) -> None:
    pytest.importorskip("ollama")
    from anorag_integrations.testing.ollama_server import OllamaFaultServer

    with OllamaFaultServer("llama3.2") as server:
        config = make_config(
            {"o": server.root_url}, route_overrides={"o": {"api": "ollama", "model": "llama3.2", "timeout": 30}}
        )
        with Router(config) as router:
            server.set_fault(Fault.HANG)
            started = time.monotonic()
            with pytest.raises(AllRoutesFailed, match="deadline"):
                run(router, mode, deadline=0.5)
            assert time.monotonic() - started < 0.5 + 1.0
            server.set_fault(None)
            idle(router)


# --- 13. a cancelled hedged call cancels both copies ---------------------------------------------


async def test_cancelling_a_hedged_call_before_its_threshold_cancels_the_request(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", "b", hedge={"after_ms": 60_000})
    for server in servers.values():
        server.set_fault(Fault.HANG)
    task = asyncio.create_task(router.achat(USER))
    while servers["a"].hits + servers["b"].hits == 0:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    idle(router)  # nothing keeps running once the caller is gone


# --- 14. zero is not "the default" ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["timeout", "deadline"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "5"])
def test_nonsense_bounds_are_rejected(router_for: Callable[..., Router], key: str, value: Any) -> None:
    router = router_for("a")
    with pytest.raises(ValueError, match=key):
        router.chat(USER, **{key: value})
    idle(router)


def test_call_info_of_a_failover_names_both_routes(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(Fault.HTML, times=1)
    info = call_info(router.chat(USER))
    assert info is not None and info.route == "b" and info.attempts[0].route == "a"


# --- found by the hostile review ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "stream"])
@pytest.mark.parametrize("fault", [Fault.HANG, Fault.SLOW_FIRST_TOKEN])
def test_close_ends_a_sync_call_still_waiting_for_headers(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str, fault: Fault
) -> None:
    """vLLM sends no headers for a plain completion until it is generated: close() must not wait for them."""
    router = router_for("a", route_overrides={"a": {"timeout": 30}})
    servers["a"].set_fault(fault, delay=30)
    outcome: list[BaseException | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_raised(lambda: run(router, mode))))
    worker.start()
    assert wait_for(lambda: servers["a"].hits == 1)
    router.close()
    worker.join(timeout=5)
    assert not worker.is_alive(), "close() left the call waiting for the server"
    assert isinstance(outcome[0], RouterClosed)
    servers["a"].set_fault(None)
    idle(router)


def _nested(depth: int) -> dict[str, Any]:
    """A content part nested ``depth`` mappings deep: past the recursion limit of any JSON encoder."""
    part: dict[str, Any] = {"type": "text", "text": "x"}
    for _ in range(depth):
        part = {"type": "x", "inner": part}
    return part


UNSENDABLE = {"an object": object(), "nested 100,000 deep": [_nested(100_000)]}
"""Contents the SDK cannot encode; the nested one raised RecursionError and opened every route's breaker."""


@pytest.mark.parametrize("content", list(UNSENDABLE))
@pytest.mark.parametrize("mode", MODES)
def test_a_message_that_cannot_be_sent_is_the_callers_error_not_the_routes(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], mode: str, content: str
) -> None:
    router = router_for("a", "b", health={"failure_threshold": 1})
    unsendable = [{"role": "user", "content": UNSENDABLE[content]}]

    async def drain() -> None:
        async for _ in router.astream(unsendable):
            pass

    send: dict[str, Callable[[], object]] = {
        "chat": lambda: router.chat(unsendable),
        "achat": lambda: asyncio.run(router.achat(unsendable)),
        "stream": lambda: list(router.stream(unsendable)),
        "astream": lambda: asyncio.run(drain()),
    }
    with pytest.raises(InvalidRequestError, match="cannot be sent"):
        send[mode]()
    assert all(route.breaker.state is BreakerState.CLOSED for route in router.routes.values())
    assert all(route.stats.failures == 0 for route in router.routes.values())
    assert servers["a"].hits + servers["b"].hits == 0
    assert run(router, "chat")[0] in ("from a", "from b")  # everyone else is still served
    idle(router)


def test_a_sync_stream_keeps_its_chunk_bound_after_the_caller_held_a_chunk(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", route_overrides={"a": {"timeout": 0.5}})
    servers["a"].set_fault(Fault.STALL, after_chunks=1)  # one word, then silence on an open connection
    stream = router.stream(USER)
    first = list(itertools.islice(stream, 2))  # role chunk, first word (islice reads no further)
    assert first
    time.sleep(1.0)  # the caller holds the chunk longer than the route's timeout: not the route's fault
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError, match="timed out"):
        for _ in stream:
            pass
    assert time.monotonic() - started < 0.5 + 1.0  # the next chunk still had 0.5 s, not forever
    servers["a"].set_fault(None)
    idle(router)


def test_a_hedged_close_leaves_no_unretrieved_task_errors(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    router = router_for("a", "b", hedge={"after_ms": 10})
    for server in servers.values():
        server.set_fault(Fault.HANG)
    workers = [threading.Thread(target=lambda: _raised(lambda: router.chat(USER))) for _ in range(4)]
    for worker in workers:
        worker.start()
    assert wait_for(lambda: servers["a"].hits + servers["b"].hits >= 8)
    router.close()
    for worker in workers:
        worker.join(timeout=5)
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert not router._live
    with pytest.raises(RouterClosed):
        router.chat(USER)  # the hedge loop is not brought back
    idle(router)


# --- found by the second hostile review -------------------------------------------------------------


async def test_the_callers_own_timeout_wins_when_it_fires_with_the_attempts(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    """Both bounds fall due in one loop tick (a busy loop): the caller's TimeoutError, no stray cancel left."""
    router = router_for("a", "b", route_overrides={"a": {"timeout": 0.5}})
    servers["a"].set_fault(Fault.HANG)
    loop = asyncio.get_running_loop()
    loop.call_later(0.4, time.sleep, 0.3)  # the loop is blocked across both bounds
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await router.achat(USER)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    servers["a"].set_fault(None)
    idle(router)


async def test_an_async_stream_read_from_other_tasks_keeps_its_bound_and_touches_no_other_task(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    router = router_for("a", route_overrides={"a": {"timeout": 0.5}})
    servers["a"].set_fault(Fault.STALL, after_chunks=1)
    stream = router.astream(USER)
    await stream.__anext__()  # opened in this task
    started = time.monotonic()

    async def read_rest() -> None:
        while True:
            await asyncio.wait_for(stream.__anext__(), 10)  # each read in a task of its own

    with pytest.raises(StreamInterruptedError, match="timed out"):
        await read_rest()
    assert time.monotonic() - started < 0.5 + 1.0
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # the opener was never cancelled
    servers["a"].set_fault(None)
    idle(router)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": float("nan")},
        {"max_tokens": float("inf")},
        {"extra_headers": {"x-n": 1}},
        {"extra_headers": {"x-n": "a\r\nb"}},
        {"extra_body": [1, 2]},
    ],
    ids=["nan", "inf", "header_int", "header_crlf", "extra_body_list"],
)
def test_the_callers_bad_parameters_blame_no_route(
    router_for: Callable[..., Router], servers: dict[str, FaultServer], params: dict[str, Any]
) -> None:
    router = router_for("a", "b", health={"failure_threshold": 1})
    with pytest.raises(InvalidRequestError):
        router.chat(USER, **params)
    assert all(route.breaker.state is BreakerState.CLOSED for route in router.routes.values())
    assert run(router, "chat")[0] in ("from a", "from b")
    idle(router)


@pytest.mark.parametrize("messages", [None, 5, ["hello"]])
def test_messages_that_are_not_a_list_of_mappings_are_refused(router_for: Callable[..., Router], messages: Any) -> None:
    with pytest.raises(InvalidRequestError, match="messages"):
        router_for("a").chat(messages)


def test_a_sendable_request_meeting_a_malformed_answer_still_fails_over(
    router_for: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    """The SDK sends a datetime as text: the HTML that comes back is the route's fault, not the caller's."""
    import datetime

    router = router_for("a", "b")
    servers["a"].set_fault(Fault.HTML, times=1)
    response = router.chat(USER, sent_at=datetime.datetime(2026, 11, 22, 1, 0))
    assert response.choices[0].message.content == "from b"
    assert servers["b"].requests[-1]["sent_at"] == "2026-11-22T01:00:00"
    idle(router)


# --- issue 25, item 15: a page or a document where a stream's events should be -----------------------------


@pytest.mark.parametrize(
    ("fault", "content_type", "start"),
    [
        (Fault.HTML, "text/html", "<!DOCTYPE html> <html> <head><title>***</title>"),
        (Fault.UNSTREAMED, "application/json", '{"id": "chatcmpl-'),  # a server or proxy that ignores stream
    ],
    ids=["html-page", "json-document"],
)
@pytest.mark.parametrize("mode", STREAMS)
def test_a_stream_answered_without_events_is_malformed_and_says_what_came(
    router_for: Callable[..., Router],
    servers: dict[str, FaultServer],
    fault: Fault,
    content_type: str,
    start: str,
    mode: str,
) -> None:
    """Not a cut ("check the server's logs"): a MalformedResponse naming the content type and the first
    characters, the route's api key masked there (this page happens to contain it), then failover."""
    key = "Network login required"
    router = router_for("a", "b", route_overrides={"a": {"api_key": key}})
    servers["a"].set_fault(fault, times=1)
    text, info = run(router, mode)
    assert text.startswith("from b")
    [attempt] = info.attempts
    error = attempt.error
    assert isinstance(error, MalformedResponse) and attempt.route == "a"
    assert f"content type '{content_type}" in str(error) and f"starting '{start}" in str(error)
    assert key not in str(error) and "logs" not in str(error)
    assert error.error_class == "malformed_response"
    assert router.routes["a"].stats.failures == 1
    idle(router)

"""Every fault of the fault-injection server, through chat, achat, stream and astream.

Route ``a`` gets the fault, ``b`` stays healthy; round robin sends the first request to ``a``.
Each test asserts which route served, what the failed attempt said, and that no request was lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from anorag_integrations import (
    AllRoutesFailed,
    AuthenticationError,
    BadRequestError,
    CallInfo,
    ContextOverflowError,
    ModelNotFoundError,
    Router,
    StreamInterruptedError,
    call_info,
)
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import Fault, FaultServer

from .conftest import USER

MODES = ["chat", "achat", "stream", "astream"]
STREAMS = ["stream", "astream"]


def run(router: Router, mode: str, **params: Any) -> tuple[str, CallInfo]:
    """One request in ``mode``; the answer text and how the router served it."""
    if mode == "chat":
        response = router.chat(USER, **params)
        return response.choices[0].message.content or "", call_info(response)  # type: ignore[return-value]
    if mode == "achat":
        response = asyncio.run(router.achat(USER, **params))
        return response.choices[0].message.content or "", call_info(response)  # type: ignore[return-value]
    if mode == "stream":
        chunks = list(router.stream(USER, **params))
    else:

        async def collect() -> list[Any]:
            return [chunk async for chunk in router.astream(USER, **params)]

        chunks = asyncio.run(collect())
    infos = {id(call_info(c)) for c in chunks}
    assert len(infos) == 1, "every chunk carries the same CallInfo"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, call_info(chunks[-1])  # type: ignore[return-value]


def partial(router: Router, mode: str, **params: Any) -> tuple[str, BaseException]:
    """Consume a stream until it raises; what was received and the exception."""
    received: list[str] = []

    async def consume() -> None:
        async for chunk in router.astream(USER, **params):
            received.extend(c.delta.content or "" for c in chunk.choices)

    try:
        if mode == "stream":
            for chunk in router.stream(USER, **params):
                received.extend(c.delta.content or "" for c in chunk.choices)
        else:
            asyncio.run(consume())
    except Exception as exc:
        return "".join(received), exc
    raise AssertionError("the stream did not raise")


# fault, options, what the failed attempt on `a` says, applies to non-stream calls too
TRANSIENT = {
    "http_500": (Fault.STATUS, {"status": 500}, "HTTP 500", True),
    "http_503": (Fault.STATUS, {"status": 503}, "HTTP 503", True),
    "http_429_retry_after": (Fault.STATUS, {"status": 429, "retry_after": 30}, "HTTP 429", True),
    "hang": (Fault.HANG, {}, "timed out after 0.5s", True),
    "connection_refused": (Fault.REFUSE, {}, "cannot connect", True),
    "cut_before_content": (Fault.CUT, {"after_chunks": 0}, "", True),
    "error_event_before_content": (Fault.ERROR_EVENT, {"after_chunks": 0}, "error event in stream", False),
    "slow_first_token": (Fault.SLOW_FIRST_TOKEN, {"delay": 3}, "timed out", True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRANSIENT, ids=list(TRANSIENT))
def test_transient_fault_fails_over_and_loses_nothing(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], case: str, mode: str
) -> None:
    fault, options, says, applies_to_chat = TRANSIENT[case]
    router = router_for("a", "b", route_overrides={"a": {"timeout": 0.5}})
    servers["a"].set_fault(fault, **options)
    if mode not in STREAMS and not applies_to_chat:
        text, info = run(router, mode)
        assert (text, info.route, info.attempts) == ("from a", "a", [])
        return

    results = [run(router, mode) for _ in range(6)]

    assert [text for text, _ in results] == ["from b"] * 6  # nothing lost, nothing garbled
    assert [info.route for _, info in results] == ["b"] * 6
    first = results[0][1]
    assert [a.route for a in first.attempts] == ["a"]
    assert says in str(first.attempts[0].error)
    a_stats = router.stats()["a"]
    if case == "http_429_retry_after":
        assert a_stats["failures"] == 1  # Retry-After keeps a out of rotation afterwards
    else:
        assert a_stats["failures"] == 3  # then a's breaker opened and a was skipped
        assert router.routes["a"].breaker.state is BreakerState.OPEN
    assert router.stats()["b"]["successes"] == 6
    assert a_stats["in_flight"] == 0 and router.stats()["b"]["in_flight"] == 0


AFTER_CONTENT = {
    "cut_mid_stream": (Fault.CUT, {"after_chunks": 3}),
    "error_event_mid_stream": (Fault.ERROR_EVENT, {"after_chunks": 3, "status": 500}),
}


@pytest.mark.parametrize("mode", STREAMS)
@pytest.mark.parametrize("case", AFTER_CONTENT)
def test_stream_broken_after_content_says_what_was_delivered(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], case: str, mode: str
) -> None:
    fault, options = AFTER_CONTENT[case]
    router = router_for("a", "b")
    servers["a"].reply = "one two three four five six"
    servers["a"].set_fault(fault, **options)

    received, exc = partial(router, mode)

    assert isinstance(exc, StreamInterruptedError), exc
    assert exc.route == "a"
    assert received == "one two three " == exc.delivered_text  # exactly what the caller saw
    assert "3 characters" not in str(exc) and f"({len(received)} characters)" in str(exc)
    assert servers["b"].hits == 0  # not silently re-asked elsewhere (that would duplicate text)
    assert router.stats()["a"]["failures"] == 1 and router.stats()["a"]["in_flight"] == 0


@pytest.mark.parametrize("mode", STREAMS)
def test_error_event_with_client_status_mid_stream_is_permanent(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", "b")
    servers["a"].reply = "one two three four"
    servers["a"].set_fault(Fault.ERROR_EVENT, after_chunks=2, status=400, message="bad logits_processors")
    received, exc = partial(router, mode)
    assert received == "one two "
    assert isinstance(exc, BadRequestError) and exc.status == 400 and "bad logits_processors" in str(exc)


PERMANENT = {
    "bad_request": ({"status": 400, "message": "temperature must be >= 0"}, BadRequestError),
    "context_overflow": (
        {"status": 400, "message": "This model's maximum context length is 4096 tokens. However, you requested 9000"},
        ContextOverflowError,
    ),
    "unauthorized": ({"status": 401, "message": "Unauthorized"}, AuthenticationError),
}
"""A 404 is not here: it takes the route out of the model's group and fails over (``test_models.py``)."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", PERMANENT)
def test_permanent_error_is_raised_at_once(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], case: str, mode: str
) -> None:
    options, cls = PERMANENT[case]
    router = router_for("a", "b", params={"max_retries": 2})
    servers["a"].set_fault(Fault.STATUS, **options)
    with pytest.raises(cls) as info:
        run(router, mode)
    assert info.value.route == "a" and info.value.status == options["status"]
    assert info.value.hint
    assert servers["a"].hits == 1 and servers["b"].hits == 0  # no retry, no failover
    assert router.routes["a"].breaker._failures == (1 if cls is AuthenticationError else 0)


def test_route_404_for_its_own_model_names_served_model_flag(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", "b", route_overrides={"b": {"model": "not-served"}})
    with pytest.raises(ModelNotFoundError, match="--served-model-name") as info:
        router.chat(USER, route="b")  # pinned: sent as configured, and the server says it does not exist
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_all_routes_failing_lists_every_attempt_of_every_round(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", "b", params={"max_retries": 1}, health={"failure_threshold": 10})
    servers["a"].set_fault(Fault.STATUS, status=503)
    servers["b"].set_fault(Fault.STATUS, status=502)
    with pytest.raises(AllRoutesFailed) as info:
        run(router, mode)
    attempts = info.value.attempts
    assert sorted((a.round, a.route) for a in attempts) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert [a.round for a in attempts] == [1, 1, 2, 2]
    assert "HTTP 503" in str(info.value) and "HTTP 502" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_fallback_route_is_tried_last_and_only_then(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", "b", "c", fallback_route="c")
    for _ in range(4):
        assert run(router, mode)[1].route in ("a", "b")
    assert servers["c"].hits == 0
    servers["a"].set_fault(Fault.STATUS, status=503)
    servers["b"].set_fault(Fault.REFUSE)
    text, info = run(router, mode)
    assert text == "from c" and info.route == "c"
    assert sorted(a.route for a in info.attempts) == ["a", "b"]


@pytest.mark.parametrize("mode", MODES)
def test_retry_after_is_waited_out_between_rounds(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", params={"max_retries": 1})
    servers["a"].set_fault(Fault.STATUS, status=429, retry_after=0.4, times=1)
    started = time.monotonic()
    text, info = run(router, mode)
    assert text == "from a" and info.rounds == 2 and len(info.attempts) == 1
    assert time.monotonic() - started >= 0.4  # the server asked for 0.4 s; the router waited at least that


@pytest.mark.parametrize("mode", MODES)
def test_deadline_bounds_the_whole_request(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", "b", params={"max_retries": 3, "timeout": 30, "deadline": 0.5})
    servers["a"].set_fault(Fault.HANG)
    servers["b"].set_fault(Fault.HANG)
    with pytest.raises(AllRoutesFailed) as info:
        run(router, mode)
    assert info.value.reason == "deadline exceeded"
    assert [a.route for a in info.value.attempts] == ["a"]  # the one attempt used the whole budget
    assert "timed out after 0.5" in str(info.value.attempts[0].error) or "timed out" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_pinned_route_is_used_and_not_failed_over(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a", "b")
    assert [run(router, mode, route="b")[1].route for _ in range(3)] == ["b"] * 3
    servers["b"].set_fault(Fault.STATUS, status=503)
    with pytest.raises(AllRoutesFailed):
        run(router, mode, route="b")
    assert servers["a"].hits == 0
    with pytest.raises(ValueError, match="unknown route 'zz'; routes: a, b"):
        run(router, mode, route="zz")


def test_parameters_pass_through_and_vllm_extras_go_to_the_body(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", params={"max_tokens": 3, "temperature": 0.1})
    run(router, "chat", top_k=5, extra_body={"min_p": 0.2}, seed=7)
    body = servers["a"].requests[-1]
    assert (body["top_k"], body["min_p"], body["seed"]) == (5, 0.2, 7)
    assert (body["max_tokens"], body["temperature"], body["model"]) == (3, 0.1, "m")
    run(router, "stream", max_tokens=2)
    body = servers["a"].requests[-1]
    assert body["max_tokens"] == 2 and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("mode", STREAMS)
def test_stream_usage_and_ttft_reach_stats(
    servers: dict[str, FaultServer], router_for: Callable[..., Router], mode: str
) -> None:
    router = router_for("a")
    servers["a"].set_fault(Fault.SLOW_FIRST_TOKEN, delay=0.2)
    _, info = run(router, mode)
    stats = router.stats()["a"]
    assert info.ttft_s is not None and info.ttft_s >= 0.2
    assert stats["ttft_p50_ms"] >= 200 and stats["output_tokens"] == 2  # "from a": two words
    assert stats["tokens_per_s"] is not None


def test_abandoned_stream_is_neither_success_nor_failure(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a")
    stream = router.stream(USER)
    next(iter(stream))
    stream.close()  # type: ignore[attr-defined]

    async def abandon() -> None:
        agen = router.astream(USER)
        await agen.__anext__()
        await agen.aclose()  # type: ignore[attr-defined]

    asyncio.run(abandon())
    stats = router.stats()["a"]
    assert (stats["requests"], stats["successes"], stats["failures"], stats["in_flight"]) == (2, 0, 0, 0)


def test_concurrent_async_requests_are_spread_and_none_lost(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", "b", "c", lb_policy="least_outstanding")
    servers["a"].set_fault(Fault.DELAY, delay=0.2)
    servers["b"].set_fault(Fault.DELAY, delay=0.2)
    servers["c"].set_fault(Fault.STATUS, status=503)

    async def many() -> list[Any]:
        return await asyncio.gather(*(router.achat(USER) for _ in range(30)))

    results = asyncio.run(many())
    routes = [call_info(r).route for r in results]  # type: ignore[union-attr]
    assert len(results) == 30 and set(routes) == {"a", "b"}
    assert abs(routes.count("a") - routes.count("b")) <= 6
    assert all(stats["in_flight"] == 0 for stats in router.stats().values())


def test_stream_names_its_route_from_the_first_chunk(
    servers: dict[str, FaultServer], router_for: Callable[..., Router]
) -> None:
    router = router_for("a", "b")
    servers["a"].set_fault(Fault.STATUS, status=503)
    stream = iter(router.stream(USER))
    first = next(stream)
    info = call_info(first)
    assert info is not None and info.route == "b" and info.latency_s is None  # still streaming
    list(stream)
    assert info.latency_s is not None


def test_failover_and_breaker_opening_are_logged_without_secrets(
    servers: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    from anorag_integrations.config import config_from_dict

    routes = {n: {"base_url": servers[n].base_url, "model": "m", "api_key": "sk-live-9f8e7d"} for n in ("a", "b")}
    config = config_from_dict({"llm": {"routes": routes, "health": {"failure_threshold": 1}}}, env={})
    servers["a"].set_fault(Fault.STATUS, status=503)
    caplog.set_level("INFO", logger="anorag_integrations")
    with Router(config) as router:
        router.chat(USER)
        with pytest.raises(AllRoutesFailed) as info:
            router.chat(USER, route="a")
    messages = [r.getMessage() for r in caplog.records]
    assert any("failing over" in m and "'a'" in m and "HTTP 503" in m for m in messages)
    assert any("circuit breaker opened" in m for m in messages)
    assert servers["a"].last_authorization == "Bearer sk-live-9f8e7d"  # the key reached the server ...
    everything = "\n".join(messages) + str(info.value) + repr(info.value.attempts) + repr(router.routes)
    assert "sk-live-9f8e7d" not in everything  # ... and appears in no log, error or repr

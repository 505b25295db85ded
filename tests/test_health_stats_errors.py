"""Circuit breaker transitions, bounded statistics, and the mapping of SDK errors to typed ones."""

from __future__ import annotations

import threading

import httpx2
import openai
import pytest

import anorag_integrations.router.classify as mapping
from anorag_integrations.router import errors
from anorag_integrations.router.endpoints.health import BreakerState, CircuitBreaker
from anorag_integrations.router.telemetry.stats import WINDOW, RouteStats, percentile


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fail(breaker: CircuitBreaker) -> None:
    """One request admitted now fails."""
    ticket = breaker.acquire()
    assert ticket is not None
    breaker.record_failure(ticket)


def test_breaker_opens_after_threshold_then_half_opens_for_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    _fail(breaker)
    _fail(breaker)
    assert breaker.state is BreakerState.CLOSED and breaker.acquire()
    _fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.available() and not breaker.acquire()
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.acquire()  # the one trial
    assert trial is not None and trial.trial
    assert not breaker.acquire() and not breaker.available()  # everyone else waits for it
    breaker.record_success(trial)
    assert breaker.state is BreakerState.CLOSED and breaker.acquire()


class Grants:
    """A breaker listener standing in for shared state: ``granted`` says whether this replica holds the trial."""

    def __init__(self) -> None:
        self.granted = True

    def breaker_changed(self, route: str) -> None:
        pass

    def may_trial(self, route: str, epoch: int) -> bool:
        return self.granted


def test_a_trial_given_back_is_sent_again_only_while_the_fleet_still_grants_it() -> None:
    """Half-open with its slot free asks the fleet again: the grant may have passed to another replica."""
    clock, grants = Clock(), Grants()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.listener = grants
    _fail(breaker)
    clock.now += 5
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    breaker.release(trial)  # given back (the caller's deadline, a cancellation): no outcome
    grants.granted = False  # meanwhile another replica took the fleet's trial
    assert breaker.acquire() is None and not breaker.available() and breaker.state is BreakerState.OPEN
    grants.granted = True
    again = breaker.acquire()
    assert again is not None and again.trial


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    _fail(breaker)
    clock.now += 5
    _fail(breaker)
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN


def test_good_probe_ends_the_cooldown_but_does_not_close() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=60, clock=Clock())
    _fail(breaker)
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire() and not breaker.acquire()
    closed = CircuitBreaker(failure_threshold=2, cooldown_s=60, clock=Clock())
    _fail(closed)
    closed.probe_succeeded()  # does not wipe the count of real failures
    _fail(closed)
    assert closed.state is BreakerState.OPEN


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=Clock())
    for _ in range(5):
        _fail(breaker)
        ticket = breaker.acquire()
        assert ticket is not None
        breaker.record_success(ticket)
    assert breaker.state is BreakerState.CLOSED


def test_released_trial_lets_the_next_request_try() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1, clock=clock)
    _fail(breaker)
    clock.now += 1
    trial = breaker.acquire()
    assert trial is not None
    breaker.release(trial)  # e.g. the trial got a 400: says nothing about the route
    assert breaker.acquire()


def test_outcomes_of_requests_admitted_before_the_breaker_opened_decide_nothing() -> None:
    """Half-open admits exactly one trial: an older request ending cannot close the breaker or free a second trial."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1, clock=clock)
    old_ok, old_bad = breaker.acquire(), breaker.acquire()
    assert old_ok is not None and old_bad is not None
    _fail(breaker)
    clock.now += 1
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    breaker.record_success(old_ok)  # admitted while closed, before the opening
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.acquire()
    breaker.record_failure(old_bad)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.trial_in_flight and not breaker.acquire()
    breaker.release(old_bad)
    assert breaker.trial_in_flight and not breaker.acquire()
    breaker.record_success(trial)
    assert breaker.state is BreakerState.CLOSED and not breaker.trial_in_flight


def test_stats_percentiles_and_bounded_window() -> None:
    stats = RouteStats()
    for i in range(WINDOW * 3):
        stats.started()
        stats.succeeded(latency_s=(i % 100 + 1) / 1000, ttft_s=0.0005, output_tokens=10)
    snap = stats.snapshot()
    assert snap["requests"] == snap["successes"] == WINDOW * 3
    assert len(stats._latency) == WINDOW  # memory does not grow with requests
    assert snap["latency_p50_ms"] == pytest.approx(50.5, abs=1)
    assert snap["latency_p99_ms"] == pytest.approx(99, abs=1.5)
    assert snap["ttft_p50_ms"] == 0.5
    assert snap["output_tokens"] == WINDOW * 30
    assert snap["in_flight"] == 0


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_stats_are_consistent_under_threads() -> None:
    stats = RouteStats()

    def work() -> None:
        for _ in range(2000):
            stats.started()
            stats.succeeded(0.001)
            stats.started()
            stats.failed("x")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert (snap["requests"], snap["successes"], snap["failures"], snap["in_flight"]) == (32000, 16000, 16000, 0)


REQUEST = httpx2.Request("POST", "http://gpu1:8000/v1/chat/completions")


def status_error(
    status: int, message: str, headers: dict[str, str] | None = None, kind: str = "Err"
) -> openai.APIStatusError:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    response = httpx2.Response(status, json=body, headers=headers, request=REQUEST)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError, 404: openai.NotFoundError}.get(
        status, openai.APIStatusError
    )
    return cls(message, response=response, body=body)


def classify(exc: BaseException) -> errors.RouteError:
    return mapping.classify(exc, route="gpt20_a", url="http://gpu1:8000/v1", model="gpt-oss", timeout=30)


CASES = [
    (status_error(500, "boom"), errors.TransientRouteError, "server-side error"),
    (status_error(503, "loading"), errors.TransientRouteError, "server-side error"),
    (status_error(429, "slow down"), errors.TransientRouteError, "slow down"),
    (status_error(408, "timeout"), errors.TransientRouteError, ""),
    (status_error(400, "bad temperature"), errors.BadRequestError, "check the request"),
    (
        status_error(400, "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens"),
        errors.ContextOverflowError,
        "shorten the prompt",
    ),
    (
        status_error(400, "request (9000 tokens) exceeds the available context size", kind="exceed_context_size_error"),
        errors.ContextOverflowError,
        "lower max_tokens",
    ),
    (status_error(401, "bad key"), errors.AuthenticationError, "api_key"),
    (status_error(403, "forbidden"), errors.AuthenticationError, "--api-key"),
    (status_error(404, "The model `x` does not exist."), errors.ModelNotFoundError, "--served-model-name"),
    (status_error(422, "field required"), errors.UnprocessableEntityError, ""),
    (openai.APITimeoutError(request=REQUEST), errors.TransientRouteError, "raise this route's `timeout`"),
    (openai.APIConnectionError(request=REQUEST), errors.TransientRouteError, "is the server started"),
    (
        openai.APIError("x", request=REQUEST, body={"message": "engine died", "code": 500}),
        errors.TransientRouteError,
        "",
    ),
    (
        openai.APIError("x", request=REQUEST, body={"message": "bad", "type": "BadRequestError", "code": 400}),
        errors.BadRequestError,
        "",
    ),
]


@pytest.mark.parametrize(("exc", "cls", "hint"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)])
def test_error_mapping(exc: BaseException, cls: type[errors.RouteError], hint: str) -> None:
    error = classify(exc)
    assert type(error) is cls
    assert "gpt20_a" in str(error) and "http://gpu1:8000/v1" in str(error)
    assert hint in str(error)


def test_breaker_counts_transient_and_misconfiguration_only() -> None:
    assert mapping.trips_breaker(classify(status_error(503, "x")))
    assert mapping.trips_breaker(classify(status_error(401, "x")))
    model_404 = classify(status_error(404, "The model `x` does not exist."))
    assert not mapping.trips_breaker(model_404)  # out of the model's group instead
    assert mapping.trips_breaker(classify(status_error(404, "Not Found")))  # no such path: base_url is wrong
    assert not mapping.trips_breaker(classify(status_error(400, "x")))
    assert not mapping.trips_breaker(classify(status_error(422, "x")))


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [({"retry-after": "3"}, 3.0), ({"retry-after-ms": "250"}, 0.25), ({"retry-after": "soon"}, None), ({}, None)],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert classify(status_error(429, "x", headers)).retry_after == seconds


def test_retry_after_http_date() -> None:
    import email.utils
    import time

    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    value = classify(status_error(503, "x", {"retry-after": date})).retry_after
    assert value is not None and 25 < value <= 30


def test_all_routes_failed_lists_every_attempt() -> None:
    attempts = [
        errors.Attempt("a", classify(status_error(503, "down")), 0.01, 1),
        errors.Attempt("b", classify(openai.APITimeoutError(request=REQUEST)), 2.0, 1),
    ]
    exc = errors.AllRoutesFailed(attempts, "every available route failed")
    text = str(exc)
    assert "2 attempts" in text and "HTTP 503" in text and "timed out" in text
    assert [a.route for a in exc.attempts] == ["a", "b"]

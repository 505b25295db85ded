"""Router.embed / aembed against FaultServer: routing by kind, batching, failover per batch, long inputs.

FaultServer answers a deterministic vector per text (``fake_vector``), so every test can check that
each vector belongs to its input. The openai SDK asks for base64 (float32) by default, hence
:func:`expected`, the vector as float32 would carry it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse, Embedding
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from anorag_integrations import (
    AllRoutesFailed,
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    MalformedResponse,
    Router,
    RouterClosed,
    call_info,
)
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.endpoints.route import checked_embeddings
from anorag_integrations.router.errors import InputTooLongError, MixedEmbeddingsError, NoRouteOfKindError
from anorag_integrations.testing import Fault, FaultServer
from anorag_integrations.testing.embeddings import fake_vector

from .conftest import MODEL, USER, make_config


def expected(text: str) -> list[float]:
    """``fake_vector(text)`` as it arrives through base64: each value rounded to float32."""
    vector = fake_vector(text)
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def vectors(response: Any) -> list[list[float]]:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return [item.embedding for item in response.data]


def settled(router: Router) -> None:
    """Every counter is back: nothing in flight, no call registered with close(), no trial slot held."""
    assert not router._live
    for route in router.routes.values():
        assert route.stats.in_flight == 0, route.name
        assert not route.breaker.trial_in_flight, route.name


def sent_texts(*servers: FaultServer) -> collections.Counter[str]:
    """How many requests each text was sent in, over ``servers``."""
    return collections.Counter(text for server in servers for body in server.requests for text in body["input"])


@pytest.fixture
def embedders(router_for: Callable[..., Router]) -> Callable[..., Router]:
    """Factory: a router whose named servers are embedding routes (default a and b), chat routes for ``chat=``."""

    def build(*names: str, chat: tuple[str, ...] = (), **llm: Any) -> Router:
        names = names or ("a", "b")
        overrides = {name: {"kind": "embedding", **llm.get("route_overrides", {}).get(name, {})} for name in names}
        llm["route_overrides"] = {**llm.get("route_overrides", {}), **overrides}
        return router_for(*chat, *names, **llm)

    return build


TEXTS = [f"text number {i}" for i in range(10)]


# --- routing by kind ---------------------------------------------------------------------------------


def test_chat_and_embedding_calls_go_to_routes_of_their_own_kind_only(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("b", chat=("a",))
    for _ in range(3):
        assert router.chat(USER).choices[0].message.content == "from a"
        assert vectors(router.embed(TEXTS[:2])) == [expected(t) for t in TEXTS[:2]]
    assert servers["a"].hits == 3 and all("messages" in body for body in servers["a"].requests)
    assert servers["b"].hits == 3 and all("input" in body for body in servers["b"].requests)
    settled(router)


def test_a_failing_route_of_one_kind_never_fails_over_to_the_other_kind(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("b", chat=("a",))
    servers["a"].set_fault(Fault.STATUS, status=503)
    with pytest.raises(AllRoutesFailed):
        router.chat(USER)
    servers["a"].set_fault(None)
    servers["b"].set_fault(Fault.STATUS, status=503)
    with pytest.raises(AllRoutesFailed):
        router.embed(TEXTS)
    assert all("messages" in body for body in servers["a"].requests)
    assert all("input" in body for body in servers["b"].requests)
    settled(router)


def test_a_call_of_a_kind_without_routes_says_so(embedders: Callable[..., Router], router_for: Any) -> None:
    only_embeddings = embedders("a")
    with pytest.raises(NoRouteOfKindError, match="no route of kind chat"):
        only_embeddings.chat(USER)
    only_chat = router_for("a")
    with pytest.raises(NoRouteOfKindError, match=r"no route of kind embedding.*kind: embedding") as raised:
        only_chat.embed(TEXTS)
    assert isinstance(raised.value, InvalidRequestError) and raised.value.kind == "embedding"


def test_pinning_a_route_of_the_other_kind_is_refused(embedders: Callable[..., Router]) -> None:
    router = embedders("b", chat=("a",))
    with pytest.raises(InvalidRequestError, match="route 'a' serves chat, not embedding; embedding routes: b"):
        router.embed(TEXTS, route="a")
    with pytest.raises(InvalidRequestError, match="route 'b' serves embedding, not chat"):
        router.chat(USER, route="b")
    assert vectors(router.embed(TEXTS[:1], route="b")) == [expected(TEXTS[0])]


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"default_route": "e"}, "default_route: route 'e' is of kind embedding, not chat"),
        ({"default_embedding_route": "c"}, "default_embedding_route: route 'c' is of kind chat, not embedding"),
        ({"fallback_route": "e"}, "fallback_route: route 'e' is of kind embedding, not chat"),
        ({"fallback_embedding_route": "e"}, "fallback_embedding_route: needs at least one other embedding route"),
        ({"embedding": {"batch_size": 0}}, "llm.embedding.batch_size"),
    ],
)
def test_config_keys_of_each_kind_name_routes_of_that_kind(llm: dict[str, Any], message: str) -> None:
    routes = {"c": "http://127.0.0.1:9/v1", "e": "http://127.0.0.1:10/v1"}
    with pytest.raises(ConfigError, match=message):
        make_config(routes, route_overrides={"e": {"kind": "embedding"}}, **llm)


def test_one_config_holds_both_kinds_with_a_fallback_and_default_each() -> None:
    urls = {name: f"http://127.0.0.1:{9 + i}/v1" for i, name in enumerate(("c1", "c2", "e1", "e2"))}
    config = make_config(
        urls,
        route_overrides={"e1": {"kind": "embedding"}, "e2": {"kind": "embedding"}},
        fallback_route="c2",
        fallback_embedding_route="e2",
    )
    assert (config.default_route_of("chat"), config.default_route_of("embedding")) == ("c1", "e1")
    router = Router(config, start_prober=False)
    try:
        chat, embedding = router.pools["chat"], router.pools["embedding"]
        assert [r.name for r in chat.primary] == ["c1"] and chat.fallback is router.routes["c2"]
        assert [r.name for r in embedding.primary] == ["e1"] and embedding.fallback is router.routes["e2"]
        assert chat.policy is not embedding.policy  # a policy's rotation and caches are per kind
    finally:
        router.close()


def test_the_default_chat_route_env_overrides_skip_embedding_routes() -> None:
    routes = {"e": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "kind": "embedding"},
              "c": {"base_url": "http://127.0.0.1:10/v1", "model": "m"}}  # fmt: skip
    config = config_from_dict({"llm": {"routes": routes}}, env={"VLLM_MODEL": "other"})
    assert (config.routes["c"].model, config.routes["e"].model) == ("other", "m")
    assert config.default_route_name == "c"


# --- batching ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FaultServer, FaultServer]]:
    with FaultServer(MODEL) as a, FaultServer(MODEL) as b:
        yield a, b


@pytest.fixture(scope="module")
def pair_router(pair: tuple[FaultServer, FaultServer]) -> Iterator[Router]:
    servers = {"a": pair[0], "b": pair[1]}
    overrides = {name: {"kind": "embedding"} for name in servers}
    router = Router(make_config(servers, route_overrides=overrides, embedding={"max_concurrency": 3}))
    yield router
    router.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40), max_size=25),
    batch_size=st.integers(1, 9),
    use_async=st.booleans(),
)
def test_any_texts_and_batch_size_give_vectors_in_input_order_and_every_counter_back(
    pair_router: Router, texts: list[str], batch_size: int, use_async: bool
) -> None:
    if use_async:
        response = asyncio.run(pair_router.aembed(texts, batch_size=batch_size))
    else:
        response = pair_router.embed(texts, batch_size=batch_size)
    assert vectors(response) == [expected(text) for text in texts]
    info = call_info(response)
    assert info is not None and len(info.batches) == -(-len(texts) // batch_size)
    assert response.usage.prompt_tokens == sum(len(t.split()) + 2 for t in texts)
    settled(pair_router)


def test_batches_run_at_most_max_concurrency_at_once(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].latency = 0.1
    router = embedders("a", embedding={"batch_size": 2, "max_concurrency": 2})
    assert vectors(router.embed(TEXTS)) == [expected(t) for t in TEXTS]  # 5 batches
    assert servers["a"].hits == 5 and servers["a"].most_running == 2


def test_only_the_batches_that_failed_are_resent(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    a, b = servers["a"], servers["b"]
    router = embedders("a", "b", embedding={"batch_size": 2, "max_concurrency": 3})
    a.set_fault(Fault.STATUS, status=503, times=2)  # the first two batches a gets fail, then it recovers
    response = router.embed(TEXTS)
    assert vectors(response) == [expected(t) for t in TEXTS]
    sent = sent_texts(a, b)
    twice = sorted(text for text, count in sent.items() if count == 2)
    assert len(twice) == 4 and all(count in (1, 2) for count in sent.values())  # two batches of two, resent once
    assert a.hits + b.hits == 5 + 2
    info = call_info(response)
    assert info is not None and [attempt.route for attempt in info.attempts] == ["a", "a"]
    assert router.stats()["a"]["failovers"] == 2
    settled(router)


async def test_async_batches_fail_over_alone_too(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    a, b = servers["a"], servers["b"]
    router = embedders("a", "b", embedding={"batch_size": 3})
    b.set_fault(Fault.CUT, times=1)
    response = await router.aembed(TEXTS)
    assert vectors(response) == [expected(t) for t in TEXTS]
    assert sum(count == 2 for count in sent_texts(a, b).values()) == 3  # one batch of three, sent twice
    settled(router)


def test_a_batch_rejected_for_good_ends_the_call_and_the_others_stop(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].max_model_len = servers["b"].max_model_len = 10
    router = embedders(embedding={"batch_size": 1, "max_concurrency": 2})
    texts = [*TEXTS[:4], "nine words that only just fail with the specials", *TEXTS[4:]]
    with pytest.raises(ContextOverflowError) as raised:  # nine words fit the estimate; eleven tokens do not
        router.embed(texts)
    assert not isinstance(raised.value, InputTooLongError) and raised.value.status == 400
    assert servers["a"].hits + servers["b"].hits < len(texts)  # batches after it were never sent
    settled(router)


def test_an_empty_list_sends_nothing(servers: dict[str, FaultServer], embedders: Callable[..., Router]) -> None:
    router = embedders()
    response = router.embed([])
    assert response.data == [] and response.usage.prompt_tokens == 0 and response.model == MODEL
    assert servers["a"].hits == servers["b"].hits == 0


def test_one_string_is_one_input_and_non_strings_are_refused(embedders: Callable[..., Router]) -> None:
    router = embedders()
    assert vectors(router.embed("hello")) == [expected("hello")]
    with pytest.raises(InvalidRequestError, match=r"texts\[1\] must be a string, got int"):
        router.embed(["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="batch_size must be a whole number >= 1"):
        router.embed(["a"], batch_size=0)
    with pytest.raises(InvalidRequestError, match="truncate must be True or False"):
        router.embed(["a"], truncate="yes")


def test_sync_embed_needs_no_loop_of_the_caller_and_works_inside_one(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders(embedding={"batch_size": 2})
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(router.embed(TEXTS)))  # a thread with no loop
    thread.start()
    thread.join(timeout=30)

    async def inside_a_running_loop() -> Any:
        return router.embed(TEXTS)  # blocks this loop, runs on the router's own

    results.append(asyncio.run(inside_a_running_loop()))
    assert [vectors(r) for r in results] == [[expected(t) for t in TEXTS]] * 2
    settled(router)


# --- failures, bounds, close ------------------------------------------------------------------------


def test_faults_on_embeddings_fail_over(servers: dict[str, FaultServer], embedders: Callable[..., Router]) -> None:
    router = embedders(embedding={"batch_size": 100}, params={"max_retries": 1}, health={"failure_threshold": 100})
    for fault in (
        Fault.STATUS,
        Fault.NO_CHOICES,
        Fault.HTML,
        Fault.TRUNCATED_JSON,
        Fault.INVALID_JSON,
        Fault.STRING_BODY,
        Fault.CUT,
    ):
        servers["a"].set_fault(fault, times=1)
        servers["b"].set_fault(fault, times=1)
        response = router.embed(TEXTS)
        info = call_info(response)
        assert info is not None and len(info.attempts) == 2 and info.rounds == 2, fault  # both failed once
        assert vectors(response) == [expected(t) for t in TEXTS]
    settled(router)


def test_the_deadline_bounds_the_whole_embed_call(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].set_fault(Fault.HANG)
    servers["b"].set_fault(Fault.HANG)
    router = embedders(embedding={"batch_size": 2})
    started = time.monotonic()
    with pytest.raises(AllRoutesFailed, match="deadline exceeded"):
        router.embed(TEXTS, deadline=0.5)
    assert time.monotonic() - started < 2.0
    settled(router)


@pytest.mark.parametrize("use_async", [False, True])
def test_close_ends_an_embed_call_in_flight(
    servers: dict[str, FaultServer], embedders: Callable[..., Router], use_async: bool
) -> None:
    servers["a"].set_fault(Fault.HANG)
    servers["b"].set_fault(Fault.HANG)
    router = embedders(embedding={"batch_size": 2})
    raised: list[BaseException] = []

    def run() -> None:
        try:
            if use_async:
                asyncio.run(router.aembed(TEXTS))
            else:
                router.embed(TEXTS)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: servers["a"].hits + servers["b"].hits >= 2)
    router.close()
    thread.join(timeout=15)
    assert not thread.is_alive() and len(raised) == 1 and isinstance(raised[0], RouterClosed)
    settled(router)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- long inputs -------------------------------------------------------------------------------------


def test_an_input_clearly_too_long_is_refused_before_anything_is_sent(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].max_model_len = servers["b"].max_model_len = 50
    router = embedders(embedding={"batch_size": 2})
    texts = [*TEXTS, "word " * 60]
    with pytest.raises(InputTooLongError) as raised:
        router.embed(texts)
    error = raised.value
    assert (error.index, error.estimate, error.limit) == (10, 60, 50)
    assert isinstance(error, ContextOverflowError) and isinstance(error, InvalidRequestError)
    assert "truncate" in str(error) and "nothing was sent" in str(error)
    assert servers["a"].hits == servers["b"].hits == 0  # probed for max_model_len, never asked to embed
    by_chars = " ".join(["x" * 100] * 5)  # 5 words of 100 characters: at least 5 x 13 tokens
    with pytest.raises(InputTooLongError):
        router.embed([by_chars])
    assert router.outcomes.snapshot() == {("", "m", "invalid"): 2}
    one_long_word = "ACGT" * 500  # 2,000 characters, but WordPiece makes it one [UNK]: not refused here
    assert len(router.embed([one_long_word]).data) == 1
    settled(router)


def test_the_configured_window_counts_without_a_probe(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("a", route_overrides={"a": {"max_model_len": 5}})
    with pytest.raises(InputTooLongError, match="maximum context length of 5 tokens"):
        router.embed(["one two three four five six"])
    assert router.routes["a"].probe_result.checked_at is None


async def test_truncate_lets_the_server_cut_long_inputs(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].max_model_len = servers["b"].max_model_len = 50
    long = "word " * 60
    router = embedders(embedding={"truncate": True})
    response = await router.aembed([long, "short"])
    assert vectors(response) == [expected(" ".join(["word"] * 48)), expected("short")]  # cut to 50 tokens
    sent = servers["a"].requests + servers["b"].requests
    assert [body["truncate_prompt_tokens"] for body in sent] == [-1]
    assert response.usage.prompt_tokens == 50 + 3
    off = embedders(embedding={"truncate": True})
    with pytest.raises(InputTooLongError):
        await off.aembed([long], truncate=False)  # the call's choice wins over the config's


async def test_an_explicit_truncate_prompt_tokens_is_sent_as_given(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].max_model_len = servers["b"].max_model_len = 50
    router = embedders()
    response = await router.aembed(["word " * 60], truncate_prompt_tokens=10)
    assert response.usage.prompt_tokens == 10
    assert [body["truncate_prompt_tokens"] for body in servers["a"].requests + servers["b"].requests] == [10]


# --- statistics, metrics, spans --------------------------------------------------------------------


def test_an_embed_call_is_one_outcome_and_an_attempt_per_batch(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("a", embedding={"batch_size": 4})
    response = router.embed(TEXTS)
    info = call_info(response)
    assert info is not None and info.route == "a" and info.batches == ["a", "a", "a"] and info.latency_s
    stats = router.stats()["a"]
    assert (stats["requests"], stats["successes"], stats["in_flight"]) == (3, 3, 0)
    assert stats["outcomes"] == {"success": 1} and stats["latency_p50_ms"] is not None


def test_a_traced_embed_call_is_an_embeddings_span_with_an_attempt_per_batch(
    servers: dict[str, FaultServer],
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    overrides = {"a": {"kind": "embedding"}, "b": {"kind": "embedding"}}
    config = make_config({"a": servers["a"], "b": servers["b"]}, route_overrides=overrides)
    servers["a"].set_fault(Fault.STATUS, status=503, times=1)
    with Router(config, tracer_provider=provider, start_prober=False) as router:
        router.embed(TEXTS, batch_size=5, route=None)
    [call] = [span for span in exporter.get_finished_spans() if not span.name.startswith("attempt ")]
    assert call.name == f"embeddings {MODEL}" and call.attributes is not None
    assert call.attributes["gen_ai.operation.name"] == "embeddings"
    assert call.attributes["gen_ai.usage.input_tokens"] == sum(len(t.split()) + 2 for t in TEXTS)
    assert call.context is not None
    attempts = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == call.context.span_id]
    assert len(attempts) == 3  # two batches, one of which failed over once
    assert sum(1 for s in attempts if s.attributes and s.attributes.get("error.type") == "503") == 1
    traceparents = servers["a"].traceparents + servers["b"].traceparents
    assert len(traceparents) == 3 and all(traceparents)


def test_the_shipped_configs_embedding_route_is_valid_when_uncommented() -> None:
    text = (Path(__file__).parent.parent / "config.yaml").read_text()
    lines, inside = [], False
    for line in text.splitlines():
        inside = inside or line.strip() == "# minilm:"
        if inside and line.strip().startswith("#"):
            line = line.replace("# ", "", 1)
            inside = "kind: embedding" not in line
        lines.append(line)
    config = config_from_dict(yaml.safe_load("\n".join(lines)), env={})
    route = config.routes["minilm"]
    assert (route.kind, route.base_url, route.model) == ("embedding", "http://127.0.0.1:8203/v1", "minilm")
    assert config.route_names("chat") == ["local_a", "local_b"]
    assert config.default_route_of("embedding") == "minilm"


def test_prefix_affinity_sends_the_same_inputs_to_the_same_route(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("a", "b", "c", lb_policy="prefix_affinity")
    for _ in range(4):
        router.embed(["a shared document prefix", "and more"])
    assert sorted(server.hits for server in servers.values()) == [0, 0, 4]


# --- hostile answers and careless callers (from a review) ----------------------------------------------


def test_routes_serving_vectors_of_different_lengths_are_never_mixed(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    """Each answer of the other length is the route's malformed answer (test_embeddings_hostile.py has more)."""
    servers["b"].embedding_dimensions = 16  # another model behind route b
    router = embedders(lb_policy="round_robin", embedding={"batch_size": 1})
    response = router.embed(TEXTS[:4])
    assert len({len(vector) for vector in vectors(response)}) == 1  # the length the first answer had
    assert all(isinstance(a.error, MalformedResponse) for a in call_info(response).attempts)  # type: ignore[union-attr]
    error = MixedEmbeddingsError({16: "b", 32: "a"})  # raised only while a group's length is being settled
    assert "16 from route 'b', 32 from route 'a'" in str(error) and "different models" in str(error)
    settled(router)


def _answer(data: list[Any], **fields: Any) -> CreateEmbeddingResponse:
    items = [Embedding.model_construct(embedding=e, index=i, object="embedding") for i, e in data]
    return CreateEmbeddingResponse.model_construct(data=items, object="list", **fields)


@pytest.mark.parametrize(
    "data",
    [
        [(0, ["a", "b"])],
        [(0, [[1.0], [2.0]])],
        [(0, [None, 1.0])],
        [(0, [math.nan, 1.0])],
        [(0, [math.inf])],
        [(0.0, [1.0])],
        [(0, [1.0, 2.0]), (1, [1.0])],
    ],
)
def test_unusable_vectors_are_malformed_answers(data: list[Any]) -> None:
    with pytest.raises(ValueError, match=r"malformed embedding|indices|different lengths"):
        checked_embeddings(_answer(data, model="m", usage=None), len(data), "route-model")


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": "many", "total_tokens": -1}])
def test_a_missing_model_or_garbled_usage_is_made_whole(usage: Any) -> None:
    checked = checked_embeddings(_answer([(0, [0.5, 1])], model=None, usage=usage), 1, "route-model")
    assert checked.model == "route-model"
    assert (checked.usage.prompt_tokens, checked.usage.total_tokens) == (0, 0)


def test_reading_the_context_window_blames_no_route(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    """/v1/models broken, /v1/embeddings fine: the length check is skipped, the route keeps serving."""
    servers["a"].models_fault = "html"
    router = embedders("a")
    assert len(router.embed(["hello"]).data) == 1
    assert router.routes["a"].breaker.state.value == "closed"


def test_reading_the_context_window_takes_a_quarter_of_the_deadline_at_most(
    embedders: Callable[..., Router], servers: dict[str, FaultServer]
) -> None:
    with socket.socket() as silent:  # accepts connections, never answers: /v1/models hangs
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        router = embedders("a", route_overrides={"a": {"base_url": url}})
        started = time.monotonic()
        with pytest.raises(AllRoutesFailed):  # the embeddings request hangs too, until the deadline
            router.embed(["hello"], deadline=2.0)
        assert time.monotonic() - started < 3.0
        assert router.routes["a"].peeked  # the window was asked for, for at most 0.5 s of the 2


@pytest.mark.parametrize("texts", [{"a": 1}, {"a", "b"}, b"bytes"])
def test_inputs_without_an_order_are_refused(texts: Any, embedders: Callable[..., Router]) -> None:
    with pytest.raises(InvalidRequestError, match="no order of inputs"):
        embedders().embed(texts)


def test_a_per_call_max_concurrency_is_a_bound_not_a_body_field(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    router = embedders("a")
    with pytest.raises(InvalidRequestError, match="max_concurrency"):
        router.embed(TEXTS, max_concurrency=0)
    router.embed(TEXTS, batch_size=2, max_concurrency=1)
    assert servers["a"].most_running == 1
    assert all("max_concurrency" not in body for body in servers["a"].requests)

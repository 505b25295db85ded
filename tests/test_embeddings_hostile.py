"""Embedding routes that lie: vectors of another length behind one model name, a nonsensical ``max_model_len``.

From a hostile review (issue 25, items 11 and 13): ``embed_query`` alternated between 32 and 16
dimensions when two routes served different models under one name, and one route reporting
``max_model_len: -1`` made every ``embed()`` on the fleet refuse every input before sending.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse, Embedding

from anorag_integrations import AllRoutesFailed, MalformedResponse, Router, call_info
from anorag_integrations.router.endpoints.probe import ProbeResult
from anorag_integrations.router.errors import InputTooLongError, MixedEmbeddingsError
from anorag_integrations.router.vectors import VectorLengths
from anorag_integrations.testing import FaultServer

from .test_embeddings import TEXTS, settled, vectors

LOGGER = "anorag_integrations.router"


@pytest.fixture
def embedders(router_for: Callable[..., Router]) -> Callable[..., Router]:
    """Factory: a router whose named servers (default a and b) are embedding routes."""

    def build(*names: str, **llm: Any) -> Router:
        names = names or ("a", "b")
        overrides = llm.pop("route_overrides", {})
        llm["route_overrides"] = {name: {**overrides.get(name, {}), "kind": "embedding"} for name in names}
        return router_for(*names, **llm)

    return build


def lengths(response: CreateEmbeddingResponse) -> set[int]:
    return {len(vector) for vector in vectors(response)}


def refused(router: Router, name: str) -> int:
    """How many of route ``name``'s answers were malformed (refused)."""
    return router.routes[name].stats.failures


# --- 11. vectors of another length ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_single_calls_never_alternate_between_vector_lengths(
    servers: dict[str, FaultServer], embedders: Callable[..., Router], mode: str
) -> None:
    """Two routes, one model name, two models: every answer has the first answer's length."""
    servers["b"].embedding_dimensions = 16  # another model behind route b
    router = embedders(lb_policy="round_robin")

    async def six() -> list[CreateEmbeddingResponse]:
        return [await router.aembed("hello") for _ in range(6)]

    answers = [router.embed("hello") for _ in range(6)] if mode == "sync" else asyncio.run(six())
    assert {length for answer in answers for length in lengths(answer)} == {32}  # route a answered first
    refusals = [a.error for answer in answers for a in call_info(answer).attempts]  # type: ignore[union-attr]
    assert refusals and all(isinstance(error, MalformedResponse) for error in refusals)
    assert all(error.route == "b" and "vectors of 16 values" in str(error) for error in refusals)
    assert "32 values on routes a" in str(refusals[0])
    assert refused(router, "b") == len(refusals) and refused(router, "a") == 0
    settled(router)


def test_an_odd_route_that_answered_first_is_outvoted_once_two_others_agree(
    servers: dict[str, FaultServer], embedders: Callable[..., Router], caplog: pytest.LogCaptureFixture
) -> None:
    servers["c"].embedding_dimensions = 16  # the odd one
    router = embedders("a", "b", "c", lb_policy="round_robin")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert lengths(router.embed("first", route="c")) == {16}  # nothing to compare with yet: learned
    settling = router.embed("second")  # a: 32 against c's 16, a tie (refused); b: 32 agrees, 2 against 1
    assert lengths(settling) == {32}
    assert [(a.route, type(a.error)) for a in call_info(settling).attempts] == [("a", MalformedResponse)]  # type: ignore[union-attr]
    assert "vectors now have 32 values (routes a, b agree), not 16 values (routes c)" in caplog.text
    with pytest.raises(AllRoutesFailed) as raised:  # pinned to the odd route: an error, never its vectors
        router.embed("pinned", route="c")
    assert isinstance(raised.value.attempts[0].error, MalformedResponse)
    for _ in range(6):
        assert lengths(router.embed("later")) == {32}
    assert refused(router, "c") >= 2 and refused(router, "a") == 1 and refused(router, "b") == 0
    settled(router)


def test_batches_settled_in_one_call_raise_rather_than_mix(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    """The one case a call can still see two lengths: the group changed its mind between two of its batches."""
    servers["a"].embedding_dimensions = 16  # the odd one answers the first batch
    router = embedders("a", "b", "c", lb_policy="round_robin", embedding={"batch_size": 1, "max_concurrency": 1})
    with pytest.raises(MixedEmbeddingsError):
        router.embed(TEXTS[:2])  # batch 1: a (16, learned); batch 2: b refused (a tie), c settles 32
    assert lengths(router.embed(TEXTS)) == {32}  # from then on, one length
    settled(router)


def test_other_forms_of_one_model_are_groups_of_their_own(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    """base64 text is not a vector of values: asking for it is no route's failure."""
    router = embedders("a", "b")
    assert lengths(router.embed("hello")) == {32}
    answer = router.embed(["hello", "world"], encoding_format="base64")
    assert all(isinstance(item.embedding, str) for item in answer.data)
    assert refused(router, "a") == refused(router, "b") == 0


def _answer(length: int) -> CreateEmbeddingResponse:
    item = Embedding.model_construct(embedding=[0.5] * length, index=0, object="embedding")
    return CreateEmbeddingResponse.model_construct(data=[item], object="list", model="m")


@given(
    served=st.lists(st.sampled_from([16, 32, 48]), min_size=1, max_size=5),
    picks=st.lists(st.integers(min_value=0, max_value=4), max_size=40),
)
def test_a_majority_of_routes_wins_once_each_of_them_has_answered(served: list[int], picks: list[int]) -> None:
    """Any order of answers: an answer is used only at the group's length, refused only at another; and once
    every route of a strict majority has answered, only the majority's length is ever used."""
    routes = [SimpleNamespace(name=f"r{i}", base_url=f"http://r{i}/v1") for i in range(len(served))]
    majority = next((n for n in set(served) if served.count(n) * 2 > len(served)), None)
    group = VectorLengths()
    answered: set[int] = set()
    for pick in picks:
        index = pick % len(routes)
        answered.add(index)
        try:
            group.check(routes[index], {"model": "m"}, _answer(served[index]))  # type: ignore[arg-type]
            used = True
        except MalformedResponse:
            used = False
        held = group._groups[("m", "float", "None", "None")].length
        assert (held == served[index]) == used
        everyone = {i for i, n in enumerate(served) if n == majority}
        if used and majority is not None and everyone <= answered:
            assert served[index] == majority


# --- 13. a context window that is none -------------------------------------------------------------------


NONSENSE = [-1, 0, 10**30, "4096", True, 1.5, math.inf, math.nan, [4096], {"tokens": 4096}]


@pytest.mark.parametrize("reported", NONSENSE, ids=repr)
def test_a_nonsensical_max_model_len_is_ignored_with_one_warning(
    servers: dict[str, FaultServer],
    embedders: Callable[..., Router],
    caplog: pytest.LogCaptureFixture,
    reported: Any,
) -> None:
    servers["a"].max_model_len = 50
    servers["b"].reported_max_model_len = reported
    router = embedders("a", "b", lb_policy="round_robin")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):
        assert len(router.embed(TEXTS).data) == len(TEXTS)  # sent, to both routes
    assert servers["a"].hits and servers["b"].hits
    with pytest.raises(InputTooLongError, match="context length of 50 tokens"):  # a's real window still counts
        router.embed(["word " * 60])
    route = router.routes["b"]
    assert route.max_model_len is None
    assert route.probe().healthy and route.probe_result.max_model_len is None  # the probe neither fails nor keeps it
    warnings = [r.getMessage() for r in caplog.records if "max_model_len" in r.getMessage()]
    assert len(warnings) == 1 and "route 'b'" in warnings[0] and "ignored" in warnings[0]


def test_a_window_from_another_replica_is_checked_too(embedders: Callable[..., Router]) -> None:
    """A probe result adopted from shared state was never checked here: the route reads it through the check."""
    router = embedders("a", route_overrides={"a": {"max_model_len": 512}})
    route = router.routes["a"]
    route.probe_result = ProbeResult(healthy=True, max_model_len=-1, checked_at=time.time())
    assert route.max_model_len == 512  # the configured window, not -1
    assert len(router.embed(TEXTS).data) == len(TEXTS)


def test_a_sane_window_reported_as_a_float_is_taken(
    servers: dict[str, FaultServer], embedders: Callable[..., Router]
) -> None:
    servers["a"].reported_max_model_len = 50.0
    router = embedders("a")
    with pytest.raises(InputTooLongError, match="context length of 50 tokens"):
        router.embed(["word " * 60])

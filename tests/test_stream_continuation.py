"""Stream continuation: a stream cut after delivery resumes on a route with continue_streams: true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from llama_index.core.llms import ChatMessage

from anorag_integrations import BadRequestError, ChatVLLMRouted, Router, StreamInterruptedError, VLLMRouted
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config
from .test_failover import STREAMS, partial, run

REPLY = "one two three four five six seven eight"
CUTS = {
    "cut": (Fault.CUT, {"after_chunks": 3}),
    "error_event": (Fault.ERROR_EVENT, {"after_chunks": 3, "status": 500}),
}


@pytest.fixture
def fleet() -> Iterator[dict[str, FaultServer]]:
    """Three servers of one model (the same reply), as a vLLM fleet would be."""
    with (
        FaultServer(MODEL, reply=REPLY) as a,
        FaultServer(MODEL, reply=REPLY) as b,
        FaultServer(MODEL, reply=REPLY) as c,
    ):
        yield {"a": a, "b": b, "c": c}


@pytest.fixture
def build(fleet: dict[str, FaultServer]) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def router(continue_on: tuple[str, ...] = ("a", "b", "c"), names: str = "abc", **llm: Any) -> Router:
        overrides = {name: {"continue_streams": name in continue_on} for name in names}
        made.append(Router(make_config({n: fleet[n] for n in names}, route_overrides=overrides, **llm)))
        return made[-1]

    yield router
    for router in made:
        router.close()


@pytest.mark.parametrize("mode", STREAMS)
@pytest.mark.parametrize("case", CUTS)
def test_cut_stream_continues_without_repeating_or_dropping(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str, case: str
) -> None:
    fault, options = CUTS[case]
    router = build()
    fleet["a"].set_fault(fault, **options)
    text, info = run(router, mode, max_tokens=20)
    assert text == REPLY  # seamless: "one two three " from a, "four five six seven eight" from b
    assert info.route == "b" and info.continued == 1 and [a.route for a in info.attempts] == ["a"]
    resumed = fleet["b"].requests[-1]
    assert resumed["messages"][-1] == {"role": "assistant", "content": "one two three "}
    assert resumed["continue_final_message"] is True and resumed["add_generation_prompt"] is False
    assert resumed["max_tokens"] == 17  # three tokens already delivered
    assert router.stats()["a"]["failures"] == 1 and router.stats()["b"]["successes"] == 1


def test_continued_stream_keeps_one_id_and_one_role_chunk(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build()
    fleet["a"].set_fault(Fault.CUT, after_chunks=2)
    chunks = list(router.stream(USER))
    assert len({chunk.id for chunk in chunks}) == 1
    assert sum(1 for c in chunks for choice in c.choices if choice.delta.role) == 1
    assert chunks[-1].usage is not None  # the continuation's usage closes the stream


def test_two_cuts_continue_twice(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build()
    fleet["a"].set_fault(Fault.CUT, after_chunks=2)
    fleet["b"].set_fault(Fault.CUT, after_chunks=3)  # b continues from "one two " and is cut again
    text, info = run(router, "stream")
    assert text == REPLY
    assert info.route == "c" and info.continued == 2 and [a.route for a in info.attempts] == ["a", "b"]
    assert fleet["c"].requests[-1]["messages"][-1]["content"] == "one two three four five "


@pytest.mark.parametrize("mode", STREAMS)
def test_only_flagged_routes_continue(fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str) -> None:
    router = build(continue_on=("c",))
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    text, info = run(router, mode)
    assert text == REPLY and info.route == "c" and fleet["b"].hits == 0


@pytest.mark.parametrize("mode", STREAMS)
def test_without_a_flagged_route_the_typed_error_says_why(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build(continue_on=("a",), names="ab")  # only the route that was cut could continue
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    received, exc = partial(router, mode)
    assert isinstance(exc, StreamInterruptedError)
    assert received == exc.delivered_text == "one two three "
    assert "no other route with continue_streams: true" in str(exc) and fleet["b"].hits == 0


def test_off_by_default(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build(continue_on=())
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    _, exc = partial(router, "stream")
    assert isinstance(exc, StreamInterruptedError) and exc.continuation == ""
    assert fleet["b"].hits == 0 and fleet["c"].hits == 0


def test_continuation_that_fails_raises_with_both_attempts(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(names="ab")
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    fleet["b"].set_fault(Fault.STATUS, status=503)
    received, exc = partial(router, "stream")
    assert isinstance(exc, StreamInterruptedError) and received == "one two three "
    assert "503" in exc.continuation


def test_reasoning_streams_are_not_continued(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build()
    fleet["a"].reasoning = "let me think"
    fleet["a"].set_fault(Fault.CUT, after_chunks=2)
    _, exc = partial(router, "stream")
    assert isinstance(exc, StreamInterruptedError) and "only text can be continued" in str(exc)
    assert fleet["b"].hits == 0 and fleet["c"].hits == 0


def test_the_fault_server_checks_vllms_flag_pair(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    """As vLLM: continue_final_message with the default add_generation_prompt is a 400."""
    router = build()
    with pytest.raises(BadRequestError, match="are not compatible"):
        router.chat([*USER, {"role": "assistant", "content": "one"}], continue_final_message=True)


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_langchain_stream_is_seamless(fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str) -> None:
    llm = ChatVLLMRouted(router=build())
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    if mode == "stream":
        chunks = list(llm.stream("count"))
    else:

        async def collect() -> list[Any]:
            return [chunk async for chunk in llm.astream("count")]

        chunks = asyncio.run(collect())
    assert "".join(str(c.content) for c in chunks) == REPLY
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == REPLY and total.response_metadata.get("route") == "b"


@pytest.mark.parametrize("mode", ["stream_chat", "astream_chat"])
def test_llama_index_stream_is_seamless(fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str) -> None:
    llm = VLLMRouted(router=build())
    fleet["a"].set_fault(Fault.CUT, after_chunks=3)
    messages = [ChatMessage(role="user", content="count")]
    if mode == "stream_chat":
        responses = list(llm.stream_chat(messages))
    else:

        async def collect() -> list[Any]:
            return [r async for r in await llm.astream_chat(messages)]

        responses = asyncio.run(collect())
    assert "".join(r.delta or "" for r in responses) == REPLY
    assert responses[-1].message.content == REPLY

"""The router, ChatVLLMRouted and VLLMRouted against two real vLLM servers (SmolLM2-135M-Instruct on CPU)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from anorag_integrations import (
    ChatVLLMRouted,
    ContextOverflowError,
    ModelNotFoundError,
    Router,
    UnknownModelError,
    VLLMRouted,
    call_info,
)
from anorag_integrations.config import config_from_dict

from .conftest import kill_mid_run, real_config, vllm_on

pytestmark = pytest.mark.live
ASK = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


class City(BaseModel):
    name: str
    country: str


def vllm_config(servers: list[Any], **llm: Any) -> Any:
    llm["params"] = {"max_tokens": 16, **llm.get("params", {})}
    return real_config(servers, "vllm", {"timeout": 60, "continue_streams": True}, **llm)


@pytest.fixture
def router(vllm_pair: list[Any]) -> Any:
    with Router(vllm_config(vllm_pair, lb_policy="round_robin")) as router:
        yield router


def test_answers_stream_with_usage_and_use_both_servers(router: Router) -> None:
    responses = [router.chat(ASK) for _ in range(2)]
    assert [call_info(r).route for r in responses] == ["vllm0", "vllm1"]  # type: ignore[union-attr]
    assert all(r.choices[0].message.content and r.usage.completion_tokens > 0 for r in responses)  # type: ignore[union-attr]

    async def streamed() -> list[Any]:
        return [chunk async for chunk in router.astream(ASK)]

    for chunks in (list(router.stream(ASK)), asyncio.run(streamed())):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert call_info(chunks[-1]).ttft_s is not None  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_structured_output_on_real_vllm(router: Router, method: str) -> None:
    llm = ChatVLLMRouted(router=router, temperature=0, max_tokens=60)
    prompt = "Paris is in France. Reply with JSON with keys name and country for that city."
    if method == "json_mode":  # the server guarantees JSON, not the schema: a 135M model may miss keys
        raw = llm.with_structured_output(None, method="json_mode", include_raw=True).invoke(prompt)
        assert isinstance(json.loads(raw["raw"].content), dict)
        return
    city = llm.with_structured_output(City, method=method).invoke(prompt)  # constrained by vLLM's grammar
    assert isinstance(city, City) and city.name and city.country


def test_tool_calls_reach_vllms_parser_and_this_model_cannot_fill_them(router: Router) -> None:
    """The servers run with ``--enable-auto-tool-choice --tool-call-parser hermes``, as production would.

    A named tool choice streams the call's name through ChatVLLMRouted; SmolLM2-135M cannot write
    arguments that fit the schema (vLLM seen: ``[1, 3, 4, ...]`` for an object), so they are not
    asserted. ``tool_choice="auto"`` is accepted, and this model answers in prose.
    """
    llm = ChatVLLMRouted(router=router, max_tokens=24)
    chunks = list(llm.bind_tools([City], tool_choice="City").stream("Paris is in France."))
    names = [c["name"] for chunk in chunks for c in chunk.tool_call_chunks if c["name"]]  # type: ignore[attr-defined]
    assert names == ["City"]  # exactly one call, named once (its argument pieces carry no name)
    answer = llm.bind_tools([City], tool_choice="auto").invoke("What is 2 + 2?")
    assert answer.content or answer.tool_calls or answer.invalid_tool_calls  # type: ignore[attr-defined]


def test_vllms_own_400_and_404_are_typed(router: Router) -> None:
    with pytest.raises(ContextOverflowError, match="maximum context length is 4096") as overflow:
        router.chat([{"role": "user", "content": "hello " * 5000}])
    assert overflow.value.status == 400
    with pytest.raises(UnknownModelError, match="the fleet serves: 'smollm2'"):
        router.chat(ASK, model="nope")  # no route lists it: refused before sending
    pinned = next(iter(router.routes))
    with pytest.raises(ModelNotFoundError, match="does not exist") as missing:
        router.chat(ASK, model="nope", route=pinned)  # sent as asked: vLLM's own 404
    assert missing.value.status == 404 and not isinstance(missing.value, UnknownModelError)
    assert all(
        route.breaker.state.value == "closed" or name == missing.value.route for name, route in router.routes.items()
    )


def test_the_context_window_comes_from_the_server(router: Router) -> None:
    router.health()
    assert VLLMRouted(router=router).metadata.context_window == 4096


@pytest.mark.kills_vllm
def test_kill_one_server_mid_run_then_restart(vllm_pair: list[Any]) -> None:
    """40 requests at concurrency 4; one vLLM server SIGKILLed after 12: none may fail. Then it comes back."""
    config = vllm_config(
        vllm_pair,
        lb_policy="least_outstanding",
        health={"probe_interval": 0.5, "failure_threshold": 2, "cooldown": 1},
        params={"max_tokens": 8},
    )
    with Router(config) as router:
        outcomes = kill_mid_run(router, ASK, vllm_pair[0].kill, requests=40, kill_at=12)
        assert [exc for _, _, exc in outcomes if exc is not None] == []
        assert {route for route, _, _ in outcomes[20:]} == {"vllm1"}
        assert router.health()["vllm0"]["healthy"] is False
        vllm_pair[0] = vllm_on(vllm_pair[0].port).start()
        restarted = time.monotonic()
        served: list[str] = []
        while time.monotonic() - restarted < 30 and (not served or served[-1] != "vllm0"):
            served.append(call_info(router.chat(ASK)).route)  # type: ignore[union-attr, arg-type]
        assert served[-1] == "vllm0", "the restarted server never came back into rotation"


@pytest.mark.kills_vllm  # runs after the other users of the pair: nobody waits for the killed server to restart
def test_a_stream_cut_by_sigkill_continues_on_the_other_server(vllm_pair: list[Any]) -> None:
    """The serving vLLM server is SIGKILLed mid-answer: the caller's stream goes on from the other one."""
    with Router(vllm_config(vllm_pair, lb_policy="round_robin", params={"max_tokens": 120})) as router:
        received: list[str] = []
        killed: int | None = None
        chunks = []
        for chunk in router.stream(COUNT):
            chunks.append(chunk)
            received.extend(c.delta.content or "" for c in chunk.choices)
            if killed is None and len([t for t in received if t]) >= 5:
                killed = int(call_info(chunk).route[-1])  # type: ignore[union-attr, index]
                vllm_pair[killed].kill()
        info = call_info(chunks[-1])
        assert killed is not None and info is not None
        assert info.continued == 1 and info.route == f"vllm{1 - killed}"
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)  # the answer finished
        assert len({c.id for c in chunks}) == 1  # one stream to the caller


def test_a_mixed_fleet_of_vllm_and_llama_cpp(vllm_pair: list[Any], llama_servers: list[Any]) -> None:
    """Users run both engines (Ollama is llama.cpp underneath): one router, each route its own model."""
    routes = {
        "vllm": {"base_url": vllm_pair[1].base_url, "model": vllm_pair[1].alias, "timeout": 60},
        "llama": {"base_url": llama_servers[0].base_url, "model": llama_servers[0].alias, "timeout": 60,
                  "aliases": [vllm_pair[1].alias]},  # one model group over both engines
    }  # fmt: skip
    config = config_from_dict(
        {"llm": {"routes": routes, "lb_policy": "round_robin", "params": {"temperature": 0, "max_tokens": 8}}},
        env={},
    )
    with Router(config) as router:
        served = {call_info(router.chat(ASK)).route for _ in range(2)}  # type: ignore[union-attr]
        assert served == {"vllm", "llama"}
        gemma = router.chat(ASK, model=llama_servers[0].alias)  # its own name: only llama.cpp serves it
        assert call_info(gemma).route == "llama"  # type: ignore[union-attr]
        for _ in range(2):
            chunks = list(router.stream(ASK))
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        rows = router.health()
        assert rows["vllm"]["max_model_len"] == 4096 and rows["llama"]["healthy"]


def _metric(server: Any, name: str) -> float:
    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_least_queue_reads_the_real_vllm_queue(vllm_pair: list[Any]) -> None:
    """Another client keeps one server busy: the router sees it in vllm:num_requests_running and goes elsewhere."""
    config = vllm_config(vllm_pair, lb_policy="least_queue", least_queue={"interval": 0.2, "stale_after": 5})
    busy = vllm_pair[0]
    body = {"model": busy.alias, "messages": COUNT, "max_tokens": 300, "temperature": 0, "stream": True}
    done = threading.Event()

    def occupy() -> None:
        """One streamed answer, read until the test is done (closing it makes vLLM abort the request)."""
        with httpx.stream("POST", f"{busy.base_url}/chat/completions", json=body, timeout=120) as answer:
            answer.raise_for_status()
            for _ in answer.iter_lines():
                if done.is_set():
                    return

    with Router(config) as router, ThreadPoolExecutor(3) as load:
        jobs = [load.submit(occupy) for _ in range(3)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = router.routes["vllm0"].load
            if report is not None and report.running >= 1:
                break
            time.sleep(0.05)
        assert report is not None and report.running >= 1, "the scraper never saw the busy server's queue"
        served = [call_info(router.chat(ASK)).route for _ in range(3)]  # type: ignore[union-attr]
        assert served == ["vllm1"] * 3
        done.set()
        for job in jobs:
            job.result()


def test_prefix_affinity_lands_on_vllms_prefix_cache(vllm_pair: list[Any]) -> None:
    """One long shared context, different questions: one server gets them all and vLLM counts cache hits."""
    config = vllm_config(vllm_pair, lb_policy="prefix_affinity", prefix_affinity={"prefix_chars": 2000})
    context = "Background for the questions that follow. " + " ".join(f"Fact {i}: item {i} is blue." for i in range(80))
    questions = ["What colour is item 3?", "What colour is item 40?", "What colour is item 71?"]
    before = {i: _metric(server, "vllm:prefix_cache_hits_total") for i, server in enumerate(vllm_pair)}
    with Router(config) as router:
        served = {
            call_info(router.chat([{"role": "system", "content": context}, {"role": "user", "content": q}])).route  # type: ignore[union-attr]
            for q in questions
        }
    [route] = served
    index = int(route[-1])
    assert _metric(vllm_pair[index], "vllm:prefix_cache_hits_total") > before[index]

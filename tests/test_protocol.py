"""The emulator cannot drift: one set of protocol checks, run against real vLLM and against FaultServer.

Each check is what a client of vLLM relies on (the router, the adapters, the fault tests): served
models with ``max_model_len``, error bodies of 400 and 404, plain and streamed chunk shapes with
the usage chunk and ``stop_reason``, ``continue_final_message``, ``structured_outputs``, and the
``/metrics`` names. ``FaultServer`` must pass the same checks as the engine it imitates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anorag_integrations.testing import FaultServer


@dataclass
class Target:
    root_url: str
    model: str
    max_model_len: int
    real: bool

    def chat(self, client: httpx.Client, **body: Any) -> httpx.Response:
        payload = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
        return client.post(f"{self.root_url}/v1/chat/completions", json=payload)


@pytest.fixture(params=["FaultServer", "vLLM"], scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "vLLM":
        server = request.getfixturevalue("vllm_fleet").ensure()[0]
        yield Target(server.root_url, server.alias, server.max_model_len, real=True)
        return
    with FaultServer("m", max_model_len=4096) as fake:  # as vLLM with --enable-auto-tool-choice
        yield Target(fake.root_url, "m", 4096, real=False)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as http:
        yield http


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of a stream; asserts it ends with ``data: [DONE]`` and has nothing else."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in text.splitlines() if line)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_models_lists_the_served_name_with_its_context_window(target: Target, client: httpx.Client) -> None:
    body = client.get(f"{target.root_url}/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert (model["id"], model["object"], model["owned_by"]) == (target.model, "model", "vllm")
    assert model["max_model_len"] == target.max_model_len
    assert set(model) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    [permission] = model["permission"]
    assert permission["object"] == "model_permission" and permission["allow_sampling"] is True


def test_health_answers_200(target: Target, client: httpx.Client) -> None:
    assert client.get(f"{target.root_url}/health").status_code == 200


def test_unknown_model_is_a_404_naming_it(target: Target, client: httpx.Client) -> None:
    response = target.chat(client, model="nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("NotFoundError", "model", 404)
    assert error["message"].startswith("The model `nope` does not exist.") and target.model in error["message"]


def test_context_overflow_is_a_400_with_vllms_wording(target: Target, client: httpx.Client) -> None:
    response = target.chat(client, messages=[{"role": "user", "content": "hello " * (target.max_model_len + 100)}])
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "input_tokens", 400)
    assert f"This model's maximum context length is {target.max_model_len} tokens." in error["message"]


def test_a_plain_completion_has_vllms_shape(target: Target, client: httpx.Client) -> None:
    body = target.chat(client).json()
    assert (body["object"], body["model"]) == ("chat.completion", target.model)
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length") and "stop_reason" in choice
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_a_stop_string_is_named_in_stop_reason(target: Target, client: httpx.Client) -> None:
    text = target.chat(client, max_tokens=30, temperature=0).json()["choices"][0]["message"]["content"]
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]  # a word the answer does contain
    choice = target.chat(client, max_tokens=30, temperature=0, stop=[word]).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", word)


@pytest.mark.parametrize("usage", [True, False])
def test_a_stream_has_vllms_chunks_and_usage_only_when_asked(target: Target, client: httpx.Client, usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if usage else {}
    events = sse(target.chat(client, stream=True, **options).text)
    assert {event["object"] for event in events} == {"chat.completion.chunk"}
    assert len({event["id"] for event in events}) == 1
    first = events[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    with_choices = [event for event in events if event["choices"]]
    finish = with_choices[-1]["choices"][0]
    assert finish["finish_reason"] in ("stop", "length") and "stop_reason" in finish
    assert all(event["choices"][0]["finish_reason"] is None for event in with_choices[:-1])
    if usage:
        last = events[-1]
        assert last["choices"] == [] and 0 < last["usage"]["completion_tokens"] <= 4
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    else:
        assert all("usage" not in event or event["usage"] is None for event in events)


def test_continue_final_message_continues_the_assistant_text(target: Target, client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Count to ten"}, {"role": "assistant", "content": "1, 2, 3, 4,"}]
    body = target.chat(
        client, messages=messages, temperature=0, continue_final_message=True, add_generation_prompt=False
    ).json()
    continued = body["choices"][0]["message"]["content"]
    assert continued and not continued.startswith("1, 2, 3, 4,")  # the rest only, not the given part again
    both = target.chat(client, messages=messages, continue_final_message=True)  # add_generation_prompt defaults on
    assert both.status_code == 400
    assert "continue_final_message and add_generation_prompt are not compatible" in both.json()["error"]["message"]


def test_structured_outputs_constrain_the_answer_to_the_schema(target: Target, client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    messages = [{"role": "user", "content": "Give a person as JSON"}]
    content = target.chat(client, messages=messages, max_tokens=60, structured_outputs={"json": schema}).json()
    answer = json.loads(content["choices"][0]["message"]["content"])
    assert isinstance(answer["name"], str) and isinstance(answer["age"], int)


def test_metrics_have_the_names_and_labels_the_router_reads(target: Target, client: httpx.Client) -> None:
    target.chat(client)  # something has been served
    families = {f.name: f for f in text_string_to_metric_families(client.get(f"{target.root_url}/metrics").text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        [sample] = families[name].samples
        assert sample.labels == {"engine": "0", "model_name": target.model}
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):  # counters: _total dropped by the parser
        assert families[name].type == "counter"
    queries = families["vllm:prefix_cache_queries"].samples[0].value
    assert queries > 0


def test_tools_are_accepted_and_a_named_call_streams_its_name_first(target: Target, client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert target.chat(client, tools=tools, tool_choice="auto").status_code == 200  # the server has a tool parser
    named = {"type": "function", "function": {"name": "f"}}
    response = target.chat(client, tools=tools, tool_choice=named, stream=True, max_tokens=40)
    assert response.status_code == 200
    deltas = [c["delta"] for event in sse(response.text) for c in event["choices"] if c["delta"].get("tool_calls")]
    head = deltas[0]["tool_calls"][0]  # id, type and name first; the arguments follow in later deltas
    assert head["index"] == 0 and head["id"].startswith("chatcmpl-tool-") and head["type"] == "function"
    assert head["function"]["name"] == "f" and head["function"].get("arguments") is None
    assert all(d["tool_calls"][0]["index"] == 0 and "id" not in d["tool_calls"][0] for d in deltas[1:])

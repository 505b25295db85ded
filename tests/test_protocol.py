"""The emulator cannot drift: one set of protocol checks, run against real vLLM and against FaultServer.

Each check is what a client of vLLM relies on (the router, the adapters, the fault tests): served
models with ``max_model_len``, error bodies of 400 and 404, plain and streamed chunk shapes with
the usage chunk and ``stop_reason``, ``continue_final_message``, ``structured_outputs``, and the
``/metrics`` names; and on a pooling server (all-MiniLM-L6-v2), ``/v1/embeddings``: vectors in
input order, float and base64, usage, overflow and truncation. ``FaultServer`` must pass the same
checks as the engine it imitates.

Several served names and LoRA adapters need a vLLM started with an adapter: ``test_models_live.py`` checks
that vLLM still answers as recorded (``data/vllm_lora_facts.json``), and here FaultServer is held to the
recording, request for request.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anorag_integrations.testing import FaultServer

from .served_models import ADAPTERS, NAMES, emulated, observe, recorded


@dataclass
class Target:
    root_url: str
    model: str
    max_model_len: int
    real: bool

    def chat(self, client: httpx.Client, **body: Any) -> httpx.Response:
        payload = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
        return client.post(f"{self.root_url}/v1/chat/completions", json=payload)


@pytest.fixture(params=["FaultServer", pytest.param("vLLM", marks=pytest.mark.live)], scope="module")
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
    message = f"The model `nope` does not exist. Valid aliases: {target.model}."
    assert response.json() == {"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}}


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


# --- /v1/embeddings: FaultServer against a real vLLM pooling server ------------------------------------


@dataclass
class Embedder:
    root_url: str
    model: str
    max_model_len: int

    def embed(self, client: httpx.Client, texts: Any, **body: Any) -> httpx.Response:
        payload = {"model": self.model, "input": texts, "encoding_format": "float", **body}
        return client.post(f"{self.root_url}/v1/embeddings", json=payload)

    def too_long(self) -> str:
        return "hello " * (self.max_model_len + 50)


@pytest.fixture(params=["FaultServer", pytest.param("vLLM", marks=pytest.mark.live)], scope="module")
def embedder(request: pytest.FixtureRequest) -> Iterator[Embedder]:
    if request.param == "vLLM":
        server = request.getfixturevalue("vllm_embedder")
        yield Embedder(server.root_url, server.alias, server.max_model_len)
        return
    with FaultServer("minilm", max_model_len=256) as fake:
        yield Embedder(fake.root_url, "minilm", 256)


def test_embedding_models_list_the_pooling_models_window(embedder: Embedder, client: httpx.Client) -> None:
    [model] = client.get(f"{embedder.root_url}/v1/models").json()["data"]
    assert (model["id"], model["max_model_len"]) == (embedder.model, embedder.max_model_len)


def test_embeddings_have_vllms_shape_one_unit_vector_per_input_in_order(
    embedder: Embedder, client: httpx.Client
) -> None:
    texts = ["hello", "the cat sat on the mat", "hello"]
    body = embedder.embed(client, texts).json()
    assert (body["object"], body["model"]) == ("list", embedder.model) and body["id"].startswith("embd-")
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert {item["object"] for item in body["data"]} == {"embedding"}
    vectors = [item["embedding"] for item in body["data"]]
    assert len({len(vector) for vector in vectors}) == 1 and all(isinstance(x, float) for x in vectors[0])
    assert all(math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-4) for vector in vectors)  # normalised
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]  # a function of the text alone
    usage = body["usage"]
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"]
    assert usage["prompt_tokens"] == 3 + 8 + 3  # [CLS] and [SEP] around each input's words


def test_a_single_string_is_one_input(embedder: Embedder, client: httpx.Client) -> None:
    body = embedder.embed(client, "hello").json()
    assert len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == 3


def test_base64_embeddings_are_little_endian_float32_of_the_same_vector(
    embedder: Embedder, client: httpx.Client
) -> None:
    floats = embedder.embed(client, ["hello"]).json()["data"][0]["embedding"]
    encoded = embedder.embed(client, ["hello"], encoding_format="base64").json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)  # what the openai SDK decodes
    assert len(decoded) == len(floats) and all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, floats, strict=True)
    )


def test_an_input_past_the_window_is_a_400_with_vllms_wording(embedder: Embedder, client: httpx.Client) -> None:
    response = embedder.embed(client, ["hi", embedder.too_long()])
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "input_tokens", 400)
    limit = embedder.max_model_len
    assert error["message"].startswith(
        f"This model's maximum context length is {limit} tokens. However, your prompt contains at least "
        f"{limit + 1} input tokens"
    )


def test_truncate_prompt_tokens_minus_one_cuts_to_the_window(embedder: Embedder, client: httpx.Client) -> None:
    body = embedder.embed(client, [embedder.too_long()], truncate_prompt_tokens=-1).json()
    assert len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == embedder.max_model_len
    cut = embedder.embed(client, ["hello world and more"], truncate_prompt_tokens=3).json()
    assert cut["usage"]["prompt_tokens"] == 3


def test_truncate_prompt_tokens_past_the_window_is_a_400(embedder: Embedder, client: httpx.Client) -> None:
    response = embedder.embed(client, ["hi"], truncate_prompt_tokens=embedder.max_model_len + 1)
    assert response.status_code == 400
    assert "truncate_prompt_tokens value is greater than max_model_len" in response.json()["error"]["message"]


def test_embedding_errors_for_an_unknown_model_or_no_input(embedder: Embedder, client: httpx.Client) -> None:
    unknown = embedder.embed(client, ["hi"], model="nope")
    assert unknown.status_code == 404  # worded apart from the chat server's: no served names, no param
    message = "The model `nope` does not exist."
    assert unknown.json() == {"error": {"message": message, "type": "NotFoundError", "param": None, "code": 404}}
    empty = embedder.embed(client, [])
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "You must pass at least one prompt"


# --- several served names and LoRA adapters: FaultServer against what vLLM 0.32 answered -------------------


def test_served_names_and_adapters_answer_as_vllm_did(client: httpx.Client, tmp_path: Path) -> None:
    """``/v1/models`` (every served name, then each adapter with its parent), whom chats are answered as, the
    unknown model's 404 and a run of runtime loads and unloads, good and bad: equal to the recording."""
    with emulated(tmp_path) as (fake, paths):
        assert observe(client, fake.root_url, paths) == recorded()


def test_the_recording_holds_what_the_router_relies_on() -> None:
    """Read from the recording, so a re-recording that changed these facts fails here, by name."""
    facts = recorded()
    listed = [(m["id"], m["parent"], m["root"], m["max_model_len"]) for m in facts["models"]["data"]]
    assert listed == [
        (NAMES[0], None, "<model>", 4096),
        (NAMES[1], None, "<model>", 4096),
        *((name, parent, "<sql>", None) for name, parent in ADAPTERS.items()),
    ]
    assert facts["answered_as"] == {NAMES[0]: NAMES[0], NAMES[1]: NAMES[0], "sql": "sql", "sql-chat": "sql-chat",
                                    "": NAMES[0]}  # fmt: skip
    after = [(m["id"], m["parent"]) for m in facts["exchanges"][-1]["answer"]["data"]]
    assert after[-1] == ("sql", NAMES[0])  # loaded at run time: on the first served name


def test_an_adapter_added_or_removed_at_run_time_is_listed_served_and_kept_apart(client: httpx.Client) -> None:
    with FaultServer("m", served_names=["m-alias"]) as fake:
        assert fake.served_names == ["m", "m-alias"] and fake.adapters == {}
        fake.add_adapter("sql")
        fake.add_adapter("sql-alias", "m-alias", root="/lora/sql")
        listed = {m["id"]: (m["parent"], m["root"]) for m in client.get(f"{fake.root_url}/v1/models").json()["data"]}
        assert listed == {"m": (None, "m"), "m-alias": (None, "m"), "sql": ("m", "/adapters/sql"),
                          "sql-alias": ("m-alias", "/lora/sql")}  # fmt: skip
        url = f"{fake.root_url}/v1/chat/completions"
        asked = ["m-alias", "sql", "sql-alias"]
        answers = [
            client.post(url, json={"model": name, "messages": [{"role": "user", "content": "hi"}]}) for name in asked
        ]
        assert [a.json()["model"] for a in answers] == ["m", "sql", "sql-alias"]
        embedded = client.post(f"{fake.root_url}/v1/embeddings", json={"model": "sql", "input": "hi"}).json()
        assert embedded["model"] == "sql"
        assert fake.request_models == [*asked, "sql"]
        assert fake.remove_adapter("sql") and not fake.remove_adapter("sql")
        assert client.post(url, json={"model": "sql", "messages": []}).status_code == 404
        with pytest.raises(ValueError, match="conflicts with a served name"):
            fake.add_adapter("m-alias")
        with pytest.raises(ValueError, match="is not served"):
            fake.add_adapter("x", "other")


def test_runtime_lora_endpoints_are_absent_unless_switched_on(client: httpx.Client, tmp_path: Path) -> None:
    """As vLLM without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: FastAPI's 404 for a path it has no route for."""
    with FaultServer("m") as fake:
        body = {"lora_name": "x", "lora_path": str(tmp_path)}
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = client.post(f"{fake.root_url}{path}", json=body)
            assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
        fake.runtime_lora = True
        assert client.post(f"{fake.root_url}/v1/load_lora_adapter", json=body).status_code == 200
        assert fake.adapters == {"x": "m"}

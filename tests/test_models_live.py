"""One real vLLM server (SmolLM2-135M-Instruct on CPU) serving two names and LoRA adapters: the engine's facts.

vLLM on CPU serves LoRA adapters: a freshly initialised rank-8 adapter made offline with peft
(``testing.lora``) is served under its own name, listed by ``/v1/models`` with ``parent`` set to the
served name it was loaded on, and loaded or unloaded at run time. These tests hold the facts the router's
model groups rely on, and hold the recording the emulator is checked against (``served_models.py``).

``models_server`` starts the one server of this module (about 30 s) and is meant for reuse by router
tests: its ``base_url``, served ``names``, static ``adapters`` (name -> parent) and the main ``adapter``.
It runs beside the session's vLLM pair (three servers at most), pinned to one core. The recording test
(last) unloads ``sql`` and loads it again, so after it ``/v1/models`` lists ``sql`` after ``sql-chat``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from anorag_integrations.cli.servers import free_port

from .conftest import VllmFleet
from .served_models import ADAPTERS, ASK, FACTS, NAMES, RUNTIME, emulated, observe, recorded

pytestmark = pytest.mark.live


@dataclass(frozen=True)
class ModelsServer:
    """The module's real vLLM server and what it serves."""

    server: Any
    names: tuple[str, ...]
    adapters: dict[str, str]
    """Static adapters (``--lora-modules``): name -> parent (the served name it was loaded on)."""
    paths: dict[str, str] = field(repr=False)
    """``<model>``, ``<sql>``, ``<noisy>`` -> the folders of the model and the two adapters on this machine."""
    adapter: str = "sql"

    @property
    def base_url(self) -> str:
        return str(self.server.base_url)

    @property
    def root_url(self) -> str:
        return str(self.server.root_url)


def lora_vllm(port: int, names: tuple[str, ...], adapters: dict[str, str], paths: dict[str, str]) -> Any:
    """A (not yet started) vLLM server: ``--served-model-name`` every name, the adapters from ``--lora-modules``
    (the JSON form where the parent is not the first name), runtime loading on, pinned to the last core."""
    from anorag_integrations.cli.vllm import VllmServer

    modules = [
        f"{name}={paths['<sql>']}" if parent == names[0]
        else json.dumps({"name": name, "path": paths["<sql>"], "base_model_name": parent})
        for name, parent in adapters.items()
    ]  # fmt: skip

    class LoraVllm(VllmServer):
        def environment(self) -> dict[str, str]:
            return {**super().environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}

    extra = ["--served-model-name", *names, "--enable-lora", "--lora-modules", *modules, "--max-lora-rank", "8"]
    # the later --served-model-name wins: VllmServer passes its alias first
    return LoraVllm(port, alias=names[0], tool_parser=None, cpu=(os.cpu_count() or 1) - 1, extra_args=extra)


@pytest.fixture(scope="module")
def models_server(vllm_fleet: VllmFleet) -> Iterator[ModelsServer]:
    """A real vLLM serving ``NAMES`` and the adapters ``ADAPTERS`` (module scope: started once, ~30 s).

    ``vllm_fleet`` skips (locally) or fails (CI) where vLLM is missing; a missing ``peft`` does the same.
    """
    from anorag_integrations.cli import vllm
    from anorag_integrations.testing.lora import chat_lora_adapter

    try:
        paths = {"<model>": str(vllm.chat_model()), "<sql>": str(chat_lora_adapter()),
                 "<noisy>": str(chat_lora_adapter(noisy=True))}  # fmt: skip
    except vllm.SetupError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server = lora_vllm(free_port(), NAMES, ADAPTERS, paths)
    with server:
        yield ModelsServer(server, NAMES, dict(ADAPTERS), paths)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as http:
        yield http


def chat(client: httpx.Client, root_url: str, model: str, **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": ASK, "max_tokens": 8, "temperature": 0, **body}
    return client.post(f"{root_url}/v1/chat/completions", json=payload)


def test_models_lists_every_served_name_then_each_adapter_with_its_parent(
    models_server: ModelsServer, client: httpx.Client
) -> None:
    data = client.get(f"{models_server.root_url}/v1/models").json()["data"]
    listed = [(m["id"], m["parent"], m["root"], m["max_model_len"]) for m in data]
    model, sql = models_server.paths["<model>"], models_server.paths["<sql>"]
    assert listed == [
        ("smollm2", None, model, 4096),
        ("smollm2-chat", None, model, 4096),  # the same model under its second name: same root
        ("sql", "smollm2", sql, None),  # an adapter: its own folder, no window of its own
        ("sql-chat", "smollm2-chat", sql, None),  # loaded on the second name (--lora-modules JSON form)
    ]
    assert {frozenset(m) for m in data} == {
        frozenset({"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"})
    }


def test_a_chat_naming_an_adapter_is_answered_as_the_adapter_and_an_alias_as_the_first_name(
    models_server: ModelsServer, client: httpx.Client
) -> None:
    answers = {name: chat(client, models_server.root_url, name).json() for name in (*NAMES, "sql")}
    assert {name: body["model"] for name, body in answers.items()} == {
        "smollm2": "smollm2",
        "smollm2-chat": "smollm2",  # vLLM answers as its first served name, whichever the request named
        "sql": "sql",
    }
    assert all(body["choices"][0]["message"]["content"] for body in answers.values())


def test_an_unknown_model_is_a_404_naming_the_served_names_not_the_adapters(
    models_server: ModelsServer, client: httpx.Client
) -> None:
    response = chat(client, models_server.root_url, "nope")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `nope` does not exist. Valid aliases: smollm2, smollm2-chat.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_an_adapter_loaded_at_run_time_is_applied_and_unloads(
    models_server: ModelsServer, client: httpx.Client
) -> None:
    """The noisy adapter's update is large: served, its greedy answer is not the base model's (vLLM applied it)."""
    root = models_server.root_url
    load = {"lora_name": RUNTIME, "lora_path": models_server.paths["<noisy>"]}
    loaded = client.post(f"{root}/v1/load_lora_adapter", json=load)
    try:
        assert (loaded.status_code, loaded.text) == (200, f"Success: LoRA adapter '{RUNTIME}' added successfully.")
        [card] = [m for m in client.get(f"{root}/v1/models").json()["data"] if m["id"] == RUNTIME]
        assert (card["parent"], card["root"]) == (NAMES[0], models_server.paths["<noisy>"])
        base, noisy = (chat(client, root, name).json() for name in (NAMES[0], RUNTIME))
        assert noisy["model"] == RUNTIME
        assert noisy["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    finally:
        unloaded = client.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": RUNTIME})
    assert (unloaded.status_code, unloaded.text) == (200, f"Success: LoRA adapter '{RUNTIME}' removed successfully.")
    assert chat(client, root, RUNTIME).status_code == 404


def test_one_router_over_two_models_lora_adapters_and_llama_cpp(
    models_server: ModelsServer, client: httpx.Client, vllm_pair: list[Any], llama_servers: list[Any]
) -> None:
    """Model groups on real engines: the session pair's vLLM (its one name), this module's vLLM (two names,
    adapters) and llama.cpp (Gemma), in one router. Each call goes only where its model is served; an adapter
    loaded at run time is found by one lookup; one unloaded answers vLLM's 404, which drops it from the group
    and leaves the route's breaker alone."""
    from anorag_integrations import ChatVLLMRouted, ModelNotFoundError, Router, call_info
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.router.endpoints.health import BreakerState
    from anorag_integrations.router.errors import UnknownModelError

    pair, gemma = vllm_pair[0], llama_servers[0]
    routes = {
        "pair": {"base_url": pair.base_url, "model": pair.alias},
        "lora": {"base_url": models_server.base_url, "model": NAMES[1]},
        "gemma": {"base_url": gemma.base_url, "model": gemma.alias, "aliases": ["small"]},
    }
    params = {"temperature": 0, "max_tokens": 4, "max_retries": 0}
    config = config_from_dict({"llm": {"routes": routes, "params": params}}, env={})
    with Router(config, start_prober=False) as router:
        assert pair.alias == NAMES[0]  # the pair serves the name the module's server lists first
        router.health()  # one probe of each: what every server lists joins the groups
        lora = router.routes["lora"]
        assert set(lora.served_names()) >= {*NAMES, *ADAPTERS} and lora.parents == ADAPTERS

        def ask(model: str | None = None) -> tuple[str | None, str]:
            response = router.chat(ASK, **({"model": model} if model else {}))
            info = call_info(response)
            assert info is not None and response.choices[0].message.content
            return info.route, response.model

        assert {ask()[0] for _ in range(4)} == {"pair", "lora"}  # no model: the default route's, smollm2 (both)
        assert {ask(NAMES[1])[0] for _ in range(2)} == {"lora"}  # its second name: listed by lora only
        assert ask(models_server.adapter) == ("lora", models_server.adapter)  # vLLM answers as the adapter
        assert ask("small")[0] == "gemma"  # an alias, sent as gemma's own name
        chat_model = ChatVLLMRouted(router=router, model="sql-chat")
        message = chat_model.invoke("Say hi")
        assert message.response_metadata["route"] == "lora"
        assert message.response_metadata["served_model"] == "sql-chat"

        loaded = client.post(
            f"{models_server.root_url}/v1/load_lora_adapter",
            json={"lora_name": "late", "lora_path": models_server.paths["<noisy>"]},
        )
        assert loaded.status_code == 200
        try:
            assert ask("late") == ("lora", "late")  # not seen by any probe: one lookup of /v1/models found it
        finally:
            client.post(f"{models_server.root_url}/v1/unload_lora_adapter", json={"lora_name": "late"})
        with pytest.raises(ModelNotFoundError) as raised:
            ask("late")  # vLLM's 404 now
        assert raised.value.status == 404 and not isinstance(raised.value, UnknownModelError)
        assert "late" in lora.dropped and lora.breaker.state is BreakerState.CLOSED and lora.breaker._failures == 0
        with pytest.raises(UnknownModelError):
            ask("late")  # out of the group: refused before sending
        assert ask(models_server.adapter)[0] == "lora"  # the route itself serves on


def test_vllm_still_answers_as_recorded_and_the_emulator_answers_the_same(
    models_server: ModelsServer, client: httpx.Client, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The recording ``test_protocol`` holds FaultServer to is what this vLLM answers now (``--record-mode=rewrite``
    writes it anew), and FaultServer set up the same way answers the same, request for request."""
    real = observe(client, models_server.root_url, models_server.paths)
    if request.config.getoption("record_mode", None) == "rewrite":
        FACTS.write_text(json.dumps(real, indent=1, ensure_ascii=False) + "\n")
    assert real == recorded()
    with emulated(tmp_path) as (fake, paths):
        assert observe(client, fake.root_url, paths) == real

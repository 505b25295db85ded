"""Several names and LoRA adapters on one server: what vLLM 0.32 answered, recorded, and how to observe it again.

:func:`observe` drives a server through the same requests every time: ``/v1/models``, chats naming each
served name and adapter, an unknown model, and a run of runtime LoRA loads and unloads (good and bad). Its
result, with machine paths and times made neutral, is compared with the recording from real vLLM
(``data/vllm_lora_facts.json``): the live test re-observes real vLLM (``test_models_live.py``), the protocol
test observes FaultServer (``test_protocol.py``), so the emulator is held to what the engine did.

The server is expected as the live test starts vLLM: served names ``NAMES``, static adapters ``ADAPTERS``
(name -> parent), ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, and no adapter named ``noisy`` yet.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from anorag_integrations.testing import FaultServer

FACTS = Path(__file__).parent / "data" / "vllm_lora_facts.json"
NAMES = ("smollm2", "smollm2-chat")
"""``--served-model-name smollm2 smollm2-chat``: the first is the name answers carry."""
ADAPTERS = {"sql": "smollm2", "sql-chat": "smollm2-chat"}
"""Static adapters and their parents: ``sql=DIR``, and the JSON form naming the second served name as base."""
RUNTIME = "noisy"
"""The adapter loaded at run time (``testing.lora.chat_lora_adapter(noisy=True)``: its answers are noise)."""
MISSING = "/nonexistent/adapter"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def exchanges(paths: dict[str, str]) -> list[tuple[str, Any]]:
    """The runtime LoRA requests, in order: (path, JSON body, or raw bytes sent as text/plain).

    ``paths`` maps ``<noisy>`` and ``<sql>`` to the adapters' folders on this machine.
    """
    load, unload, chat = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions"
    noisy, sql = paths["<noisy>"], paths["<sql>"]
    return [
        (load, {"lora_name": RUNTIME, "lora_path": noisy}),
        ("GET /v1/models", None),
        (load, {"lora_name": RUNTIME, "lora_path": noisy}),  # already loaded
        (load, {"lora_name": RUNTIME, "lora_path": noisy, "load_inplace": True}),
        (load, {"lora_name": NAMES[1], "lora_path": noisy}),  # a served name
        (load, {"lora_name": "ghost", "lora_path": MISSING}),
        (load, {"lora_name": "ghost", "lora_path": ""}),
        (load, {"lora_name": "ghost"}),
        (load, {}),
        (load, {"lora_name": 5, "lora_path": noisy}),
        (load, [1]),
        (load, b'{"lora_name": "ghost", "lora_path": "x"}'),  # not application/json
        (unload, {"lora_name": RUNTIME}),
        (unload, {"lora_name": RUNTIME}),  # gone
        (chat, {"model": RUNTIME, "messages": ASK, "max_tokens": 1}),
        (unload, {"lora_name": NAMES[0]}),  # a served name is no adapter
        (unload, {"lora_name": ""}),
        (unload, {}),
        (unload, {"lora_name": "sql"}),  # a static adapter unloads too...
        (load, {"lora_name": "sql", "lora_path": sql}),  # ...and loads again, now on the first served name
        ("GET /v1/models", None),
    ]


def observe(client: httpx.Client, root_url: str, paths: dict[str, str]) -> dict[str, Any]:
    """What the server at ``root_url`` answers to the recorded requests, neutral (see :func:`neutral`).

    ``paths`` maps ``<model>``, ``<sql>``, ``<noisy>`` to folders on this machine (replaced back by the names).
    Leaves the server as it found it: ``noisy`` unloaded, ``sql`` loaded (on the first served name).
    """
    chat = f"{root_url}/v1/chat/completions"
    answered_as: dict[str, Any] = {}
    for name in (*NAMES, *ADAPTERS, ""):
        body = client.post(chat, json={"model": name, "messages": ASK, "max_tokens": 1}).json()
        answered_as[name] = body["model"]
    no_model = client.post(chat, json={"messages": ASK, "max_tokens": 1}).json()
    streamed = client.post(chat, json={"model": "sql", "messages": ASK, "max_tokens": 2, "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    unknown = client.post(chat, json={"model": "nope", "messages": ASK, "max_tokens": 1})
    facts = {
        "models": client.get(f"{root_url}/v1/models").json(),
        "answered_as": answered_as,
        "answered_as_without_model": no_model["model"],
        "stream_chunks_answered_as": sorted({chunk["model"] for chunk in chunks}),
        "unknown_model": {"status": unknown.status_code, "body": unknown.json()},
        "exchanges": [_exchange(client, root_url, path, body) for path, body in exchanges(paths)],
    }
    return neutral(facts, paths)


def _exchange(client: httpx.Client, root_url: str, path: str, body: Any) -> dict[str, Any]:
    if path.startswith("GET "):
        response = client.get(root_url + path[4:])
    elif isinstance(body, bytes):
        response = client.post(root_url + path, content=body, headers={"Content-Type": "text/plain"})
    else:
        response = client.post(root_url + path, json=body)
    try:
        answer: Any = response.json()
    except ValueError:
        answer = response.text  # vLLM's 200 to a load or unload: bare text
    sent = body.decode() if isinstance(body, bytes) else body
    return {"request": [path, sent], "status": response.status_code, "answer": answer}


def neutral(value: Any, paths: dict[str, str]) -> Any:
    """``value`` with each folder of ``paths`` back to its name, times as ``<int>``, permission ids neutral."""
    if isinstance(value, dict):
        return {k: ("<int>" if k == "created" and isinstance(v, int) else neutral(v, paths)) for k, v in value.items()}
    if isinstance(value, list):
        return [neutral(item, paths) for item in value]
    if isinstance(value, str):
        if value.startswith("modelperm-"):
            return "modelperm-*"
        for name, folder in sorted(paths.items(), key=lambda item: -len(item[1])):  # longest first: nested folders
            value = value.replace(folder, name)
    return value


@contextlib.contextmanager
def emulated(folder: Path) -> Iterator[tuple[FaultServer, dict[str, str]]]:
    """FaultServer set up as the live test starts vLLM, and its ``paths`` (empty folders made under ``folder``)."""
    paths = {name: str(folder / name.strip("<>")) for name in ("<model>", "<sql>", "<noisy>")}
    for made in paths.values():
        Path(made).mkdir()
    with FaultServer(NAMES[0], served_names=NAMES, runtime_lora=True) as fake:
        fake.model_root = paths["<model>"]
        for name, parent in ADAPTERS.items():
            fake.add_adapter(name, parent, root=paths["<sql>"])
        yield fake, paths


def recorded() -> dict[str, Any]:
    """The facts as real vLLM 0.32 CPU answered them."""
    return dict(json.loads(FACTS.read_text()))

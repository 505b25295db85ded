"""What a FaultServer serves, as vLLM 0.32 serves it: several names for one model, and LoRA adapters.

vLLM's ``--served-model-name A B`` makes one model answer to every name; the first is the one it answers
as (a chat naming ``B`` gets ``"model": "A"``), the one its metrics carry, and the parent of adapters.
A LoRA adapter (``--lora-modules NAME=DIR``, or ``POST /v1/load_lora_adapter`` at run time) answers as
its own name. ``/v1/models`` lists each served name (``root``: the model's folder, ``parent``: null,
``max_model_len``) and then each adapter (``root``: its folder, ``parent``: the served name it was loaded
on, ``max_model_len``: null). Checked on vLLM 0.32 CPU (``tests/data/vllm_lora_facts.json``).

The runtime endpoints are answered by :func:`load_adapter` and :func:`unload_adapter`, with vLLM's
validation: its 400 for a body that is not a JSON object of the right fields (FastAPI's, reworded by vLLM),
its own 400s and 404s, and ``Success: ...`` as a bare text body on 200.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .wire import error

__all__ = ["NOT_ROUTED", "PERMISSION", "Adapter", "load_adapter", "model_card", "not_found", "unload_adapter"]

PERMISSION = {
    "id": "modelperm-0",
    "object": "model_permission",
    "created": 0,
    "allow_create_engine": False,
    "allow_sampling": True,
    "allow_logprobs": True,
    "allow_search_indices": False,
    "allow_view": True,
    "allow_fine_tuning": False,
    "organization": "*",
    "group": None,
    "is_blocking": False,
}
"""The model permission vLLM lists with every served model and adapter (its /v1/models, 0.32)."""

NOT_ROUTED = {"detail": "Not Found"}
"""FastAPI's 404 for a path with no route: the LoRA endpoints without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter a server holds: the served name it was loaded on and the folder it came from."""

    parent: str
    root: str


def model_card(name: str, *, root: str, parent: str | None, created: int) -> dict[str, Any]:
    """One entry of ``/v1/models`` (the caller adds ``max_model_len``: a number for a served name, null for an
    adapter, absent for servers that do not report it)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "permission": [{**PERMISSION, "created": created}],
    }


def not_found(name: object, served_names: Sequence[str], *, pooling: bool = False) -> web.Response:
    """vLLM's 404 for a model it does not serve: the chat server names its served names (not its adapters);
    the pooling server (``/v1/embeddings``) names none, and no ``param``."""
    if pooling:
        return error(404, f"The model `{name}` does not exist.", err_type="NotFoundError")
    message = f"The model `{name}` does not exist. Valid aliases: {', '.join(served_names)}."
    return error(404, message, err_type="NotFoundError", param="model")


def load_adapter(
    request_body: bytes, content_type: str, served_names: Sequence[str], adapters: Mapping[str, Adapter]
) -> tuple[web.Response, tuple[str, Adapter] | None]:
    """The answer to ``POST /v1/load_lora_adapter``, and the adapter to hold when it succeeded.

    A runtime-loaded adapter's parent is the first served name, as vLLM's. Its folder must exist on this
    machine (vLLM's 404 otherwise), as vLLM finds a local adapter; nothing in it is read.
    """
    fields = _validated(request_body, content_type, ("lora_name", "lora_path"))
    if isinstance(fields, web.Response):
        return fields, None
    name, path = str(fields["lora_name"]), str(fields["lora_path"])
    if not name or not path:
        return _invalid(400, "Both 'lora_name' and 'lora_path' must be provided."), None
    if name in served_names:
        return _invalid(400, f"The lora adapter '{name}' conflicts with a served base model."), None
    if name in adapters and not fields.get("load_inplace"):
        message = (
            f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True."
        )
        return _invalid(400, message), None
    if not os.path.exists(path):
        return error(404, f"Loading lora {name} failed: No adapter found for {path}", err_type="NotFoundError"), None
    return _success(f"Success: LoRA adapter '{name}' added successfully."), (name, Adapter(served_names[0], path))


def unload_adapter(
    request_body: bytes, content_type: str, adapters: Mapping[str, Adapter]
) -> tuple[web.Response, str | None]:
    """The answer to ``POST /v1/unload_lora_adapter``, and the adapter to drop when it succeeded
    (static ones too: vLLM unloads an adapter given by ``--lora-modules`` as well)."""
    fields = _validated(request_body, content_type, ("lora_name",))
    if isinstance(fields, web.Response):
        return fields, None
    name = str(fields["lora_name"])
    if not name:
        return _invalid(400, "'lora_name' needs to be provided to unload a LoRA adapter."), None
    if name not in adapters:
        return error(404, f"The lora adapter '{name}' cannot be found.", err_type="NotFoundError"), None
    return _success(f"Success: LoRA adapter '{name}' removed successfully."), name


def _success(text: str) -> web.Response:
    """vLLM answers 200 with the bare text and no Content-Type; aiohttp always sends one, so: text/plain."""
    return web.Response(text=text, content_type="text/plain")


def _invalid(status: int, message: str) -> web.Response:
    return error(status, message, err_type="InvalidUserInput")


def _validated(raw: bytes, content_type: str, required: Sequence[str]) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 vLLM's request validation answers (its wording of pydantic's errors)."""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return _validation_error(["Unsupported Media Type: Only 'application/json' is allowed"], None)
    problem: dict[str, Any]
    try:
        body = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        problem = {"type": "json_invalid", "loc": f"body.{pos}", "msg": "JSON decode error",
                   "input": _summary({}), "ctx": {"error": getattr(exc, "msg", str(exc))}}  # fmt: skip
        return _validation_error([problem], problem["loc"])
    if not isinstance(body, dict):
        problem = {"type": "model_attributes_type", "loc": "body",
                   "msg": "Input should be a valid dictionary or object to extract fields from",
                   "input": _summary(body)}  # fmt: skip
        return _validation_error([problem], "body")
    problems: list[dict[str, Any]] = []
    for field in required:
        if field not in body:
            problems.append(
                {"type": "missing", "loc": f"body.{field}", "msg": "Field required", "input": _summary(body)}
            )
        elif not isinstance(body[field], str):
            problems.append({"type": "string_type", "loc": f"body.{field}", "msg": "Input should be a valid string",
                             "input": _summary(body[field])})  # fmt: skip
    if problems:
        return _validation_error(problems, problems[0]["loc"])
    return body


def _summary(value: object) -> str:
    """How vLLM shows a rejected value: containers by their size, anything else as text."""
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return value if isinstance(value, str) else str(value)


def _validation_error(problems: Sequence[object], param: str | None) -> web.Response:
    label = "error" if len(problems) == 1 else "errors"
    message = f"{len(problems)} validation {label}:\n" + "\n".join(f"  {problem}" for problem in problems)
    return error(400, message, err_type="Bad Request", param=param)

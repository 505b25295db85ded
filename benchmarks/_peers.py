"""The peers that pin ``openai<3`` (LiteLLM ``Router``, LlamaIndex ``OpenAILike``), in their own virtualenv.

Started by the benchmarks as ``.venv-peers/bin/python _peers.py``; reads one JSON command per line
on stdin and answers one JSON line on stdout, so it is measured in its own process with its own
CPU clock and never changes the SDK the project is measured with. Commands:
``{"op": "versions"}``, ``{"op": "overhead", "client", "urls", "requests", "concurrency", "stream"}``,
``{"op": "failover", "client", "urls", "requests", "concurrency", "timeout", "faults"}`` where faults are
``[fraction, url, pid, signal]`` lists, ``{"op": "open_loop", "urls", "rate", "duration", "timeout", "warmup",
"max_tokens"}``: LiteLLM's ``Router`` with that timeout and its defaults otherwise (retries, cooldowns), under
calls arriving on a fixed schedule (``_measure.open_loop``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from importlib.metadata import version
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import

from _measure import MODEL, PROMPT, Call, Scenario, drain, open_loop, throughput

MESSAGES = [{"role": "user", "content": PROMPT}]
USAGE = {"include_usage": True}  # every client asks for usage on streams, as ours does
_clients: dict[str, Call] = {}


def litellm_router(
    urls: list[str], timeout: float | None = None, scenario: Scenario | None = None, retries: int | None = 2
) -> Any:
    """LiteLLM's Router over ``urls``; with ``timeout``, that per-attempt bound and ``retries`` (None: its default)."""
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    litellm.suppress_debug_info = True
    deployments = [
        {"model_name": "bench", "litellm_params": {"model": f"openai/{MODEL}", "api_base": url, "api_key": "EMPTY"}}
        for url in urls
    ]
    settings: dict[str, Any] = {}
    if timeout is not None:  # the failover scenario: the same bounds our router gets
        settings = {"timeout": timeout} if retries is None else {"timeout": timeout, "num_retries": retries}
    if scenario is not None:

        class Failures(CustomLogger):  # type: ignore[misc]
            async def async_log_failure_event(
                self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
            ) -> None:
                scenario.attempt_failed(str(kwargs.get("litellm_params", {}).get("api_base")))

        litellm.callbacks = [Failures()]
    return litellm.Router(model_list=deployments, **settings)


def make_client(client: str, urls: list[str], stream: bool) -> Call:
    """One call of ``client`` over ``urls`` (clients without routing take the servers in turn)."""
    if client == "LiteLLM Router.acompletion":
        router = litellm_router(urls)

        if stream:
            return lambda: drain(
                router.acompletion(model="bench", messages=MESSAGES, stream=True, stream_options=USAGE)
            )
        return lambda: router.acompletion(model="bench", messages=MESSAGES)
    if client == "OpenAILike.achat":
        from llama_index.core.llms import ChatMessage
        from llama_index.llms.openai_like import OpenAILike

        llms = itertools.cycle(
            [
                OpenAILike(
                    model=MODEL,
                    api_base=url,
                    api_key="EMPTY",
                    is_chat_model=True,
                    max_retries=0,
                    additional_kwargs={"stream_options": USAGE} if stream else {},
                )
                for url in urls
            ]
        )
        messages = [ChatMessage(role="user", content=PROMPT)]

        if stream:
            return lambda: drain(next(llms).astream_chat(messages))
        return lambda: next(llms).achat(messages)
    if client == "raw AsyncOpenAI (openai 2.x)":
        import openai

        raws = itertools.cycle([openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0) for url in urls])

        if stream:
            return lambda: drain(
                next(raws).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, stream_options=USAGE)
            )
        return lambda: next(raws).chat.completions.create(model=MODEL, messages=MESSAGES)
    raise ValueError(f"unknown peer client {client!r}")


async def failover(command: dict[str, Any]) -> dict[str, Any]:
    faults = [
        (fraction, url, lambda pid=pid, sig=sig: os.kill(pid, sig)) for fraction, url, pid, sig in command["faults"]
    ]
    scenario = Scenario(faults)
    router = litellm_router(command["urls"], command["timeout"], scenario)

    async def call() -> None:
        await router.acompletion(model="bench", messages=MESSAGES)

    result = await scenario.run(call, command["requests"], command["concurrency"])
    if command["faults"] and not scenario.failed_attempts:  # its failure callback reported no deployment
        result["faulted_routes"] = {url: {"failed_attempts_after_fault": None, "last_attempt_after_fault_s": None}
                                    for _, url, _, _ in command["faults"]}  # fmt: skip
    return result


async def overload(command: dict[str, Any]) -> dict[str, Any]:
    """LiteLLM's Router, its defaults but the timeout, under open-loop arrivals (``overload.py``)."""
    import logging

    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # a failed call logs a traceback otherwise
    router = litellm_router(command["urls"], command["timeout"], retries=None)
    names = {"num_retries": "num_retries", "allowed_fails": "allowed_fails", "cooldown_time_s": "cooldown_time"}
    settings = {key: getattr(router, name, None) for key, name in names.items()}
    max_tokens = command.get("max_tokens", 8)
    for _ in range(command.get("warmup", 0)):
        await router.acompletion(model="bench", messages=MESSAGES, max_tokens=max_tokens)

    async def call(tag: str) -> None:
        await router.acompletion(model="bench", messages=MESSAGES, max_tokens=max_tokens)

    result = await open_loop(call, command["rate"], command["duration"])
    return {**result, "settings": settings}


async def handle(command: dict[str, Any]) -> Any:
    if command["op"] == "versions":
        return {name: version(name) for name in ("openai", "litellm", "llama-index-llms-openai-like")}
    if command["op"] == "overhead":
        key = json.dumps([command["client"], command["urls"], command["stream"]])
        if key not in _clients:
            _clients[key] = make_client(command["client"], command["urls"], command["stream"])
        return await throughput(_clients[key], command["requests"], command["concurrency"])
    if command["op"] == "failover":
        return await failover(command)
    if command["op"] == "open_loop":
        return await overload(command)
    raise ValueError(f"unknown op {command['op']!r}")


def main() -> None:
    loop = asyncio.new_event_loop()  # one loop for the whole session: the clients keep their connections
    for line in sys.stdin:
        try:
            answer = {"ok": loop.run_until_complete(handle(json.loads(line)))}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()

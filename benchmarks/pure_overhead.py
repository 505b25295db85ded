"""Client overhead without the network: CPU microseconds per call with the HTTP layer replaced by a stub.

Every client gets the same prebuilt ``ChatCompletion`` from a stub where it would call the openai SDK,
so what is left is each client's own work (routing, statistics, conversions, callbacks). This is
the low-noise view of ``overhead.py``. ``--profile CLIENT`` prints a pyinstrument profile of that
client (the ``bench`` extra). Run: ``.venv/bin/python benchmarks/pure_overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any, ClassVar

from _common import save
from _measure import PROMPT, Call, drain

RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "one two three"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def chunks() -> list[Any]:
    """The 11 chunks vLLM streams for an 8-word answer with usage: role, 8 words, finish, usage."""
    from openai.types.chat import ChatCompletionChunk

    def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> ChatCompletionChunk:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
        return ChatCompletionChunk.model_validate({**body, **extra})

    usage = {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    return [chunk({"role": "assistant"}), *(chunk({"content": w + " "}) for w in WORDS), chunk({}, "stop"),
            chunk(None, usage=usage)]  # type: ignore[arg-type]  # fmt: skip


class StubStream:
    """An SDK stream replayed from memory."""

    def __init__(self, items: list[Any]) -> None:
        self._items = iter(items)

    def __aiter__(self) -> StubStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        pass


def clients() -> dict[str, Call]:
    from langchain_openai import ChatOpenAI
    from llama_index.core.llms import ChatMessage
    from openai.types.chat import ChatCompletion

    from anorag_integrations import Router, VLLMRouted
    from anorag_integrations.config import config_from_dict
    from anorag_integrations.langchain import ChatVLLMRouted

    response = ChatCompletion.model_validate(RESPONSE)

    async def acreate(body: dict[str, Any], timeout: float) -> ChatCompletion:
        return response

    class Raw:  # what ChatOpenAI reads: async_client.with_raw_response.create(...).parse()
        headers: ClassVar[dict[str, str]] = {}

        def parse(self) -> ChatCompletion:
            return response

    class Completions:
        with_raw_response: Any = None

        async def create(self, **_: Any) -> Any:
            return Raw()

    stub = Completions()
    stub.with_raw_response = stub
    routes = {
        "a": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
        "b": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }
    router = Router(config_from_dict({"llm": {"routes": routes}}, env={}), start_prober=False)
    streamed = chunks()

    async def aopen_stream(body: dict[str, Any], timeout: float) -> StubStream:
        return StubStream(streamed)

    for route in router.routes.values():
        route.acreate = acreate  # type: ignore[method-assign]
        route.aopen_stream = aopen_stream  # type: ignore[method-assign]
    routed = ChatVLLMRouted(router=router)
    llm = VLLMRouted(router=router, context_window=8192)
    chat_openai = ChatOpenAI(base_url="http://127.0.0.1:9/v1", api_key="EMPTY", model="m", max_retries=0)  # type: ignore[arg-type]
    chat_openai.async_client = stub
    messages = [{"role": "user", "content": PROMPT}]
    li_messages = [ChatMessage(role="user", content=PROMPT)]

    return {
        "Router.achat": lambda: router.achat(messages),
        "Router.astream (11 chunks)": lambda: drain(router.astream(messages)),
        "ChatVLLMRouted.ainvoke": lambda: routed.ainvoke(PROMPT),
        "ChatOpenAI.ainvoke": lambda: chat_openai.ainvoke(PROMPT),
        "VLLMRouted.achat": lambda: llm.achat(li_messages),
    }


async def per_call_us(call: Call, calls: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(calls):
            await call()
        rounds.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(rounds)


async def run(calls: int, profile: str | None) -> list[dict[str, Any]]:
    named = clients()
    for call in named.values():
        for _ in range(200):  # warm up
            await call()
    if profile:
        from pyinstrument import Profiler

        with Profiler(async_mode="disabled") as profiler:
            for _ in range(calls):
                await named[profile]()
        print(profiler.output_text(color=False, unicode=False))
    return [{"client": name, "us_per_call": round(await per_call_us(call, calls), 1)} for name, call in named.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--profile", help="print a pyinstrument profile of this client")
    args = parser.parse_args()
    rows = asyncio.run(run(args.calls, args.profile))
    chat_openai = next(r["us_per_call"] for r in rows if r["client"] == "ChatOpenAI.ainvoke")
    for row in rows:
        row["vs_chat_openai"] = round(row["us_per_call"] / chat_openai, 2)
        print(f"{row['client']:24} {row['us_per_call']:7.1f} us per call ({row['vs_chat_openai']}x ChatOpenAI.ainvoke)")
    print("written to", save("pure_overhead", rows, cores="one process, HTTP stubbed", calls=args.calls))


if __name__ == "__main__":
    main()

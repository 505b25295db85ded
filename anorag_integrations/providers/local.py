"""LocalLLM: the seed's one-call text generation on whichever provider the config names."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from .factory import LLMFactory


class LocalLLM:
    """``LocalLLM(provider="vllm_openai").generate(prompt, **params) -> str`` and its twins."""

    def __init__(self, provider: str | None = None, config: str | None = None, **defaults: Any) -> None:
        self.provider = LLMFactory.create_provider(provider, config, **defaults)

    def generate(self, prompt: str, **params: Any) -> str:
        return self.provider.chat(prompt, **params)

    async def agenerate(self, prompt: str, **params: Any) -> str:
        return await self.provider.achat(prompt, **params)

    def stream_generate(self, prompt: str, **params: Any) -> Iterator[str]:
        return self.provider.stream(prompt, **params)

    def astream_generate(self, prompt: str, **params: Any) -> AsyncIterator[str]:
        return self.provider.astream(prompt, **params)

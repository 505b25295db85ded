"""LLMProvider: strings in, strings out, on top of a router."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from ..router import Router

Messages = str | Sequence[Mapping[str, Any]]
"""A prompt (one user message) or OpenAI-style chat messages."""


def as_messages(messages: Messages) -> list[Mapping[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


class LLMProvider:
    """The seed's provider interface: ``chat``, ``stream``, ``achat``, ``astream``, health, models."""

    name = "provider"

    def __init__(self, router: Router, **defaults: Any) -> None:
        self.router = router
        self.defaults = {k: v for k, v in defaults.items() if v is not None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(routes={list(self.router.routes)})"

    def chat(self, messages: Messages, **params: Any) -> str:
        response = self.router.chat(as_messages(messages), **{**self.defaults, **params})
        return response.choices[0].message.content or ""

    async def achat(self, messages: Messages, **params: Any) -> str:
        response = await self.router.achat(as_messages(messages), **{**self.defaults, **params})
        return response.choices[0].message.content or ""

    def stream(self, messages: Messages, **params: Any) -> Iterator[str]:
        for chunk in self.router.stream(as_messages(messages), **{**self.defaults, **params}):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    async def astream(self, messages: Messages, **params: Any) -> AsyncIterator[str]:
        async for chunk in self.router.astream(as_messages(messages), **{**self.defaults, **params}):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def is_available(self) -> bool:
        """Whether at least one route answers its health probe now."""
        return any(row["healthy"] for row in self.router.health().values())

    def list_models(self) -> list[str]:
        """Every model the routes' servers report, without duplicates."""
        seen: dict[str, None] = {}
        for row in self.router.health().values():
            seen.update(dict.fromkeys(row["models"]))
        return list(seen)

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.router.stats()

    def close(self) -> None:
        """Close the router, unless it is the process-wide one other users share (then only let it go)."""
        if not self.router.is_shared:
            self.router.close()

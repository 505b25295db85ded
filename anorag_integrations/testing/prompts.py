"""A prompt given as plain text, shaped as the prefix policies read a call: for tests, benchmarks and tools
that drive a policy without building chat requests."""

from __future__ import annotations

from ..router.balancing.prefix_index import chain_blocks


class TextPrompt:
    """A request as the prefix policies see it: its text, hashed into blocks (per request, as a call does)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def prefix_key(self, chars: int) -> int:
        return hash(self.text[:chars])

    def prefix_blocks(self, block_chars: int) -> tuple[int, ...]:
        return chain_blocks(self.text, block_chars)

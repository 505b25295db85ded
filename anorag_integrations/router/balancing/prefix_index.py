"""What each route's server probably has in its prefix cache: chained block hashes in a bounded LRU.

A conversation's text (each message's role and text, as ``prefix_key`` reads it) is cut into blocks
of ``BLOCK_CHARS`` characters; block *i*'s hash covers block *i* and the hash of block *i - 1*, so
one hash stands for the whole prefix up to it (llm-d's scheme, on characters instead of tokens: the
router has no tokenizer, and a prefix of characters is a prefix of tokens up to the last block).
Per route an ``OrderedDict`` keeps the block hashes of prompts recently sent there, least recently
used first, never more than ``max_blocks`` of them (the hard memory cap).

Why blocks and not a character tree: a Python character/radix tree costs a node object per edge and
a walk per character; a block costs one dict entry per 64 characters and one ``hash()`` of a short
string, so a 10,000-character prompt is hashed in tens of microseconds (see ``benchmarks/README.md``).

Why the index stays *prefix-closed*: a prompt's blocks are touched leaf first, root last, so a block
is never more recent than its parent and LRU eviction always drops the deepest blocks first, as a
radix tree evicts leaves. Membership along one chain is therefore monotone, and the matched depth is
found by binary search (O(log n) dictionary lookups per route).

One index serves a policy's sync and async callers alike; a lock guards every read and update, and
no operation awaits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .. import forks

BLOCK_CHARS = 64
"""Characters per hashed block (llm-d's block size; about 16 tokens of English)."""
MAX_BLOCKS_PER_ROUTE = 65_536
"""Default hard cap of block hashes kept per route: 4 M characters (about 1 M tokens) of prefixes,
about 10 MB per route (measured in ``benchmarks/memory.py``)."""
MAX_HASHED_BLOCKS = 4_096
"""Blocks hashed per request at most (256 K characters): a longer prompt is matched on its start."""


def chain_blocks(text: str, block_chars: int = BLOCK_CHARS, limit: int = MAX_HASHED_BLOCKS) -> tuple[int, ...]:
    """The chained hashes of ``text``'s blocks (the last one may be short), at most ``limit`` of them.

    ``hash()`` is salted per process: the hashes mean something only inside this process, which is
    where the index lives.
    """
    end = min(len(text), block_chars * limit)
    out: list[int] = []
    h = 0
    for start in range(0, end, block_chars):
        h = hash((h, text[start : start + block_chars]))
        out.append(h)
    return tuple(out)


class PrefixIndex:
    """Per route, the block hashes of the prompts recently sent there; bounded LRU, thread-safe."""

    def __init__(self, max_blocks: int = MAX_BLOCKS_PER_ROUTE) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._lock = forks.lock()
        self._routes: dict[str, OrderedDict[int, None]] = {}

    def depth(self, route: str, blocks: Sequence[int]) -> int:
        """How many leading blocks of ``blocks`` the route's index holds (0: none)."""
        with self._lock:
            return self._depth(self._routes.get(route), blocks)

    def match(self, routes: Iterable[str], blocks: Sequence[int]) -> dict[str, int]:
        """The matched depth of ``blocks`` on each of ``routes``, read under one lock."""
        with self._lock:
            return {route: self._depth(self._routes.get(route), blocks) for route in routes}

    @staticmethod
    def _depth(known: OrderedDict[int, None] | None, blocks: Sequence[int]) -> int:
        if not known or not blocks:
            return 0
        lo, hi = 0, len(blocks)  # invariant: blocks[:lo] all known; blocks[hi:] not (prefix-closed)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if blocks[mid - 1] in known:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def record(self, route: str, blocks: Sequence[int]) -> None:
        """The route was sent a prompt with these blocks: they become its most recent, the oldest go.

        Only the first ``max_blocks`` are kept (a prompt longer than the cap keeps its start).
        Blocks are touched deepest first, so a parent is always more recent than its children.
        """
        with self._lock:
            known = self._routes.get(route)
            if known is None:
                known = self._routes[route] = OrderedDict()
            for h in reversed(blocks[: self.max_blocks]):
                if h in known:
                    known.move_to_end(h)
                else:
                    known[h] = None
            while len(known) > self.max_blocks:
                known.popitem(last=False)

    def forget(self, route: str) -> None:
        """Drop everything known of a route (its server restarted, or its cache is presumed lost)."""
        with self._lock:
            self._routes.pop(route, None)

    def size(self, route: str) -> int:
        """How many block hashes the route's index holds now."""
        with self._lock:
            known = self._routes.get(route)
            return len(known) if known is not None else 0

    def __contains__(self, item: tuple[str, int]) -> bool:
        """``(route, block_hash) in index``: whether that block is indexed for that route (for tests)."""
        route, h = item
        with self._lock:
            known = self._routes.get(route)
            return known is not None and h in known


class Sessions:
    """``session_id`` -> the route that served it last; bounded LRU, thread-safe."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._lock = forks.lock()
        self._routes: OrderedDict[str, str] = OrderedDict()

    def get(self, session: str) -> str | None:
        with self._lock:
            return self._routes.get(session)

    def set(self, session: str, route: str) -> None:
        with self._lock:
            self._routes[session] = route
            self._routes.move_to_end(session)
            while len(self._routes) > self.max_sessions:
                self._routes.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._routes)

"""What each route's server probably has in its prefix cache: chained block hashes in a bounded LRU.

A conversation (each message's role and content, every content part a server caches: see
:func:`conversation_blocks`) is cut into blocks of ``BLOCK_CHARS`` characters; block *i*'s hash
covers block *i* and the hash of block *i - 1*, so one hash stands for the whole prefix up to it
(llm-d's scheme, on characters instead of tokens: the router has no tokenizer, and a prefix of
characters is a prefix of tokens up to the last block). At most ``MAX_HASHED_BLOCKS`` blocks are
hashed, and the conversation is read only as far as they reach: its parts are walked in order and
sliced, never joined or serialised whole, so a 50 MB prompt costs what a 256 K-character one does.
Per route an ``OrderedDict`` keeps the block hashes of prompts recently sent there, least recently
used first, never more than ``max_blocks`` of them (the hard memory cap).

Why blocks and not a character tree: a Python character/radix tree costs a node object per edge and
a walk per character; a block costs one dict entry per 64 characters and one 64-bit xxHash (XXH3) of
a short string, so a 10,000-character prompt is hashed in tens of microseconds (see ``benchmarks/README.md``).
The hash is the same in every process (unlike ``hash()``, salted per process), so replicas sharing
their indexes through Redis (``router/fleet/redis_prefix.py``) mean the same prefix by the same number.

Why the index stays *prefix-closed*: a prompt's blocks are touched leaf first, root last, so a block
is never more recent than its parent and LRU eviction always drops the deepest blocks first, as a
radix tree evicts leaves. Membership along one chain is therefore monotone, and the matched depth is
found by binary search (O(log n) dictionary lookups per route).

One index serves a policy's sync and async callers alike; a lock guards every read and update, and
no operation awaits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import xxhash

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

    Block *i*'s hash is XXH3-64 of its UTF-8 bytes seeded with block *i - 1*'s: unsigned 64-bit, equal
    in every process and on every host (lone surrogates are kept, as ``surrogatepass`` encodes them).
    """
    end = min(len(text), block_chars * limit)
    out: list[int] = []
    h = 0
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, end, block_chars):
        h = digest(text[start : start + block_chars].encode("utf-8", "surrogatepass"), seed=h)
        out.append(h)
    return tuple(out)


PART_SAMPLE_CHARS = 2_048
"""A content part's payload (an image's URL or data URI, audio's base64, any long string in another
part) longer than twice this is hashed as its length, its first and its last this many characters:
equal payloads hash alike and distinct ones apart (they differ in length, head or tail), and a 20 MB
image costs what a 4 K one does, leaving the rest of the cap to the text after it."""
PART_DEPTH = 8
"""How deep the canonical form of an unknown part type goes into nested mappings and lists."""
PIECES_PER_BLOCK = 4
"""The walk of a conversation stops after this many pieces per hashed block (a message's role, its
text, a part's payload and each separator are one each): a prompt of a million tiny parts or
messages is matched on its start, as a long one is."""
SORTED_KEYS = 64
"""A mapping in an unknown part with at most this many keys is read in sorted order (its canonical
form); a larger one in its own order (sorting would read every key, past the cap)."""


def conversation_blocks(
    messages: Iterable[Mapping[str, Any]], block_chars: int = BLOCK_CHARS, limit: int = MAX_HASHED_BLOCKS
) -> tuple[int, ...]:
    """The chained hashes of a conversation's blocks, at most ``limit`` of them: what a server caches of it.

    Per message its role and content, in order: text as it is (a string, or the ``text`` of its text
    parts: the two hash alike), an ``image_url`` part's URL or data URI, an ``input_audio`` part's
    format and data, and any other part type (``video_url``, ``image_embeds``...) in a canonical
    form (keys sorted, JSON-like); payloads longer than ``2 * PART_SAMPLE_CHARS`` by their length,
    head and tail. Distinct multimodal prompts so get distinct blocks and equal ones the same.

    The work is bounded before anything is copied: messages and parts are walked in order, each
    string is sliced to what the cap still holds, and the walk stops once ``block_chars * limit``
    characters are kept or after ``PIECES_PER_BLOCK * limit`` pieces (a million tiny parts), so only
    those characters are joined and hashed. For text-only messages the blocks are ``chain_blocks``
    of each message's ``role + "\\x1f" + text + "\\x1e"``, joined (within that many pieces).
    """
    kept = _Kept(block_chars * limit, PIECES_PER_BLOCK * limit)
    _walk(messages, kept.add)
    return chain_blocks("".join(kept.pieces), block_chars, limit)


def text_blocks(
    pieces: Iterable[str], block_chars: int = BLOCK_CHARS, limit: int = MAX_HASHED_BLOCKS
) -> tuple[int, ...]:
    """``chain_blocks`` of ``pieces`` joined (an embedding batch's inputs), read no further than the cap,
    as :func:`conversation_blocks` reads a conversation."""
    kept = _Kept(block_chars * limit, PIECES_PER_BLOCK * limit)
    for piece in pieces:
        if not kept.add(piece):
            break
    return chain_blocks("".join(kept.pieces), block_chars, limit)


class _Kept:
    """The pieces of a conversation kept for hashing: no more than the cap's characters, nor pieces."""

    __slots__ = ("left", "pieces", "steps")

    def __init__(self, chars: int, steps: int) -> None:
        self.pieces: list[str] = []
        self.left = chars
        self.steps = steps

    def add(self, text: str) -> bool:
        """Keep ``text``, or as much of it as the cap holds; False once the walk must stop."""
        size = len(text)
        if size >= self.left:
            self.pieces.append(text[: self.left])  # the cap: nothing past it is read
            self.left = 0
            return False
        self.pieces.append(text)
        self.left -= size
        self.steps -= 1
        return self.steps > 0


def _walk(messages: Iterable[Mapping[str, Any]], add: Callable[[str], bool]) -> None:
    """Each message's role and content, piece by piece, until ``add`` says stop."""
    for message in messages:
        if not isinstance(message, Mapping):
            if not add("\x1e"):
                return
            continue
        role = message.get("role")
        if not (add(role if isinstance(role, str) else type(role).__name__) and add("\x1f")):
            return
        content = message.get("content")
        if isinstance(content, str):
            if not add(content):
                return
        elif isinstance(content, list | tuple):
            for part in content:
                if not isinstance(part, Mapping):
                    going = add("")  # the server judges it; it still counts a piece
                elif (kind := part.get("type", "text")) == "text":
                    text = part.get("text")
                    going = add(text if isinstance(text, str) else "")  # a text that is not text adds nothing
                else:
                    going = _part(part, kind, add)
                if not going:
                    return
        if not add("\x1e"):
            return


def _part(part: Mapping[str, Any], kind: Any, add: Callable[[str], bool]) -> bool:
    """A content part other than text, as a server caches it; False once the walk must stop."""
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        if isinstance(url, str):
            return add("\x1dimage_url\x1f") and add(_sample(url)) and add("\x1d")
    elif kind == "input_audio":
        audio = part.get("input_audio")
        data, fmt = (audio.get("data"), audio.get("format")) if isinstance(audio, Mapping) else (None, None)
        if isinstance(data, str):
            fmt = _sample(fmt) if isinstance(fmt, str) else ""
            return add("\x1dinput_audio\x1f") and add(fmt) and add("\x1f") and add(_sample(data)) and add("\x1d")
    return add("\x1d") and _canonical(part, 0, add) and add("\x1d")


def _sample(text: str) -> str:
    """``text``, or for a payload longer than ``2 * PART_SAMPLE_CHARS`` its length, head and tail."""
    if len(text) <= 2 * PART_SAMPLE_CHARS:
        return text
    return f"{len(text)}\x1f{text[:PART_SAMPLE_CHARS]}\x1f{text[-PART_SAMPLE_CHARS:]}"


def _key(key: Any) -> str:
    return _sample(key) if isinstance(key, str) else type(key).__name__


def _canonical(value: Any, depth: int, add: Callable[[str], bool]) -> bool:
    """A JSON-like canonical form of ``value`` (keys sorted, long strings sampled); False once the walk must stop."""
    if isinstance(value, str):
        return add('"') and add(_sample(value)) and add('"')
    if isinstance(value, Mapping):
        if depth >= PART_DEPTH:
            return add("{...}")
        keys: Iterable[Any] = sorted(value, key=_key) if len(value) <= SORTED_KEYS else value
        if not add("{"):
            return False
        for key in keys:
            if not (add(_key(key)) and add(":") and _canonical(value[key], depth + 1, add) and add(",")):
                return False
        return add("}")
    if isinstance(value, list | tuple):
        if depth >= PART_DEPTH:
            return add("[...]")
        if not add("["):
            return False
        for item in value:
            if not (_canonical(item, depth + 1, add) and add(",")):
                return False
        return add("]")
    if value is None or isinstance(value, bool | float):
        return add(repr(value))
    if isinstance(value, int):
        return add(repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>")
    return add(f"<{type(value).__name__}>")


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
        self._touch(route, reversed(blocks[: self.max_blocks]))

    def adopt(self, route: str, hashes: Iterable[int]) -> None:
        """Blocks other replicas sent ``route`` (read from the fleet's index, least recent first): each becomes
        the route's most recent in that order, the oldest go. The fleet's index is prefix-closed as this
        one is (a prompt's blocks are pushed deepest first), so adopting keeps this one so."""
        self._touch(route, hashes)

    def _touch(self, route: str, hashes: Iterable[int]) -> None:
        """Make each of ``hashes``, in order, the route's most recent block; then drop the oldest past the cap."""
        with self._lock:
            known = self._routes.get(route)
            if known is None:
                known = self._routes[route] = OrderedDict()
            for h in hashes:
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

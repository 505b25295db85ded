"""``prefix_aware``'s index shared by the fleet: which blocks the replicas sent each route, kept in Redis for all.

One router learns only from the prompts it sent itself; with N replicas each sees 1/N of the traffic,
so a document another replica placed looks new and is placed again, elsewhere. With ``state: {backend:
redis}`` every replica pushes the block hashes it records and reads back everyone's, so each replica's
local index (``balancing/prefix_index.py``) holds the fleet's prefixes, as one router's would. Keys::

    ns:prefix:<B>:<route>  zset    block hash (decimal) -> the fleet's sequence number when it was last sent there
                                   (higher: more recent); at most ``max_blocks`` (the least recent go); expires
                                   ``INDEX_TTL_S`` after its last write (a route nobody uses any more)
    ns:prefix:<B>:tally    hash    "<route>\\x1fhit", "<route>\\x1fsent" -> blocks predicted cached / sent, fleet-wide
    ns:prefix:seq          string  the fleet's sequence

``<B>`` is ``prefix_aware.block_chars``: replicas that cut prompts into blocks of another size (a config
being rolled out) keep apart, since their hashes would never match.

Each sync pushes, inside its one pipeline, the chains this replica recorded since the last one (a
prompt's deepest block first, so its root gets the highest number: the shared index stays prefix-closed
as the local one is) and reads back each route's entries numbered above the newest it has read, which
it adopts in order. Both ways at most ``PAGE`` entries per route per sync (a sync is bounded by
``state.timeout``); a full page has the next sync run at once. A replica that joins reads the fleet's
index from its oldest entry on, a page per route per sync: its first page before it serves. A replica
that finds a route's server restarted (``prefix_aware`` forgets the route) also removes from Redis the
entries it had read, so a replica joining later does not learn a cache that is gone.

The request path never waits on Redis: it appends to an outbox (bounded per route, oldest dropped) that
the sync thread drains. While Redis is down the outbox is kept for the next sync and the local index goes
on learning from this replica's own prompts: the policy degrades to a per-replica index, never to an error.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import forks

if TYPE_CHECKING:
    from ..endpoints.route import Route

INDEX_TTL_S = 3600
"""A route's shared index expires this long after its last write (a route removed from every config)."""
PAGE = 4096
"""Entries a sync pushes, and reads back, per route at most (4096 blocks: 256 K characters of prompts)."""

PREFIX = """
local max, ttl, page = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local function fresh(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
end
fresh(KEYS[1], 'string')
fresh(KEYS[2], 'hash')
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if not seq or seq < 0 or seq ~= math.floor(seq) or seq > 2^52 then redis.call('SET', KEYS[1], 0) end
local at, out = 4, {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local name, since, cut = ARGV[at], ARGV[at + 1], ARGV[at + 2]  -- strings: Lua prints big numbers as 1e+14
  local hit, sent, n = ARGV[at + 3], ARGV[at + 4], tonumber(ARGV[at + 5])
  at = at + 6
  fresh(key, 'zset')
  if tonumber(cut) > 0 then redis.call('ZREMRANGEBYSCORE', key, '-inf', cut) end
  if n > 0 then
    local top = redis.call('INCRBY', KEYS[1], n)
    local args = {}
    for j = 1, n do
      args[#args + 1] = string.format('%d', top - n + j)
      args[#args + 1] = ARGV[at + j - 1]
      if #args >= 512 then redis.call('ZADD', key, unpack(args)) args = {} end
    end
    if #args > 0 then redis.call('ZADD', key, unpack(args)) end
    at = at + n
    redis.call('ZREMRANGEBYRANK', key, 0, -max - 1)
    redis.call('PEXPIRE', key, ttl)
  end
  if hit ~= '0' or sent ~= '0' then
    if type(redis.pcall('HINCRBY', KEYS[2], name .. '\\31hit', hit)) == 'table'
      or type(redis.pcall('HINCRBY', KEYS[2], name .. '\\31sent', sent)) == 'table' then
      redis.call('HDEL', KEYS[2], name .. '\\31hit', name .. '\\31sent')
    end
  end
  local raw = redis.call('ZRANGEBYSCORE', key, '(' .. since, '+inf', 'WITHSCORES', 'LIMIT', 0, page)
  local top = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  local got = {}
  for j = 1, #raw, 2 do  -- only what a replica wrote: a hash of at most 20 digits, numbered by the sequence
    local member, score = raw[j], tonumber(raw[j + 1])
    if #member <= 20 and member:match('^%d+$') and score and score >= 1 and score <= top then
      got[#got + 1] = member
      got[#got + 1] = raw[j + 1]
    else
      redis.call('ZREM', key, member)
    end
  end
  local tally = redis.call('HMGET', KEYS[2], name .. '\\31hit', name .. '\\31sent')
  out[#out + 1] = {got, tally[1] or '0', tally[2] or '0', #raw}
end
return {tonumber(redis.call('GET', KEYS[1]) or '0') or 0, out}
"""
"""Per route in KEYS[3..] (ARGV from 4 on, per route: name, since, cut, hit, sent, n, then n block hashes):
drop the entries numbered ``cut`` or less (the replica found the server restarted), add the n hashes under the
next n numbers of the fleet's sequence (KEYS[1]), keep the newest ARGV[1] and expire the key ARGV[2] ms after
this write, add hit and sent to the fleet's tally (KEYS[2]); reply the sequence and, per route, the first ARGV[3]
entries numbered above ``since``, oldest first, as [hash, number, ...], the fleet's tally and how many were read.
A key of another type (a hand edit) is replaced, a sequence that is not a count is reset (replicas then read
again from the start), a field that is not a number is reset, and an entry no replica could have written (not
a 64-bit decimal, or numbered past the sequence) is removed as it is read."""


class Learner(Protocol):
    """A ``prefix_aware`` policy: it takes the blocks the fleet sent one of its routes into its index."""

    def adopt(self, route: Route, hashes: list[int]) -> None: ...


@dataclass(slots=True)
class Push:
    """What one sync pushes: per route the hashes recorded since the last push, the cut, the tally's growth."""

    hashes: dict[str, list[int]] = field(default_factory=dict)
    cuts: dict[str, int] = field(default_factory=dict)
    tally: dict[str, tuple[int, int]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    """Per route, its generation when the push was taken: a route restarted or gone since is not requeued or read."""


class PrefixShare:
    """This replica's side of the shared index: the outbox the policy fills, and what the sync thread reads back.

    ``policies`` maps a route kind ("chat", "embedding") to the ``prefix_aware`` policy of that kind's pool:
    a route's entries are adopted by the policy of its kind; kinds absent here are not shared.
    """

    def __init__(self, max_blocks: int, policies: Mapping[str, Learner], block_chars: int) -> None:
        self.max_blocks = max_blocks
        self.block_chars = block_chars
        self.policies = dict(policies)
        self._lock = forks.lock()
        self._out: dict[str, deque[int]] = {}
        self._cuts: dict[str, int] = {}
        self._tally: dict[str, tuple[int, int]] = {}
        self._since: dict[str, int] = {}
        """Per route: the newest sequence number read (0: nothing yet, the first read starts at the oldest)."""
        self._generation: dict[str, int] = {}
        """Per route: raised when it restarts or leaves, so an exchange under way then changes nothing about it."""
        self.fleet_tally: dict[str, tuple[int, int]] = {}
        """Per route: (blocks predicted cached, blocks sent) by every replica of the fleet, at the last sync."""
        self.adopted = 0
        """Entries read back from the fleet and adopted since this replica started (its own included)."""

    def renew(self) -> None:
        """In a forked child: a fresh outbox and lock; what was read stays (the index it went into is inherited)."""
        self._lock = forks.lock()
        self._out, self._cuts, self._tally = {}, {}, {}

    # --- the request path (local memory only) -------------------------------------------------------

    def recorded(self, route: str, blocks: Sequence[int], depth: int) -> None:
        """The policy sent ``route`` a prompt of ``blocks``, ``depth`` of them predicted cached: push them."""
        with self._lock:
            out = self._out.get(route)
            if out is None:
                out = self._out[route] = deque(maxlen=self.max_blocks)
            out.extend(reversed(blocks[: self.max_blocks]))
            hit, sent = self._tally.get(route, (0, 0))
            self._tally[route] = (hit + depth, sent + len(blocks))

    def restarted(self, route: str) -> None:
        """``route``'s server restarted (its cache is gone): remove from the fleet's index what this replica had
        read of it, and drop what it had not pushed yet."""
        with self._lock:
            self._generation[route] = self._generation.get(route, 0) + 1
            self._out.pop(route, None)
            since = self._since.get(route, 0)
            if since > 0:
                self._cuts[route] = max(since, self._cuts.get(route, 0))

    def left(self, route: str) -> None:
        """``route`` left this router (other replicas may still use it): nothing more is pushed or read of it here."""
        with self._lock:
            self._generation[route] = self._generation.get(route, 0) + 1
            self._out.pop(route, None)
            self._cuts.pop(route, None)
            self._tally.pop(route, None)
            self._since.pop(route, None)
            self.fleet_tally.pop(route, None)

    # --- the sync thread -----------------------------------------------------------------------------

    def take(self) -> Push:
        """What the next sync pushes: per route the ``PAGE`` oldest hashes not pushed yet (the rest wait for the next
        sync), the cuts and the tally. The caller hands it back with ``requeue`` if the push fails."""
        with self._lock:
            hashes: dict[str, list[int]] = {}
            for route, out in list(self._out.items()):
                hashes[route] = [out.popleft() for _ in range(min(PAGE, len(out)))]
                if not out:
                    del self._out[route]
            push = Push(hashes, self._cuts, self._tally, dict(self._generation))
            self._cuts, self._tally = {}, {}
        return push

    @property
    def pending(self) -> bool:
        """Whether hashes are waiting for a later push (more than a page was recorded)."""
        with self._lock:
            return bool(self._out)

    def requeue(self, push: Push) -> None:
        """A push that did not reach Redis: sent again with the next one, before what was recorded since."""
        with self._lock:
            for route, hashes in push.hashes.items():
                if self._moved_on(route, push):
                    continue
                out = deque(hashes, maxlen=self.max_blocks)
                out.extend(self._out.get(route, ()))
                self._out[route] = out
            for route, cut in push.cuts.items():
                self._cuts[route] = max(cut, self._cuts.get(route, 0))
            for route, (hit, sent) in push.tally.items():
                if self._moved_on(route, push):
                    continue
                more = self._tally.get(route, (0, 0))
                self._tally[route] = (hit + more[0], sent + more[1])

    def _moved_on(self, route: str, push: Push) -> bool:
        """Whether ``route`` restarted or left since ``push`` was taken (under the lock)."""
        return self._generation.get(route, 0) != push.generations.get(route, 0)

    def shared(self, routes: Mapping[str, Route]) -> list[str]:
        """The routes whose index is shared: those of a kind whose pool runs ``prefix_aware``."""
        return [name for name, route in routes.items() if route.kind in self.policies]

    def args(self, ns: str, names: Sequence[str], push: Push) -> tuple[list[str], list[Any]]:
        """PREFIX's keys and arguments for ``names``, pushing ``push``."""
        at = f"{ns}:prefix:{self.block_chars}"
        keys = [f"{ns}:prefix:seq", f"{at}:tally", *(f"{at}:{name}" for name in names)]
        args: list[Any] = [self.max_blocks, INDEX_TTL_S * 1000, PAGE]
        for name in names:
            hashes = push.hashes.get(name, [])
            hit, sent = push.tally.get(name, (0, 0))
            args += [name, self._since.get(name, 0), push.cuts.get(name, 0), hit, sent, len(hashes), *hashes]
        return keys, args

    def apply(self, routes: Mapping[str, Route], names: Sequence[str], reply: object, push: Push) -> bool:
        """Adopt PREFIX's reply for ``names``: each route's new entries into its kind's index, and the fleet's tally.
        A route that restarted or left while the exchange ran is skipped (what it read may predate the restart).

        Whether there is more to exchange at once: a full page was read, or more than a page waits to be pushed."""
        more = self.pending
        if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], list):
            return more
        seq, parts = _number(reply[0]), reply[1]
        if len(parts) != len(names):
            return more
        with self._lock:
            if seq is not None and any(since > seq for since in self._since.values()):
                self._since = {}  # the fleet's sequence started again (Redis lost it): read every route anew
                return True
        for name, part in zip(names, parts, strict=True):
            route = routes.get(name)
            policy = self.policies.get(route.kind) if route is not None else None
            if route is None or policy is None or not isinstance(part, list) or len(part) != 4:
                continue
            if not isinstance(part[0], list):
                continue
            more |= (_number(part[3]) or 0) >= 2 * PAGE
            hashes, newest = _entries(part[0])
            with self._lock:
                if self._moved_on(name, push):
                    continue
                if newest > self._since.get(name, 0):
                    self._since[name] = newest
            if hashes:
                policy.adopt(route, hashes)
                self.adopted += len(hashes)
            hit, sent = _number(part[1]), _number(part[2])
            if hit is not None and sent is not None:
                self.fleet_tally[name] = (hit, sent)
        return more

    def fleet_hit_rates(self) -> dict[str, float | None]:
        """Per route: the share of the blocks the fleet's replicas sent there that their indexes predicted cached."""
        return {name: (hit / sent if sent > 0 else None) for name, (hit, sent) in self.fleet_tally.items()}


def _entries(flat: Iterable[Any]) -> tuple[list[int], int]:
    """A ``[hash, number, ...]`` reply as its hashes (in order) and the highest number; garbage skipped."""
    items = list(flat)
    hashes: list[int] = []
    newest = 0
    for member, score in zip(items[::2], items[1::2], strict=False):
        h, n = _number(member), _number(score)
        if h is None or n is None or not 0 <= h < 1 << 64:
            continue
        hashes.append(h)
        newest = max(newest, n)
    return hashes, newest


def _number(raw: object) -> int | None:
    """An integer Redis sent as bytes, str or int (a score comes as its decimal form); None for anything else."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, bytes | str):
        try:
            return int(raw)
        except ValueError:
            try:
                value = float(raw)  # a score Redis wrote as 1.5e+16
            except ValueError:
                return None
            return int(value) if math.isfinite(value) else None
    return None

"""What a sync reads from Redis, at a cost bounded by this replica's routes, not by what other replicas wrote.

Two scripts (loaded with the others by ``redis_scripts.py``):

``PEERS`` writes this replica's load as a hash (``ns:load:<replica>``, a field per route and ``@at``,
its writer's clock; Redis expires it after ``load_ttl``) and lists the replica in ``ns:replicas``
scored by **Redis's clock** (``TIME``): liveness never compares two hosts' clocks, so a replica whose
clock runs ahead or behind still sees, and is seen by, every other. It returns Redis's time and, per
live peer, only the fields of this replica's routes (``HSTRLEN`` first: a value longer than
``MAX_LOAD_BYTES`` never leaves Redis: its size comes instead, and it is skipped as malformed).

``READ`` reads the fleet hashes (breakers, Retry-After, probes) the same way: this replica's routes'
fields only, none longer than that kind's limit (``redis_records.MAX_BYTES``).

**Bound**: whatever peers wrote (a million fields, 512 MB values, 100,000 replicas), one sync reads
at most ``MAX_REPLICAS`` peers, each a name of at most ``MAX_NAME_CHARS`` bytes, its score and
``R + 1`` values of at most ``MAX_LOAD_BYTES`` (R: this replica's routes; ``peers_bound(R)``: 736 KB
at R = 2, about 100 B a peer in practice), plus ``R`` records per fleet hash of at most 1 KB, 32 B
and 32 KB; Redis does ``O(MAX_REPLICAS x R)`` constant-time lookups for it. Peers past the first
``MAX_REPLICAS`` (by their last refresh) are not read.

**Clocks**: each peer's ``@at`` is its clock when it wrote; Redis's time when it wrote is its score.
A peer (or this replica) whose clock is off Redis's by more than ``CLOCK_SKEW_TOLERANCE_S`` plus
``state.timeout`` (the estimate's error: the time a write takes to reach Redis) is named in one
warning with its skew; its load still counts. Times in breaker, Retry-After and probe records stay
Unix time, so such a clock still shifts them (a breaker opened in the future counts as opened now;
a probe time more than a minute ahead is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .redis_records import MALFORMED, MAX_LOAD_BYTES, MAX_NAME_CHARS, read_load, read_time
from .state import Elsewhere

log = logging.getLogger("anorag_integrations.router")

PEERS = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl, n = tonumber(ARGV[2]), tonumber(ARGV[7])
redis.call('DEL', KEYS[2])
if n > 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 8, 7 + 2 * n))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if type(redis.pcall('ZADD', KEYS[1], now, ARGV[1])) == 'table' then
  redis.call('DEL', KEYS[1])
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
local oldest, newest = now - ttl / 1000, now + 1
redis.pcall('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. oldest)
redis.pcall('ZREMRANGEBYSCORE', KEYS[1], '(' .. newest, '+inf')
local live = redis.pcall('ZRANGEBYSCORE', KEYS[1], oldest, newest, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {t[1] .. '.' .. string.format('%06d', tonumber(t[2]))}
if type(live) ~= 'table' or live.err then return out end
local longest, longest_name = tonumber(ARGV[5]), tonumber(ARGV[6])
for i = 1, #live, 2 do
  local peer = live[i]
  if peer ~= ARGV[1] and #peer <= longest_name then
    local key = ARGV[3] .. peer
    local row = {peer, live[i + 1]}
    for j = 8 + 2 * n, #ARGV do
      local size = redis.pcall('HSTRLEN', key, ARGV[j])
      if type(size) ~= 'number' or size == 0 then row[#row + 1] = false
      elseif size > longest then row[#row + 1] = size
      else row[#row + 1] = redis.call('HGET', key, ARGV[j]) end
    end
    out[#out + 1] = row
  end
end
return out
"""
"""Write this replica's load (KEYS[2]: the ARGV[7] field/value pairs from ARGV[8], expiring in ARGV[2] ms)
and liveness (KEYS[1], the replicas zset: ARGV[1] scored by Redis's TIME; scores older than the TTL or
later than a second from now are dropped, a replicas key of another type is replaced). Return Redis's
time, then per other live replica (at most ARGV[4], names of at most ARGV[6] bytes; keys ARGV[3] ..
replica): its name, its score and the fields after the pairs (false where absent or of another type, the
size where longer than ARGV[5] bytes)."""

READ = """
local longest = {}
for i = 1, #KEYS do longest[i] = tonumber(ARGV[i]) end
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.pcall('TYPE', key)
  kind = type(kind) == 'table' and kind.ok or ''
  if kind == 'hash' or kind == 'none' then
    local values = {}
    for j = #KEYS + 1, #ARGV do
      local size = kind == 'hash' and redis.call('HSTRLEN', key, ARGV[j]) or 0
      if size == 0 then values[#values + 1] = false
      elseif size > longest[i] then values[#values + 1] = size
      else values[#values + 1] = redis.call('HGET', key, ARGV[j]) end
    end
    out[i] = values
  else
    out[i] = -1
  end
end
return out
"""
"""Per hash in KEYS (at most ARGV[i] bytes a value), the fields named after the limits: false where absent, the
size where longer; -1 for a key of another type (the caller replaces it)."""

MAX_REPLICAS = 1000
"""Most other replicas whose loads one sync reads."""
AT_FIELD = "@at"
"""The load hash's field holding its writer's clock (no route is named so: route names are ``[A-Za-z0-9_.:-]``)."""
CLOCK_SKEW_TOLERANCE_S = 1.0
"""How far a replica's clock may be off Redis's (beyond ``state.timeout``) before a warning names it."""
MAX_SKEW_WARNINGS = 16
"""Replicas named in skew warnings at most per router (later ones are logged at debug level)."""


def peers_bound(routes: int) -> int:
    """The most bytes of peers' names, scores and loads one sync reads for a replica of ``routes`` routes."""
    return MAX_REPLICAS * (MAX_NAME_CHARS + 32 + (routes + 1) * MAX_LOAD_BYTES)


def peers_args(me: str, ttl_s: float, prefix: str, load: list[str], names: Sequence[str]) -> list[Any]:
    """``PEERS``'s arguments: this replica, its load TTL, the load keys' prefix, its load fields and the routes."""
    fields = [AT_FIELD, *names]
    return [me, int(ttl_s * 1000), prefix, MAX_REPLICAS, MAX_LOAD_BYTES, MAX_NAME_CHARS, len(load) // 2, *load, *fields]


class Clocks:
    """Names, once each, the replicas whose clock is off Redis's by more than the tolerance."""

    def __init__(self, timeout_s: float) -> None:
        self.tolerance_s = CLOCK_SKEW_TOLERANCE_S + timeout_s
        self._warned: set[str] = set()

    def renew(self) -> None:
        """In a forked child: a replica that has warned about nothing yet."""
        self._warned = set()

    def check(self, replica: str, skew_s: float, error_s: float = 0.0) -> None:
        """``replica``'s clock runs ``skew_s`` ahead of Redis's (behind if negative), give or take ``error_s``."""
        if abs(skew_s) <= self.tolerance_s + error_s or replica in self._warned:
            return
        if len(self._warned) >= MAX_SKEW_WARNINGS:
            log.debug("shared state: replica %s's clock is %+.1f s off Redis's", replica, skew_s)
            return
        self._warned.add(replica)
        log.warning(
            "shared state: replica %s's clock is %.1f s %s Redis's (tolerance %.1f s); its load still counts, but "
            "the times it shares (breakers, Retry-After, probes) are off by as much: synchronise its clock (NTP)",
            replica, abs(skew_s), "ahead of" if skew_s > 0 else "behind", self.tolerance_s,
        )  # fmt: skip


def redis_time(reply: object) -> float | None:
    """Redis's clock from a ``PEERS`` reply, or None when the reply is not one."""
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes | str):
        try:
            return float(reply[0])
        except ValueError:
            return None
    return None


def read_peers(
    reply: object, names: Sequence[str], clocks: Clocks, skipped: Callable[[str, str, BaseException], None]
) -> dict[str, Elsewhere]:
    """The other live replicas' loads summed per route (``PEERS``'s reply); a malformed value goes to ``skipped``."""
    out = {name: Elsewhere() for name in names}
    width = len(names) + 3
    for row in reply[1:] if isinstance(reply, list) else ():
        if not (isinstance(row, list) and len(row) == width and isinstance(row[0], bytes)):
            continue
        skew = _skew(row[2], row[1])
        if skew is not None:
            clocks.check(row[0].decode(errors="replace"), skew)
        for name, raw in zip(names, row[3:], strict=True):
            if raw is None:
                continue
            try:
                count, latency = read_load(raw)
            except MALFORMED as exc:
                skipped("load", name, exc)
                continue
            elsewhere = out[name]
            elsewhere.in_flight += count
            if latency is not None:
                elsewhere.latency_sum += latency
                elsewhere.latency_n += 1
    return out


def _skew(at: object, score: object) -> float | None:
    """How far a peer's clock (``at``, from its load) ran ahead of Redis's (``score``); None if it wrote none."""
    try:
        return read_time(at) - float(score)  # type: ignore[arg-type]
    except MALFORMED:
        return None  # an older replica writes no clock

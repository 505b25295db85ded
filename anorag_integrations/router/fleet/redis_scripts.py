"""The Lua scripts a sync (``redis_sync.py``) runs in Redis, loaded once per connection and called by SHA.

Each script does server-side what would otherwise be several commands, so one sync is one pipeline
(one round trip) whatever the number of routes and replicas. They are called with ``EVALSHA`` from
SHAs loaded at connect time: redis-py's ``Script`` objects would send ``SCRIPT EXISTS`` before every
pipeline (one more round trip per sync). A Redis that forgot them (``SCRIPT FLUSH``, a failover)
answers ``NOSCRIPT``; the caller loads them again and repeats its exchange.

Peers' load keys are named inside ``PEERS``, which Redis Cluster does not allow; one Redis (or a
primary with replicas, or Valkey) is what this backend supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from .redis_peers import PEERS, READ
from .redis_prefix import PREFIX

CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.pcall('GET', key)
  if holder == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) out[i] = 1
  elseif type(holder) ~= 'string' or redis.call('PTTL', key) < 0 then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) out[i] = 1
  else out[i] = 0 end
end
return out
"""
"""Take each lock in KEYS for ARGV[1] with a TTL of ARGV[2] ms, or renew it when held already: 1 or 0 per key.
A key that is not a lock (another type, or no TTL: every lock has one) is taken over, so garbage cannot
leave a route without a prober or a half-open trial."""

RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.pcall('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"""
"""Drop the locks in KEYS that ARGV[1] holds (never one another replica took since)."""

HEDGE = """
local raw = redis.pcall('GET', KEYS[1])
local tokens = 1
if raw then tokens = type(raw) == 'string' and tonumber(raw) end
if not tokens or tokens ~= tokens or tokens < 0 then tokens = 0 end
tokens = math.min(tonumber(ARGV[2]), tokens + tonumber(ARGV[1]))
local take = 0
if ARGV[3] == '1' and tokens >= 1 then take = 1 tokens = tokens - 1 end
redis.call('SET', KEYS[1], tostring(tokens))
return take
"""
"""Add a replica's earnings (ARGV[1]) to the fleet's hedge bucket (at most ARGV[2] tokens); hand it one
token when it wants one (ARGV[3] == '1') and there is one. A bucket that is not a number starts empty."""

BUDGET = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local now = tonumber(redis.call('TIME')[1])
local size = tonumber(ARGV[3])
local key = KEYS[1] .. ':' .. now
if ARGV[1] ~= '0' or ARGV[2] ~= '0' then
  if type(redis.pcall('HINCRBY', key, 'calls', ARGV[1])) == 'table'
    or type(redis.pcall('HINCRBY', key, 'retries', ARGV[2])) == 'table' then
    redis.call('DEL', key)
    redis.call('HSET', key, 'calls', ARGV[1], 'retries', ARGV[2])
  end
  redis.call('EXPIRE', key, size + 2)
end
local sums = {0, 0}
for second = now - size + 1, now do
  local row = redis.pcall('HMGET', KEYS[1] .. ':' .. second, 'calls', 'retries')
  if type(row) == 'table' and not row.err then
    for i = 1, 2 do
      local n = tonumber(row[i])
      if n and n > 0 then sums[i] = sums[i] + n end
    end
  end
end
return {math.min(sums[1], 1e15), math.min(sums[2], 1e15)}
"""
"""Add a replica's retry-budget counts since its last sync (ARGV[1] calls, ARGV[2] retries) to the bucket of
Redis's current second (KEYS[1] .. ':' .. TIME's seconds, a hash that expires ARGV[3] + 2 s later), and return
the fleet's {calls, retries} summed over the buckets of the last ARGV[3] seconds, this one's included. The
seconds are Redis's, so replicas whose clocks differ count into the same buckets. A bucket that is not a hash
of integers is replaced; a field that is not a positive number counts as 0."""

SOURCES = {
    "claim": CLAIM,
    "release": RELEASE,
    "hedge": HEDGE,
    "budget": BUDGET,
    "peers": PEERS,
    "read": READ,
    "prefix": PREFIX,
}


@dataclass(slots=True)
class Scripts:
    """The scripts' SHAs on one connection, and pipeline calls that use them."""

    shas: dict[str, str]

    @classmethod
    def load(cls, client: redis.Redis) -> Scripts:
        """Load every script into ``client``'s Redis (one round trip)."""
        pipe = client.pipeline(transaction=False)
        for source in SOURCES.values():
            pipe.script_load(source)
        shas = [sha.decode() if isinstance(sha, bytes) else str(sha) for sha in pipe.execute()]
        return cls(dict(zip(SOURCES, shas, strict=True)))

    def call(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> int:
        """Queue script ``name`` on the pipeline ``pipe``; the index of its reply."""
        pipe.evalsha(self.shas[name], len(keys), *keys, *args)
        return len(pipe) - 1


def claimed(reply: object, n: int) -> list[bool]:
    """A CLAIM reply as one flag per lock; a failed call holds none."""
    if isinstance(reply, list) and len(reply) == n:
        return [flag == 1 for flag in reply]
    return [False] * n


def failure(replies: list[Any], at: list[int]) -> Exception | None:
    """The first error among the scripts' replies (at indices ``at``): Redis refused them (NOPERM, READONLY, OOM...).

    The scripts tolerate any content, so an error here is Redis itself saying no, which leaves the
    fleet without probers or trials as surely as an outage: the caller treats it as one.
    """
    return next((reply for i in at if isinstance(reply := replies[i], Exception)), None)


def forgotten(replies: list[Any]) -> bool:
    """Whether Redis answered ``NOSCRIPT`` to any of ``replies`` (it lost the scripts: load them again)."""
    return any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies)

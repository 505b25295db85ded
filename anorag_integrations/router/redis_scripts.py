"""The Lua scripts ``redis_state.py`` runs in Redis, loaded once per connection and called by SHA.

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

CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) out[i] = 1
  elseif not holder then redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) out[i] = 1
  else out[i] = 0 end
end
return out
"""
"""Take each lock in KEYS for ARGV[1] with a TTL of ARGV[2] ms, or renew it when held already: 1 or 0 per key."""

RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"""
"""Drop the locks in KEYS that ARGV[1] holds (never one another replica took since)."""

HEDGE = """
local tokens = tonumber(redis.call('GET', KEYS[1]) or '1')
if not tokens or tokens ~= tokens or tokens < 0 then tokens = 0 end
tokens = math.min(tonumber(ARGV[2]), tokens + tonumber(ARGV[1]))
local take = 0
if ARGV[3] == '1' and tokens >= 1 then take = 1 tokens = tokens - 1 end
redis.call('SET', KEYS[1], tostring(tokens))
return take
"""
"""Add a replica's earnings (ARGV[1]) to the fleet's hedge bucket (at most ARGV[2] tokens); hand it one
token when it wants one (ARGV[3] == '1') and there is one."""

PEERS = """
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.pcall('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.pcall('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local live = redis.pcall('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
local out = {}
if type(live) ~= 'table' or live.err then return out end
for _, peer in ipairs(live) do
  if peer ~= ARGV[1] then
    local load = redis.pcall('GET', ARGV[6] .. peer)
    if type(load) == 'string' then out[#out + 1] = load end
  end
end
return out
"""
"""Publish this replica's load (KEYS[2] = ARGV[4], expiring in ARGV[5] ms) and liveness (KEYS[1], the
replicas zset: ARGV[1] at ARGV[2]; those older than ARGV[3] dropped); return the other live replicas'
loads (keys ARGV[6] .. replica). A key of the wrong type reads as absent, never as an error."""

SOURCES = {"claim": CLAIM, "release": RELEASE, "hedge": HEDGE, "peers": PEERS}


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

    def call(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue script ``name`` on ``pipe`` (a pipeline, or a client for an immediate call)."""
        pipe.evalsha(self.shas[name], len(keys), *keys, *args)


def forgotten(replies: list[Any]) -> bool:
    """Whether Redis answered ``NOSCRIPT`` to any of ``replies`` (it lost the scripts: load them again)."""
    return any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies)

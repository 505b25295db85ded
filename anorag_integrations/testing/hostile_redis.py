"""Hostile shared state: what a broken, older or malicious replica could leave in Redis, each with what it means.

A router sharing state through Redis must skip every record here (never adopt it, never raise on it
later, warn once per kind) and go on sharing the rest; the floods must not make a sync cost more than
this replica's routes need. ``tests/test_shared_state_records.py`` runs them all; to run them against a
deployment, plant them in a namespace of its own (a staging fleet) and watch its routers::

    client = redis.Redis.from_url(url)
    for record in HOSTILE_RECORDS:
        plant(client, "staging", "my-route", record)
    flood(client, "staging", ["my-route"])      # 1,000 peers of 64 KB each
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis

Kind = Literal["probes", "breakers", "throttle", "load", "message"]

NOW = object()
"""Stands for the time the record is planted (a probe must be recent to outrank the route's own)."""
HOSTILE = "hostile-replica"
"""The replica name hostile records claim."""


@dataclass(frozen=True)
class HostileRecord:
    """One record: where it goes (``kind``), its fields (or raw text) and what it stands for."""

    kind: Kind
    value: Mapping[str, Any] | Sequence[Any] | str
    meaning: str = field(default="", compare=False)

    def text(self, now: float) -> str:
        """The record as Redis holds it, with ``NOW`` filled in."""
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, Mapping):
            return json.dumps({key: now if value is NOW else value for key, value in self.value.items()})
        return json.dumps(list(self.value))


def _probe(meaning: str, **fields: Any) -> HostileRecord:
    base: dict[str, Any] = {"by": HOSTILE, "healthy": True, "latency_ms": 3.0, "models": ["m"], "checked_at": NOW}
    return HostileRecord("probes", {**base, **fields}, meaning)


def _breaker(meaning: str, **fields: Any) -> HostileRecord:
    return HostileRecord("breakers", {"open": True, "at": NOW, "by": HOSTILE, "n": 1, **fields}, meaning)


def _message(meaning: str, record: HostileRecord | None = None, **fields: Any) -> HostileRecord:
    news = {"by": HOSTILE, "breakers": {"{route}": record.text(0.0)} if record else {}, **fields}
    return HostileRecord("message", json.dumps(news), meaning)


HOSTILE_PROBES: tuple[HostileRecord, ...] = (
    _probe("a latency as a string: the Prometheus scrape divided it", latency_ms="12.5"),
    _probe("a negative latency", latency_ms=-1.0),
    _probe("a latency that is not a number", latency_ms=math.nan),
    _probe("models as a number: health() and the CLI iterate it", models=5),
    _probe("a model that is not a name", models=["m", 5]),
    _probe("more models than any server lists", models=[f"m{i}" for i in range(1000)]),
    _probe("a model name of 10,000 characters", models=["m" * 10_000]),
    _probe("a context window of -1: every embed() refused every input", max_model_len=-1),
    _probe("a context window as a string", max_model_len="4096"),
    _probe("a context window that is not a whole number", max_model_len=1.5),
    _probe("a context window past any model's", max_model_len=10**30),
    _probe("healthy as a string", healthy="yes"),
    _probe("healthy as a number", healthy=1),
    _probe("an error that is not text", error=5),
    _probe("a probe time as a string", checked_at="now"),
    _probe("a probe time from the far future: it would outrank every real probe", checked_at=1e18),
    _probe("a probe time before 1970", checked_at=-5.0),
    _probe("a prober that is not a name", by=5),
    _probe("a prober of no name", by=""),
    HostileRecord("probes", {"healthy": True, "checked_at": NOW}, "no prober named"),
    HostileRecord("probes", "not json", "not JSON"),
    HostileRecord("probes", "[" * 100_000, "JSON nested past the recursion limit"),
    HostileRecord("probes", [1, 2, 3], "JSON, but not an object"),
    _probe("a record of 1 MB (a valid one is under 32 KB)", error="e" * 1_000_000),
)
"""Probe records (``ns:probes``): each is a recent, healthy-looking probe with one field wrong."""

HOSTILE_BREAKERS: tuple[HostileRecord, ...] = (
    _breaker('"false" as a string: truthy, so it opened the breaker', open="false"),
    _breaker("open as a number", open=1),
    _breaker("a time as a string", at="0"),
    _breaker("a time that is not a number", at=math.inf),
    _breaker("a sequence number that is not whole", n=1.5),
    _breaker("a sequence number as a string", n="7"),
    _breaker("a replica that is not a name", by=["x"]),
    HostileRecord("breakers", "not json", "not JSON"),
    HostileRecord("breakers", json.dumps({"open": True, "pad": "x" * 10_000}), "10 KB (a record is about 100 B)"),
)
"""Breaker records (``ns:breakers``, and the news pub/sub messages carry)."""

HOSTILE_THROTTLES: tuple[HostileRecord, ...] = (
    HostileRecord("throttle", "soon", "not a time"),
    HostileRecord("throttle", "inf", "an endless Retry-After"),
    HostileRecord("throttle", "nan", "not a number"),
    HostileRecord("throttle", "1_000", "a Python literal, not a number"),
    HostileRecord("throttle", "0x10", "hexadecimal"),
    HostileRecord("throttle", "9" * 100, "100 digits (a time is about 18 characters)"),
)
"""Retry-After records (``ns:throttle``): Unix times."""

HOSTILE_LOADS: tuple[HostileRecord, ...] = (
    HostileRecord("load", ["3", 0.1], "a count as a string"),
    HostileRecord("load", [-1, 0.1], "a negative count: it would hide real load"),
    HostileRecord("load", [True, 0.1], "a count as a boolean"),
    HostileRecord("load", [3.5, 0.1], "a count that is not whole"),
    HostileRecord("load", [10**9, 0.1], "a billion requests in flight"),
    HostileRecord("load", [3, -0.1], "a negative latency"),
    HostileRecord("load", [3, "fast"], "a latency as a string"),
    HostileRecord("load", [3], "a count without a latency"),
    HostileRecord("load", "[3, 1e400]", "a latency that overflows to infinity"),
    HostileRecord("load", '{"n": 3}', "an object, not a pair"),
    HostileRecord("load", "[" + "1, " * 1000 + "1]", "4 KB (a value is about 30 B)"),
)
"""Per-route values of a peer's load (``ns:load:<replica>``, a hash: route -> [in flight, latency])."""

HOSTILE_MESSAGES: tuple[HostileRecord, ...] = (
    _message("a breaker record inside that opens by a truthy string", _breaker("", open="false")),
    _message("news that is not an object", breakers=[1]),
    _message("a sender that is not a name", by=5),
    HostileRecord("message", "x" * 100_000, "100 KB of text"),
    HostileRecord("message", "[" * 100_000, "JSON nested past the recursion limit"),
)
"""Messages on ``ns:changed`` (``{route}`` in them stands for the route they target)."""

HOSTILE_RECORDS: tuple[HostileRecord, ...] = (
    *HOSTILE_PROBES,
    *HOSTILE_BREAKERS,
    *HOSTILE_THROTTLES,
    *HOSTILE_LOADS,
    *HOSTILE_MESSAGES,
)
"""Every hostile record of the corpus."""


def redis_time(client: redis.Redis) -> float:
    """Redis's clock (what replicas' liveness is measured by)."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def plant(client: redis.Redis, namespace: str, route: str, record: HostileRecord, peer: str = HOSTILE) -> None:
    """Write ``record`` where a replica of the fleet ``namespace`` reads it for ``route`` (a load: as ``peer``'s)."""
    ns, now = namespace, redis_time(client)
    text = record.text(now)
    if record.kind == "load":
        add_peer(client, namespace, peer, {route: text})
    elif record.kind == "message":
        client.publish(f"{ns}:changed", text.replace("{route}", route))
    else:
        client.hset(f"{ns}:{record.kind}", route, text)


def add_peer(
    client: redis.Redis, namespace: str, peer: str, fields: Mapping[str, str], ttl_s: float = 60.0, skew_s: float = 0.0
) -> None:
    """A live peer in ``namespace`` whose load hash holds ``fields`` and whose clock runs ``skew_s`` ahead."""
    now = redis_time(client)
    pipe = client.pipeline(transaction=False)
    pipe.delete(f"{namespace}:load:{peer}")
    record: dict[Any, Any] = {**fields, "@at": repr(now + skew_s)}
    pipe.hset(f"{namespace}:load:{peer}", mapping=record)
    pipe.pexpire(f"{namespace}:load:{peer}", int(ttl_s * 1000))
    pipe.zadd(f"{namespace}:replicas", {peer: now})
    pipe.execute()


def flood(client: redis.Redis, namespace: str, routes: Sequence[str], peers: int = 1000, size: int = 65_536) -> None:
    """``peers`` live peers, each writing ``size`` bytes: half as the string JSON an older replica wrote (with the
    routes' entries padded), half as load hashes with a ``size``-byte value per route and 1,000 fields besides.

    Every cap a replica applies per record holds or is just met; what it must not do is read them all.
    """
    now = redis_time(client)
    pipe = client.pipeline(transaction=False)
    for i in range(peers):
        peer, key = f"flood{i}", f"{namespace}:load:flood{i}"
        pipe.delete(key)
        if i % 2:
            padded = {route: [1, 0.1] for route in routes}
            text = json.dumps({**padded, "pad": "x" * size})[:size]
            pipe.set(key, text, px=60_000)
        else:
            pipe.hset(key, mapping={**{route: "[1, 0.1]" + " " * size for route in routes}, "@at": repr(now)})
            pipe.hset(key, mapping={f"other{j}": "[1, 0.1]" for j in range(1000)})
            pipe.pexpire(key, 60_000)
        pipe.zadd(f"{namespace}:replicas", {peer: now})
        if i % 50 == 49:
            pipe.execute()
    pipe.execute()

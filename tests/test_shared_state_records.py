"""What replicas read from Redis is checked as strictly as config, costs what this replica's routes need, and
never depends on two hosts' clocks agreeing (issue 25: items 3, 8 and 14).

The hostile records are the corpus users can run too (``anorag_integrations.testing.hostile_redis``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.endpoints.probe import ProbeResult
from anorag_integrations.router.fleet.redis_peers import MAX_SKEW_WARNINGS, Clocks, peers_bound, read_peers
from anorag_integrations.router.fleet.redis_records import (
    MALFORMED,
    MAX_CLOCK_AHEAD_S,
    MAX_CONTEXT,
    BreakerRecord,
    probe_record,
    read_load,
    read_message,
    read_probe,
    read_throttle,
)
from anorag_integrations.testing import Fault, FaultServer, RedisServer
from anorag_integrations.testing.hostile_redis import (
    HOSTILE_BREAKERS,
    HOSTILE_LOADS,
    HOSTILE_MESSAGES,
    HOSTILE_PROBES,
    HOSTILE_RECORDS,
    HOSTILE_THROTTLES,
    HostileRecord,
    add_peer,
    flood,
    plant,
)

from .fleet import MODEL, ROOT, USER, Replica, connected, state_document, wait_for

LOG = "anorag_integrations.router"


@pytest.fixture
def two() -> Iterator[dict[str, FaultServer]]:
    """An embedding route first (``e0``), a chat route second (``c1``): a sync reads them in this order."""
    with FaultServer(MODEL) as e0, FaultServer(MODEL, reply="from c1") as c1:
        yield {"e0": e0, "c1": c1}


def config_for(servers: dict[str, FaultServer], url: str, namespace: str, **llm: Any) -> Any:
    document = state_document(servers, url, namespace, **llm)
    if "e0" in document["llm"]["routes"]:
        document["llm"]["routes"]["e0"]["kind"] = "embedding"
    return config_from_dict(document, env={})


def read(record: HostileRecord) -> object:
    """``record`` through the reader a replica uses for its kind (a message: and the breaker news it carries)."""
    text = record.text(time.time()).replace("{route}", "e0")
    if record.kind == "probes":
        return read_probe(text)
    if record.kind == "breakers":
        return BreakerRecord.loads(text)
    if record.kind == "throttle":
        return read_throttle(text, 30.0)
    if record.kind == "load":
        return read_load(text)
    _, news = read_message(text)
    return [BreakerRecord.loads(raw) for raw in news.values()]


def malformed_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "malformed" in r.getMessage()]


# --- the readers, one record at a time -----------------------------------------------------------------


@pytest.mark.parametrize("record", HOSTILE_RECORDS, ids=lambda r: f"{r.kind}: {r.meaning}")
def test_every_hostile_record_is_refused_by_its_reader(record: HostileRecord) -> None:
    with pytest.raises(MALFORMED):
        read(record)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
PROBE_FIELDS = ("by", "healthy", "latency_ms", "models", "max_model_len", "error", "checked_at")


@settings(max_examples=300, deadline=None)
@given(record=st.fixed_dictionaries({}, optional={name: JSON for name in PROBE_FIELDS}))
def test_whatever_a_probe_record_holds_what_is_adopted_is_well_typed(record: dict[str, Any]) -> None:
    """The invariant behind item 3: a probe result read from Redis is either refused or one a probe could make."""
    try:
        by, result = read_probe(json.dumps(record))
    except MALFORMED:
        return
    assert isinstance(by, str) and by
    assert result.healthy is None or type(result.healthy) is bool
    assert result.latency_ms is None or (type(result.latency_ms) is float and 0 <= result.latency_ms < math.inf)
    assert type(result.models) is list and all(type(m) is str for m in result.models)
    assert result.max_model_len is None or (type(result.max_model_len) is int and result.max_model_len > 0)
    assert result.error is None or type(result.error) is str
    at = result.checked_at
    assert at is None or (type(at) is float and 0 <= at <= time.time() + MAX_CLOCK_AHEAD_S)


@settings(max_examples=100, deadline=None)
@given(
    models=st.lists(st.text(max_size=300), max_size=400),
    error=st.none() | st.text(max_size=5000),
    max_model_len=st.none() | st.integers(-(2**40), 2**40),
    latency_ms=st.none() | st.floats(0, 1e6),
)
def test_a_probe_record_this_replica_writes_always_reads_back(
    models: list[str], error: str | None, max_model_len: int | None, latency_ms: float | None
) -> None:
    """What a replica writes is trimmed to what the others accept: a server listing 400 models, a long error or a
    context window of -1 never makes its own records unreadable."""
    result = ProbeResult(True, latency_ms, models, max_model_len, error, time.time())
    by, back = read_probe(probe_record(result, "me"))
    assert by == "me" and back.checked_at == result.checked_at and back.latency_ms == latency_ms
    assert back.models == [m for m in models if len(m) <= 256][: len(back.models)]
    assert back.error == (error if error is None else error[:2000])
    assert back.max_model_len == (max_model_len if max_model_len and 0 < max_model_len <= MAX_CONTEXT else None)


VALUE = st.none() | st.integers() | st.binary(max_size=12) | st.sampled_from([b"[2, 0.5]", b"[1, null]", b"1e400"])


@settings(max_examples=300, deadline=None)
@given(reply=st.lists(st.one_of(st.lists(VALUE, min_size=5, max_size=5), VALUE), max_size=6))
def test_whatever_the_peers_reply_holds_only_plausible_loads_are_counted(reply: list[Any]) -> None:
    """A ``PEERS`` reply of any shape: reading it never raises, and only well-formed values are counted."""
    rows = [row for row in reply if isinstance(row, list)]
    for row in rows:
        row[0] = row[0] if isinstance(row[0], bytes) else b"peer"
    counted = read_peers([b"0", *reply], ["a", "b"], Clocks(0.25), lambda *_: None)
    plausible = [load for row in rows for v in row[3:] if v is not None and (load := _load_or_none(v))]
    assert sum(e.in_flight for e in counted.values()) == sum(count for count, _ in plausible)
    assert sum(e.latency_n for e in counted.values()) == sum(latency is not None for _, latency in plausible)


def _load_or_none(raw: object) -> tuple[int, float | None] | None:
    try:
        return read_load(raw)
    except MALFORMED:
        return None


def test_a_skewed_clock_is_named_once_per_replica_and_the_warnings_are_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger=LOG)
    clocks = Clocks(timeout_s=0.25)
    for _ in range(3):
        clocks.check("host-a:1:app:0001", 3.04)
        clocks.check("host-b:2:app:0002", -0.9)  # within the tolerance
    assert [r.getMessage()[:60] for r in caplog.records] == [
        "shared state: replica host-a:1:app:0001's clock is 3.0 s ahe"
    ]
    for i in range(100):
        clocks.check(f"hostile{i}", 1e9)
    assert len(caplog.records) == MAX_SKEW_WARNINGS


# --- a router over a Redis holding them ----------------------------------------------------------------


def test_hostile_records_in_redis_are_never_adopted_and_health_metrics_and_embed_go_on(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 3: each round plants a hostile probe, breaker and Retry-After record for ``e0`` and a valid probe for
    ``c1``; once ``c1``'s is adopted the same read has passed over ``e0``'s, which must have left it untouched."""
    import redis

    caplog.set_level("INFO", logger=LOG)
    client = redis.Redis.from_url(redis_server.url)
    router = Router(config_for(two, redis_server.url, namespace), start_prober=False)
    registry = CollectorRegistry()
    router.register_metrics(registry)
    e0, c1 = router.routes["e0"], router.routes["c1"]
    try:
        connected(router)
        rounds = max(len(HOSTILE_PROBES), len(HOSTILE_BREAKERS), len(HOSTILE_THROTTLES))
        for i in range(rounds):
            for corpus in (HOSTILE_PROBES, HOSTILE_BREAKERS, HOSTILE_THROTTLES):
                plant(client, namespace, "e0", corpus[i % len(corpus)])
            marker = time.time() - 30 + i
            client.hset(
                f"{namespace}:probes", "c1", json.dumps({"by": "marker", "healthy": True, "checked_at": marker})
            )
            wait_for(lambda m=marker: c1.probe_result.checked_at == m, 5, f"round {i} read")  # type: ignore[misc]
            assert e0.probe_result.checked_at is None, f"round {i}: adopted {e0.probe_result}"
            assert e0.breaker.state is BreakerState.CLOSED and e0.not_before <= time.monotonic()
            health = router.health(probe=False)
            assert health["e0"]["max_model_len"] is None and health["e0"]["latency_ms"] is None
            generate_latest(registry)
        assert len(router.embed(["one", "two"]).data) == 2
        warnings = malformed_warnings(caplog)
        for kind in ("probes", "breakers", "throttle"):
            assert len([w for w in warnings if f"malformed {kind} record" in w]) == 1, warnings
        shown = " ".join(warnings)
        assert f":{redis_server.port}" not in shown and redis_server.password not in shown  # type: ignore[operator]
    finally:
        router.close()
        client.close()


def test_hostile_messages_on_the_channel_are_never_adopted(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A message carrying ``"open": "false"`` opened the breaker (a truthy string); the valid message published
    after them all is handled after them, so once it opened ``c1`` they have all been read."""
    import redis

    caplog.set_level("INFO", logger=LOG)
    client = redis.Redis.from_url(redis_server.url)
    router = Router(config_for(two, redis_server.url, namespace), start_prober=False)
    try:
        connected(router)
        channel = f"{namespace}:changed"  # published before the router listens, a message would be lost
        wait_for(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1, 5, "the router listens")
        for record in HOSTILE_MESSAGES:
            plant(client, namespace, "e0", record)
        news = {"c1": BreakerRecord(True, time.time(), "marker", 1).dumps()}
        client.publish(f"{namespace}:changed", json.dumps({"by": "marker", "breakers": news}))
        wait_for(lambda: router.routes["c1"].breaker.state is BreakerState.OPEN, 5, "the valid news adopted")
        assert router.routes["e0"].breaker.state is BreakerState.CLOSED
        warnings = malformed_warnings(caplog)  # one per kind: the messages, and the breaker record inside the first
        assert len(warnings) == 2 and "malformed message record" in warnings[-1], warnings
        assert "malformed breakers record for route 'e0'" in warnings[0], warnings
    finally:
        router.close()
        client.close()


def test_a_sync_reads_what_this_replicas_routes_need_however_much_peers_wrote(
    namespace: str, two: dict[str, FaultServer]
) -> None:
    """Item 8: 1,000 peers of 64 KB each (every per-record cap met) cost each sync at most ``peers_bound(R)`` bytes
    from Redis, not 64 MB; the honest peers' load is still counted exactly, hostile load values are skipped."""
    import redis

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        for i in range(10):
            add_peer(client, namespace, f"honest{i}", {"e0": "[1, 0.5]", "c1": "[2, null]"})
        for i, record in enumerate(HOSTILE_LOADS):
            plant(client, namespace, "e0", record, peer=f"hostile{i}")
        flood(client, namespace, ["e0", "c1"])
        config = config_for(two, server.url, namespace, state={"load_ttl": 120})  # the planted peers stay live
        router = Router(config, start_prober=False)
        try:
            connected(router)
            client.config_resetstat()
            e0, c1 = router.routes["e0"].elsewhere, router.routes["c1"].elsewhere
            wait_for(lambda: (e0.in_flight, c1.in_flight) == (10, 20), 5, "the honest peers' load")
            assert (e0.latency_n, e0.latency_sum, c1.latency_n) == (10, 5.0, 0)

            def evalsha() -> int:
                return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

            wait_for(lambda: evalsha() >= 40, 10, "20 syncs")  # two scripts a sync at least: PEERS and READ
            sent, calls = int(client.info("stats")["total_net_output_bytes"]), evalsha()
            assert sent <= calls / 2 * (peers_bound(2) + 2 * 34_000), f"{sent} bytes in at most {calls / 2} syncs"
        finally:
            router.close()
            client.close()


SKEWED_REPLICA = (
    "import sys, time; real = time.time; time.time = lambda: real() + float(sys.argv[2]); "
    "from tests.fleet import main; main()"
)
"""A replica (``python -m tests.fleet``) on a host whose clock runs ``argv[2]`` seconds ahead."""


class SkewedReplica(Replica):
    def __init__(self, document: dict[str, Any], skew_s: float) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-c", SKEWED_REPLICA, json.dumps(document), str(skew_s)]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )


def test_a_replica_whose_clock_runs_ahead_sees_and_is_seen_by_the_fleet_and_is_named_once(
    redis_server: RedisServer, namespace: str, two: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 14: a replica 3 s ahead dropped every other from the live set; liveness is Redis's clock now, and the
    other replicas name it, with its skew, in one warning."""
    caplog.set_level("INFO", logger=LOG)
    two["c1"].set_fault(Fault.HANG)
    document = state_document(two, redis_server.url, namespace)
    router = Router(config_from_dict(document, env={}), start_prober=False)
    skewed = SkewedReplica(document, 3.0)
    threads = [threading.Thread(target=_quiet_chat, args=(router,), daemon=True) for _ in range(2)]
    try:
        connected(router)
        name = skewed.ask("status")["replica"]
        assert skewed.ask("hold c1 1") == {"in_flight": 1}
        for thread in threads:
            thread.start()
        bound = 2 + router.config.state.staleness_bound_s
        wait_for(lambda: skewed.ask("status")["elsewhere"]["c1"] == 2, bound, "the skewed replica sees 2")
        wait_for(lambda: router.routes["c1"].elsewhere.in_flight == 1, bound, "the skewed replica is seen")
        named = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
        assert len(named) == 1, named
        skew = re.search(r"clock is ([0-9.]+) s ahead of Redis's", named[0])
        assert skew is not None and 2.5 <= float(skew.group(1)) <= 3.5, named[0]
        assert not [r for r in caplog.records if "clock is" in r.getMessage() and name not in r.getMessage()]
    finally:
        two["c1"].set_fault(None)
        for thread in threads:
            thread.join(5)
        skewed.close()
        router.close()


def _quiet_chat(router: Router) -> None:
    with contextlib.suppress(Exception):
        router.chat(USER, route="c1")

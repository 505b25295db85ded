"""Fleet state in Redis (``state: {backend: redis}``): what ``state.py`` describes, kept under ``namespace``.

Keys (``ns`` is the namespace)::

    ns:breakers        hash   route -> {"open", "at" (Unix time), "by" (replica), "n" (its sequence)}
    ns:throttle        hash   route -> Unix time until which the route sent a Retry-After
    ns:probes          hash   route -> the last probe result, and the replica that probed
    ns:replicas        zset   replica -> Unix time of its last refresh
    ns:load:<replica>  string {route: [in flight, moving-average latency]}; expires after load_ttl
    ns:leader:<route>  string the replica that probes the route; expires after leader_ttl unless renewed
    ns:trial:<route>   string the replica that sends the route's half-open trial; expires after leader_ttl
    ns:hedge           string the fleet's hedge tokens
    ns:changed         pub/sub channel: a replica published a change ({"by": replica, "breakers": records})

Two daemon threads per router. The sync thread pushes this replica's changes, reads the fleet's
state in one pipeline (one round trip; ``redis_scripts.py`` does the multi-key work in Redis)
and applies it, every ``refresh_interval`` or at once when
woken by a local change or by a message on ``ns:changed``; the listen thread adopts the breaker
news those messages carry at once and wakes the sync thread. Every call carries ``timeout``; when
Redis fails the router routes on its own state (every replica probes, trials and hedges for
itself), logs one warning, retries with backoff and logs one more warning when Redis is back. The
request path never calls Redis.

Times cross processes as Unix time, so replicas on several hosts need synchronised clocks (NTP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis

from ..secrets import MASK, redact_url
from .redis_records import (
    MALFORMED,
    MAX_CLOCK_AHEAD_S,
    BreakerRecord,
    decoded,
    load_record,
    monotonic,
    parsed,
    probe_record,
    read_loads,
    read_probe,
    read_throttle,
    throttle_record,
    wall,
)
from .redis_scripts import MAX_LOAD_BYTES, MAX_REPLICAS, Scripts, claimed, failure, forgotten
from .state import Elsewhere

if TYPE_CHECKING:
    from ...config import StateConfig
    from ..endpoints.route import Route
    from ..hedge import Hedger

log = logging.getLogger("anorag_integrations.router")

BACKOFF_MIN_S = 0.1
"""First wait before reconnecting to Redis after a failure..."""
BACKOFF_MAX_S = 5.0
"""...doubling up to this."""
LISTEN_POLL_S = 0.5
"""How long the listen thread waits for a message before checking whether it should stop."""
HEDGE_BURST = 2.0
"""Most tokens the fleet's hedge bucket holds (as one replica's, ``hedge.BURST``)."""


class RedisState:
    """One router's share of the fleet state (see the module docstring)."""

    backend = "redis"

    def __init__(
        self,
        config: StateConfig,
        routes: Mapping[str, Route],
        hedger: Hedger | None,
        label: str,
        max_retry_after: float = math.inf,
    ) -> None:
        assert config.url is not None
        self.max_retry_after = max_retry_after
        """The longest Retry-After this replica honours: another replica's is bounded by it too."""
        self._malformed: set[tuple[str, str]] = set()
        """(kind, route) of records in Redis found malformed (each is logged once)."""
        self.config = config
        self.routes = dict(routes)
        self.hedger = hedger
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{label}:{secrets.token_hex(4)}"
        """This router's name in the fleet: host, process, config name and a random part."""
        url = config.url.get_secret_value()
        self.url = redact_url(url)
        """The Redis URL as shown (``***@`` for its credentials)."""
        parts = urlsplit(url)
        self._password = unquote(parts.password or "") or next(iter(parse_qs(parts.query).get("password", [])), "")
        ns = config.namespace
        self._ns = ns
        self._channel = f"{ns}:changed"
        self._lock = threading.Lock()
        self._dirty: dict[str, set[str]] = {"breakers": set(), "throttle": set(), "probes": set()}
        """Routes whose breaker, Retry-After or probe result changed here and is not pushed yet."""
        self._seen: dict[str, tuple[str, int]] = {}
        """Per route, the other replica's breaker record last adopted (each is adopted once)."""
        self._seq = 0
        self._grants: dict[str, int] = {}
        """Per route, the breaker epoch whose half-open trial this replica owns."""
        self._trials: set[str] = set()
        """Routes whose trial lock this replica holds."""
        self._leading: frozenset[str] = frozenset()
        self.probing = False
        """Whether this router's prober runs (``probing_started``): only a probing replica runs for leader."""
        self.connected = False
        """Whether the last exchange with Redis succeeded (else the router runs on its own state)."""
        self._warned = False
        self._client: redis.Redis | None = None
        self._scripts: Scripts | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for route in self.routes.values():
            route.breaker.listener = self
            route.listener = self
        _LIVE.add(self)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``): a fresh replica with its own connection and threads.

        The child inherits the parent's memory but none of its threads, and a connection it must not
        share; left as it was, it would claim to be connected and never be granted a trial.
        """
        label = self.replica.split(":")[2] if self.replica.count(":") >= 3 else ""
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{label}:{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._wake, stop = threading.Event(), self._stop
        self._stop = threading.Event()
        self._client, self.connected, self._warned = None, False, False
        self._leading, self._grants, self._trials, self._seen = frozenset(), {}, set(), {}
        started, self._threads = bool(self._threads), []
        if started and not stop.is_set():
            self.start()

    def __repr__(self) -> str:
        return f"RedisState(url={self.url!r}, namespace={self._ns!r}, connected={self.connected})"

    # --- hooks: called on the request path, local memory only ---------------------------------------

    def breaker_changed(self, route: str) -> None:
        self._mark("breakers", route)

    def throttled(self, route: str) -> None:
        self._mark("throttle", route)

    def probed(self, route: str) -> None:
        self._mark("probes", route)

    def _mark(self, kind: str, route: str) -> None:
        with self._lock:
            self._dirty[kind].add(route)
        self._wake.set()

    def may_trial(self, route: str, epoch: int) -> bool:
        """Only the replica holding the route's trial lock sends its half-open trial (anyone, while Redis is down)."""
        return not self.connected or self._grants.get(route) == epoch

    def probing_started(self) -> None:
        self.probing = True
        self._wake.set()

    def leads(self, route: Route) -> bool:
        """Whether this replica probes ``route``: its elected leader, or every replica while Redis is down."""
        return not self.connected or route.name in self._leading

    @property
    def staleness_bound_s(self) -> float:
        return self.config.staleness_bound_s

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "url": self.url,
            "namespace": self._ns,
            "replica": self.replica,
            "connected": self.connected,
            "leads": sorted(self._leading) if self.connected else sorted(self.routes),
            "staleness_bound_s": self.staleness_bound_s,
        }

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        for target, name in ((self._run, "anorag-state-sync"), (self._listen, "anorag-state-listen")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def halt(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop both threads and give up this replica's leaderships, trials and load (bounded by ``timeout``)."""
        self.halt()
        for thread in self._threads:
            thread.join(timeout=5)
        client, self._client = self._client, None
        if client is not None and self.connected and self._scripts is not None:
            try:
                pipe = client.pipeline(transaction=False)
                held = [self._key("leader", n) for n in self._leading] + [self._key("trial", n) for n in self._trials]
                if held:
                    self._scripts.call(pipe, "release", held, [self.replica])
                pipe.delete(self._key("load", self.replica))
                pipe.zrem(f"{self._ns}:replicas", self.replica)
                pipe.execute()
            except Exception as exc:  # Redis went away: the TTLs clean up instead
                log.debug("shared state: could not give back this replica's keys: %s", self._masked(exc))
        if client is not None:
            client.close()
        self.connected = False

    # --- the sync thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            try:
                if self._client is None:
                    self._client = self._connect()
                self._sync(self._client)
            except Exception as exc:  # Redis down, slow, refusing us: never the thread's end
                self._down(exc)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = BACKOFF_MIN_S
            self._up()
            self._wake.wait(self.config.refresh_interval)
            self._wake.clear()

    def _new_client(self) -> redis.Redis:
        assert self.config.url is not None
        timeout = self.config.timeout
        return redis.Redis.from_url(
            self.config.url.get_secret_value(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )

    def _connect(self) -> redis.Redis:
        client = self._new_client()
        try:
            self._scripts = Scripts.load(client)
        except BaseException:
            client.close()
            raise
        return client

    def _down(self, exc: BaseException) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.connected or not self._warned:
            log.warning(
                "shared state: Redis at %s unreachable (%s); routing on this replica's own state, retrying",
                self.url,
                self._masked(exc),
            )
            self._warned = True
        else:
            log.debug("shared state: Redis at %s still unreachable: %s", self.url, self._masked(exc))
        self.connected = False
        self._leading = frozenset()
        self._grants.clear()
        self._trials.clear()
        for route in self.routes.values():
            route.elsewhere = Elsewhere()
        if self.hedger is not None:
            self.hedger.fleet_lost()

    def _up(self) -> None:
        if self.connected:
            return
        self.connected = True
        if self._warned:
            log.warning("shared state: Redis at %s is back; sharing the fleet's state again", self.url)
        else:
            log.info("shared state: connected to Redis at %s as %s", self.url, self.replica)

    def _masked(self, exc: BaseException) -> str:
        text = redact_url(f"{type(exc).__name__}: {exc}")
        return text.replace(self._password, MASK) if self._password else text

    def _key(self, kind: str, name: str) -> str:
        return f"{self._ns}:{kind}:{name}"

    def _sync(self, client: redis.Redis) -> None:
        """Push this replica's changes and load, claim leaderships and trials, read and apply the fleet's state."""
        with self._lock:
            dirty, self._dirty = self._dirty, {kind: set() for kind in self._dirty}
        hedge = self.hedger.fleet_exchange() if self.hedger is not None else None
        try:
            exchange = self._exchange(client, dirty, hedge)
            if forgotten(exchange.replies):  # Redis lost the scripts (SCRIPT FLUSH, a failover): load them, repeat
                self._scripts = Scripts.load(client)
                exchange = self._exchange(client, dirty, hedge)
            refused = failure(exchange.replies, exchange.scripts)
            if refused is not None:
                raise refused
            self._replace_wrong_types(client, exchange, dirty)
        except BaseException:
            self._requeue(dirty)  # pushed next time instead
            raise
        self._apply(exchange)

    def _exchange(self, client: redis.Redis, dirty: dict[str, set[str]], hedge: tuple[float, bool] | None) -> _Exchange:
        """One pipeline, one round trip: this replica's news and load, its claims, and the fleet's state."""
        ns, me, now, scripts = self._ns, self.replica, time.time(), self._scripts
        assert scripts is not None
        pipe = client.pipeline(transaction=False)
        ttl_ms = int(self.config.leader_ttl * 1000)
        out = _Exchange()

        def script(name: str, keys: list[str], args: list[Any]) -> int:
            """Queue a script; remember where its reply will be (see ``redis_scripts.failure``)."""
            out.scripts.append(at := scripts.call(pipe, name, keys, args))
            return at

        news: dict[str, str] = {}
        for name in dirty["breakers"]:
            is_open, opened_at, _ = self.routes[name].breaker.reading()
            self._seq += 1
            news[name] = BreakerRecord(is_open, wall(opened_at) if is_open else now, me, self._seq).dumps()
            pipe.hset(f"{ns}:breakers", name, news[name])
        out.released = [name for name in dirty["breakers"] if name in self._trials]
        if out.released:  # the trial ended one way or the other: the next one is anyone's
            script("release", [self._key("trial", name) for name in out.released], [me])
        for name in dirty["throttle"]:
            pipe.hset(f"{ns}:throttle", name, throttle_record(self.routes[name].not_before))
        for name in dirty["probes"]:
            pipe.hset(f"{ns}:probes", name, probe_record(self.routes[name].probe_result, me))
        running = [n for n in self._trials if n not in out.released and self.routes[n].breaker.trial_in_flight]
        if running:  # a trial in flight keeps its lock; one whose replica died loses it
            script("claim", [self._key("trial", n) for n in running], [me, ttl_ms])
        load = load_record(self.routes)
        load_ttl = self.config.load_ttl
        out.peers_at = script(
            "peers", [f"{ns}:replicas", self._key("load", me)],
            [me, repr(now), repr(now - load_ttl), load, int(load_ttl * 1000), f"{ns}:load:",
             repr(now + MAX_CLOCK_AHEAD_S), MAX_REPLICAS, MAX_LOAD_BYTES],
        )  # fmt: skip
        if self.probing:  # a router that does not probe (a CLI healthcheck, say) never takes a route's probing away
            out.leaders = list(self.routes)
            out.leaders_at = script("claim", [self._key("leader", n) for n in out.leaders], [me, ttl_ms])
        out.wanted = [
            (name, route.breaker.epoch)
            for name, route in self.routes.items()
            if route.breaker.wants_trial() and self._grants.get(name) != route.breaker.epoch
        ]
        if out.wanted:
            out.trials_at = script("claim", [self._key("trial", n) for n, _ in out.wanted], [me, ttl_ms])
        if hedge is not None:
            out.hedge_at = script("hedge", [f"{ns}:hedge"], [repr(hedge[0]), HEDGE_BURST, int(hedge[1])])
        out.reads_at = len(pipe)
        pipe.hgetall(f"{ns}:breakers")
        pipe.hgetall(f"{ns}:throttle")
        pipe.hgetall(f"{ns}:probes")
        if any(dirty.values()):  # breaker news rides along: listeners adopt it before their next read
            pipe.publish(self._channel, json.dumps({"by": me, "breakers": news}))
        out.replies = pipe.execute(raise_on_error=False)  # a bad key fails its command alone, not the exchange
        return out

    def _replace_wrong_types(self, client: redis.Redis, out: _Exchange, dirty: dict[str, set[str]]) -> None:
        """Drop a fleet hash that is another type (a hand edit), so records reach replicas that join later again;
        this exchange's records of that kind are pushed once more."""
        kinds = ("breakers", "throttle", "probes")
        wrong = [
            kind
            for kind, reply in zip(kinds, out.replies[out.reads_at : out.reads_at + 3], strict=True)
            if isinstance(reply, redis.exceptions.ResponseError) and "WRONGTYPE" in str(reply)
        ]
        if not wrong:
            return
        log.warning("shared state: replacing %s in Redis at %s (not hashes)", ", ".join(wrong), self.url)
        client.delete(*(f"{self._ns}:{kind}" for kind in wrong))
        self._requeue({kind: dirty[kind] for kind in wrong})
        self._wake.set()

    def _requeue(self, dirty: dict[str, set[str]]) -> None:
        """Records an exchange did not get into Redis: pushed with the next one."""
        with self._lock:
            for kind, names in dirty.items():
                self._dirty[kind] |= names

    def _apply(self, out: _Exchange) -> None:
        replies = out.replies
        leaders = claimed(replies[out.leaders_at], len(out.leaders)) if out.leaders else []
        self._leading = frozenset(name for name, held in zip(out.leaders, leaders, strict=True) if held)
        self._trials.difference_update(out.released)
        trials = claimed(replies[out.trials_at], len(out.wanted)) if out.wanted else []
        for (name, epoch), held in zip(out.wanted, trials, strict=True):
            if held:
                self._grants[name] = epoch
                self._trials.add(name)
        if self.hedger is not None and out.hedge_at is not None:
            self.hedger.fleet_granted(1.0 if replies[out.hedge_at] == 1 else 0.0)
        breakers, throttle, probes = (decoded(r) for r in replies[out.reads_at : out.reads_at + 3])
        for name, raw in breakers.items():
            self._adopt("breakers", name, raw, self._adopt_breaker)
        for name, raw in throttle.items():
            self._adopt("throttle", name, raw, self._adopt_throttle)
        for name, raw in probes.items():
            self._adopt("probes", name, raw, self._adopt_probe)
        others = replies[out.peers_at]
        for name, elsewhere in read_loads(others if isinstance(others, list) else [], self.routes).items():
            self.routes[name].elsewhere = elsewhere

    def _adopt(self, kind: str, name: str, raw: str, adopt: Callable[[Route, str], None]) -> None:
        """Apply one record of another replica's; a malformed one is skipped (logged once), the others still count."""
        route = self.routes.get(name)
        if route is None:
            return
        try:
            adopt(route, raw)
        except MALFORMED as exc:
            if (kind, name) not in self._malformed:
                self._malformed.add((kind, name))
                log.warning(
                    "shared state: ignoring a malformed %s record for route %r in Redis at %s (%s: %s)",
                    kind, name, self.url, type(exc).__name__, str(exc)[:200],
                )  # fmt: skip

    def _adopt_throttle(self, route: Route, raw: str) -> None:
        """Another replica's Retry-After, bounded as this replica bounds its own (``params.max_retry_after``)."""
        until = read_throttle(raw, self.max_retry_after)
        if until is not None:
            route.not_before = max(route.not_before, until)

    def _adopt_breaker(self, route: Route, raw: str) -> None:
        record = BreakerRecord.loads(raw)
        seen_by, seen_n = self._seen.get(route.name, ("", 0))
        if record.by == self.replica or (seen_by == record.by and seen_n >= record.n):
            return  # ours, or already adopted (from the message, then from the hash)
        self._seen[route.name] = (record.by, record.n)
        at = min(monotonic(record.at), time.monotonic())  # a clock ahead of ours cannot open a breaker in the future
        if record.is_open:
            route.breaker.adopt_open(at)
        else:
            route.breaker.adopt_closed(at)

    def _adopt_probe(self, route: Route, raw: str) -> None:
        by, result = read_probe(raw)
        if by == self.replica or (result.checked_at or 0) <= (route.probe_result.checked_at or 0):
            return
        route.probe_result = result
        if result.healthy is True:
            route.breaker.probe_succeeded()  # the leader found it up: the cool-down ends here too

    def _heard(self, data: object) -> None:
        """Another replica's change: adopt its breaker news at once, and have the sync thread read the rest."""
        message = parsed(data)
        if not isinstance(message, dict) or message.get("by") == self.replica:
            return
        news = message.get("breakers")
        if self.connected and isinstance(news, dict):
            for name, raw in news.items():
                if isinstance(raw, str):
                    self._adopt("breakers", str(name), raw, self._adopt_breaker)
        self._wake.set()

    # --- the listen thread --------------------------------------------------------------------------

    def _listen(self) -> None:
        """Wake the sync thread whenever another replica publishes a change (so it is read at once)."""
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            client = self._new_client()
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                backoff = BACKOFF_MIN_S
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is not None:
                        self._heard(message.get("data"))
            except Exception as exc:  # the sync thread reports outages; this one just retries
                log.debug("shared state: listening for changes failed: %s", self._masked(exc))
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
            finally:
                client.close()


_LIVE: weakref.WeakSet[RedisState] = weakref.WeakSet()
"""Every RedisState of this process, so a forked child can start each one afresh."""


def _after_fork_in_child() -> None:
    for state in list(_LIVE):
        state._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(slots=True)
class _Exchange:
    """One exchange's replies, and where in them each part's answers start."""

    scripts: list[int] = field(default_factory=list)
    """Where the scripts' replies are (an error there is Redis refusing us, see ``redis_scripts.failure``)."""
    released: list[str] = field(default_factory=list)
    """Routes whose trial lock this exchange gave back (their breaker moved on)."""
    peers_at: int = 0
    """The other live replicas' loads (JSON each; one that expired is left out)."""
    leaders: list[str] = field(default_factory=list)
    """Routes whose leader lock the exchange claimed (every route when this replica probes, else none)."""
    leaders_at: int = 0
    wanted: list[tuple[str, int]] = field(default_factory=list)
    """(route, breaker epoch) whose trial lock this exchange tried to take."""
    trials_at: int = 0
    hedge_at: int | None = None
    reads_at: int = 0
    replies: list[Any] = field(default_factory=list)

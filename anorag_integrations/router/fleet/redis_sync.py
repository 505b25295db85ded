"""One sync with Redis: push this replica's changes and load, claim its locks, read and apply the fleet's state.

``Sync`` keeps what the exchange needs between two syncs: the changes not pushed yet (the request
path marks them, in local memory only) and the locks this replica holds (the routes it probes as
leader, the half-open trials it owns). Each sync is one pipeline, one round trip (the retry budget's
counts ride along: ``BUDGET`` adds this replica's and returns the fleet's, and so does ``prefix_aware``'s
shared index, ``redis_prefix.py``); the multi-key work
runs in Redis (``redis_scripts.py``), what it reads is bounded by this replica's routes
(``redis_peers.py``), the records are written and read by ``redis_records.py``, and other
replicas' records are applied by ``redis_adopt.py``. A command that fails alone (a key of the
wrong type) fails the exchange for that kind only; a script Redis refuses fails it whole, as an outage.

The route set may change while serving (``set_routes``): each sync reads the mapping once and
exchanges about those routes only; the locks this replica holds for routes it no longer has are given
back in that sync (left to expire within ``leader_ttl`` if it fails), and their changes are not pushed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from .. import forks
from .redis_peers import AT_FIELD, Clocks, peers_args, read_peers, redis_time
from .redis_records import MAX_BYTES, BreakerRecord, load_fields, probe_record, throttle_record, wall
from .redis_scripts import claimed, failure, forgotten
from .redis_trials import TrialGrants

if TYPE_CHECKING:
    from ...config import StateConfig
    from ..admission import RetryBudget
    from ..endpoints.route import Route
    from ..hedge import Hedger
    from .redis_adopt import Adopter
    from .redis_link import RedisLink
    from .redis_prefix import PrefixShare, Push

log = logging.getLogger("anorag_integrations.router")

HEDGE_BURST = 2.0
"""Most tokens the fleet's hedge bucket holds (as one replica's, ``hedge.BURST``)."""
KINDS = ("breakers", "throttle", "probes")
"""The kinds of record a replica pushes when they change, each kept in the fleet hash of that name."""


class Sync:
    """This replica's side of the exchange with Redis (see the module docstring)."""

    def __init__(
        self,
        config: StateConfig,
        routes: Mapping[str, Route],
        hedger: Hedger | None,
        replica: str,
        link: RedisLink,
        adopter: Adopter,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self.config = config
        self.routes = routes
        """The routes the next sync exchanges about; swapped whole by ``set_routes``, never changed in place."""
        self.hedger = hedger
        self.retry_budget = retry_budget
        """The retry budget whose counts this replica adds to the fleet's (``ns:budget:<second>``), None: not shared."""
        self.replica = replica
        self._link = link
        self._adopter = adopter
        self._ns = config.namespace
        self.channel = f"{self._ns}:changed"
        """Where a replica publishes its breaker news (``ns:changed``)."""
        self._lock = forks.lock()
        self._dirty: dict[str, set[str]] = {kind: set() for kind in KINDS}
        """Routes whose breaker, Retry-After or probe result changed here and is not pushed yet."""
        self._seq = 0
        self.trials = TrialGrants(routes, config.leader_ttl)
        """The half-open trials the fleet grants this replica (``redis_trials.py``)."""
        self.leading: frozenset[str] = frozenset()
        """Routes whose leader lock this replica holds: it probes them for the fleet."""
        self.probing = False
        """Whether this router's prober runs: only a probing replica runs for leader."""
        self.clocks = Clocks(config.timeout)
        """Warns once about each replica whose clock is off Redis's (``redis_peers.py``)."""
        self.prefixes: PrefixShare | None = None
        """``prefix_aware``'s index shared with the fleet (``redis_prefix.py``); None: no pool runs it."""

    def mark(self, kind: str, route: str) -> None:
        """``route``'s record of ``kind`` changed here: pushed with the next sync (local memory only)."""
        with self._lock:
            self._dirty[kind].add(route)

    def set_routes(self, routes: Mapping[str, Route]) -> None:
        """The router's routes changed: the next sync takes ``routes`` (a mapping nobody changes), read once per sync
        so a sync under way keeps the set it started with."""
        self.routes = routes

    def renew(self, replica: str) -> None:
        """In a forked child: a replica of another name, holding no lock (the parent's stay the parent's)."""
        self.replica = replica
        self._lock = forks.lock()
        self.leading = frozenset()
        self.trials.clear()
        self.clocks.renew()

    def lost(self) -> None:
        """Redis is out of reach: the locks this replica held are as good as gone."""
        self.leading = frozenset()
        self.trials.clear()

    def give_back(self, pipe: Any) -> None:
        """Queue on ``pipe`` the release of this replica's locks and the removal of its load (it is leaving)."""
        scripts = self._link.scripts
        assert scripts is not None
        held = [self._key("leader", n) for n in self.leading] + [self._key("trial", n) for n in self.trials.held()]
        if held:
            scripts.call(pipe, "release", held, [self.replica])
        pipe.delete(self._key("load", self.replica))
        pipe.zrem(f"{self._ns}:replicas", self.replica)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._ns}:{kind}:{name}"

    def sync(self, client: redis.Redis) -> bool:
        """Push this replica's changes and load, claim leaderships and trials, read and apply the fleet's state.

        Whether to sync again at once (a fleet hash of the wrong type was replaced: its records go again).
        """
        routes = self.routes  # once: ``set_routes`` may swap it meanwhile
        self.trials.routes = routes
        with self._lock:
            marked, self._dirty = self._dirty, {kind: set() for kind in self._dirty}
        dirty = {kind: {name for name in names if name in routes} for kind, names in marked.items()}  # gone: unsaid
        gone = self._gone(routes)
        hedge = self.hedger.fleet_exchange() if self.hedger is not None else None
        budget = self.retry_budget.fleet_exchange() if self.retry_budget is not None else None
        push = self.prefixes.take() if self.prefixes is not None else None
        try:
            exchange = self._exchange(client, routes, dirty, gone, hedge, budget, push)
            if forgotten(exchange.replies):  # Redis lost the scripts (SCRIPT FLUSH, a failover): load them, repeat
                self._link.load_scripts(client)
                exchange = self._exchange(client, routes, dirty, gone, hedge, budget, push)
            refused = failure(exchange.replies, exchange.scripts)
            if refused is not None:
                raise refused
            again = self._replace_wrong_types(client, exchange, dirty)
        except BaseException:
            self._requeue(dirty)  # pushed next time instead
            if push is not None and self.prefixes is not None:
                self.prefixes.requeue(push)
            raise
        self._apply(exchange)
        return again or exchange.more

    def _gone(self, routes: Mapping[str, Route]) -> list[str]:
        """The keys of the locks this replica holds for routes it no longer has; their trial grants end here."""
        grants = self.trials.grants
        dropped = [name for name in grants if name not in routes]
        if dropped:  # replaced whole: the request path reads it without a lock
            self.trials.grants = {name: grant for name, grant in grants.items() if name in routes}
        leaders = [self._key("leader", name) for name in self.leading if name not in routes]
        return leaders + [self._key("trial", name) for name in dropped]

    def _exchange(
        self,
        client: redis.Redis,
        routes: Mapping[str, Route],
        dirty: dict[str, set[str]],
        gone: list[str],
        hedge: tuple[float, bool] | None,
        budget: tuple[int, int] | None,
        push: Push | None = None,
    ) -> _Exchange:
        """One pipeline, one round trip: this replica's news and load, its claims, and the fleet's state."""
        ns, me, now, scripts = self._ns, self.replica, time.time(), self._link.scripts
        assert scripts is not None
        pipe = client.pipeline(transaction=False)
        ttl_ms = int(self.config.leader_ttl * 1000)
        out = _Exchange(routes)

        def script(name: str, keys: list[str], args: list[Any]) -> int:
            """Queue a script; remember where its reply will be (see ``redis_scripts.failure``)."""
            out.scripts.append(at := scripts.call(pipe, name, keys, args))
            return at

        news: dict[str, str] = {}
        for name in dirty["breakers"]:
            is_open, opened_at, _ = routes[name].breaker.reading()
            self._seq += 1
            news[name] = BreakerRecord(is_open, wall(opened_at) if is_open else now, me, self._seq).dumps()
            pipe.hset(f"{ns}:breakers", name, news[name])
        out.released, out.renewed = self.trials.split()
        if out.released:  # the breaker moved on, or nobody here asks for the trial: the next one is anyone's
            script("release", [self._key("trial", name) for name in out.released], [me])
        if gone:  # routes this replica no longer has: another replica leads and trials them now
            script("release", gone, [me])
        for name in dirty["throttle"]:
            pipe.hset(f"{ns}:throttle", name, throttle_record(routes[name].not_before))
        for name in dirty["probes"]:
            pipe.hset(f"{ns}:probes", name, probe_record(routes[name].probe_result, me))
        if out.renewed:  # a grant keeps its lock while it stands; a crashed holder's expires
            out.renewed_at = script("claim", [self._key("trial", n) for n in out.renewed], [me, ttl_ms])
        load = [*load_fields(routes), AT_FIELD, repr(now)]
        args = peers_args(me, self.config.load_ttl, f"{ns}:load:", load, list(routes))
        out.peers_at = script("peers", [f"{ns}:replicas", self._key("load", me)], args)
        if self.probing:  # a router that does not probe (a CLI healthcheck, say) never takes a route's probing away
            out.leaders = list(routes)
            out.leaders_at = script("claim", [self._key("leader", n) for n in out.leaders], [me, ttl_ms])
        out.wanted = self.trials.wanted()
        if out.wanted:
            out.trials_at = script("claim", [self._key("trial", n) for n, _ in out.wanted], [me, ttl_ms])
        if hedge is not None:
            out.hedge_at = script("hedge", [f"{ns}:hedge"], [repr(hedge[0]), HEDGE_BURST, int(hedge[1])])
        if budget is not None and self.retry_budget is not None:  # add this replica's counts, read the fleet's
            out.budget_at = script("budget", [f"{ns}:budget"], [budget[0], budget[1], self.retry_budget.size])
        if push is not None and self.prefixes is not None and (names := self.prefixes.shared(routes)):
            out.prefix_names, out.push = names, push  # push the blocks this replica recorded, read the fleet's new ones
            out.prefix_at = script("prefix", *self.prefixes.args(ns or "", names, push))
        reads = [f"{ns}:{kind}" for kind in KINDS]  # this replica's routes only, each record within its kind's size
        out.reads_at = script("read", reads, [*(MAX_BYTES[kind] for kind in KINDS), *routes])
        if any(dirty.values()):  # breaker news rides along: listeners adopt it before their next read
            pipe.publish(self.channel, json.dumps({"by": me, "breakers": news}))
        out.sent, out.sent_wall = time.monotonic(), time.time()  # locks taken or renewed expire after sent + ttl
        out.replies = pipe.execute(raise_on_error=False)  # a bad key fails its command alone, not the exchange
        out.received_wall = time.time()
        return out

    def _replace_wrong_types(self, client: redis.Redis, out: _Exchange, dirty: dict[str, set[str]]) -> bool:
        """Drop a fleet hash that is another type (a hand edit), so records reach replicas that join later again;
        this exchange's records of that kind are pushed once more. Whether any was dropped."""
        reads = out.replies[out.reads_at]  # READ's reply: -1 where a fleet hash is another type
        wrong = [kind for i, kind in enumerate(KINDS) if isinstance(reads, list) and reads[i : i + 1] == [-1]]
        if not wrong:
            return False
        log.warning("shared state: replacing %s in Redis (not hashes)", ", ".join(wrong))
        client.delete(*(f"{self._ns}:{kind}" for kind in wrong))
        self._requeue({kind: dirty[kind] for kind in wrong})
        return True

    def _requeue(self, dirty: dict[str, set[str]]) -> None:
        """Records an exchange did not get into Redis: pushed with the next one."""
        with self._lock:
            for kind, names in dirty.items():
                self._dirty[kind] |= names

    def _apply(self, out: _Exchange) -> None:
        replies = out.replies
        leaders = claimed(replies[out.leaders_at], len(out.leaders)) if out.leaders else []
        self.leading = frozenset(name for name, held in zip(out.leaders, leaders, strict=True) if held)
        renewals = claimed(replies[out.renewed_at], len(out.renewed)) if out.renewed else []
        claims = claimed(replies[out.trials_at], len(out.wanted)) if out.wanted else []
        self.trials.settle(out.renewed, renewals, out.wanted, claims, out.sent)
        if self.hedger is not None and out.hedge_at is not None:
            self.hedger.fleet_granted(1.0 if replies[out.hedge_at] == 1 else 0.0)
        if self.retry_budget is not None and out.budget_at is not None:
            totals = replies[out.budget_at]
            if isinstance(totals, list) and len(totals) == 2 and all(isinstance(n, int) for n in totals):
                self.retry_budget.fleet_totals(float(totals[0]), float(totals[1]))
        self._apply_reads(out.routes, replies[out.reads_at])
        if self.prefixes is not None and out.prefix_at is not None and out.push is not None:
            out.more = self.prefixes.apply(out.routes, out.prefix_names, replies[out.prefix_at], out.push)
        peers = replies[out.peers_at]
        now = redis_time(peers)
        if now is not None:  # this replica's own clock against Redis's, within half the round trip
            mid, error = (out.sent_wall + out.received_wall) / 2, (out.received_wall - out.sent_wall) / 2
            self.clocks.check(f"{self.replica} (this replica)", mid - now, error)
        for name, elsewhere in read_peers(peers, list(out.routes), self.clocks, self._adopter.skipped).items():
            out.routes[name].elsewhere = elsewhere

    def _apply_reads(self, routes: Mapping[str, Route], reads: object) -> None:
        """Adopt the fleet hashes' records (``READ``'s reply: per kind, a value per route of ``routes`` or None)."""
        if not isinstance(reads, list) or len(reads) != len(KINDS):
            return
        for kind, values in zip(KINDS, reads, strict=True):
            if isinstance(values, list) and len(values) == len(routes):
                for name, raw in zip(routes, values, strict=True):
                    if raw is not None:
                        self._adopter.adopt(kind, name, raw)


@dataclass(slots=True)
class _Exchange:
    """One exchange's replies, and where in them each part's answers start."""

    routes: Mapping[str, Route]
    """The routes the exchange was about (the sync's one reading of ``Sync.routes``)."""
    scripts: list[int] = field(default_factory=list)
    """Where the scripts' replies are (an error there is Redis refusing us, see ``redis_scripts.failure``)."""
    released: list[str] = field(default_factory=list)
    """Routes whose trial lock this exchange gave back (their breaker moved on, or no request here asks for it)."""
    renewed: list[str] = field(default_factory=list)
    """Routes whose trial lock this exchange renewed (the grant still stands here)."""
    renewed_at: int = 0
    peers_at: int = 0
    """Redis's time, then per other live replica its name, score and loads of this replica's routes (``PEERS``)."""
    leaders: list[str] = field(default_factory=list)
    """Routes whose leader lock the exchange claimed (every route when this replica probes, else none)."""
    leaders_at: int = 0
    wanted: list[tuple[str, int]] = field(default_factory=list)
    """(route, breaker epoch) whose trial lock this exchange tried to take."""
    trials_at: int = 0
    hedge_at: int | None = None
    budget_at: int | None = None
    """Where ``BUDGET``'s reply is: the fleet's (calls, retries) over the retry budget's window."""
    reads_at: int = 0
    """Where ``READ``'s reply is: the fleet hashes' records of this replica's routes."""
    prefix_names: list[str] = field(default_factory=list)
    """The routes whose shared prefix index the exchange pushed to and read (``redis_prefix.py``)."""
    prefix_at: int | None = None
    push: Push | None = None
    """What the exchange pushed of the shared prefix index."""
    more: bool = False
    """The shared prefix index has more to push or read than one page: sync again at once."""
    sent_wall: float = 0.0
    received_wall: float = 0.0
    """Unix time just before the exchange was sent and once its replies came: this clock against Redis's."""
    sent: float = 0.0
    """Monotonic time just before the exchange was sent: the locks it took or renewed outlive ``sent + leader_ttl``."""
    replies: list[Any] = field(default_factory=list)

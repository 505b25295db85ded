"""Fleet state in Redis (``state: {backend: redis}``): what ``state.py`` describes, kept under ``namespace``.

Keys (``ns`` is the namespace)::

    ns:breakers        hash   route -> {"open", "at" (Unix time), "by" (replica), "n" (its sequence)}
    ns:throttle        hash   route -> Unix time until which the route sent a Retry-After
    ns:probes          hash   route -> the last probe result, and the replica that probed
    ns:replicas        zset   replica -> Redis's time (TIME) of its last refresh
    ns:load:<replica>  hash   route -> [in flight, moving-average latency], "@at" -> its clock; expires after load_ttl
    ns:leader:<route>  string the replica that probes the route; expires after leader_ttl unless renewed
    ns:trial:<route>   string the replica that sends the route's half-open trial; expires after leader_ttl
                              unless renewed (while its holder runs or asks for the trial)
    ns:hedge           string the fleet's hedge tokens
    ns:budget:<second> hash   "calls", "retries" -> what the fleet's replicas counted for the retry budget, added
                              to the bucket of Redis's second (TIME) at their sync; expires window + 2 s later
    ns:prefix:...      ``prefix_aware``'s shared index: see ``redis_prefix.py``
    ns:changed         pub/sub channel: a replica published a change ({"by": replica, "breakers": records})

Two daemon threads per router. The sync thread pushes this replica's changes, reads the fleet's
state in one pipeline (one round trip; ``redis_scripts.py`` does the multi-key work in Redis)
and applies it, every ``refresh_interval`` or at once when
woken by a local change or by a message on ``ns:changed``; the listen thread adopts the breaker
news those messages carry at once and wakes the sync thread. Every call carries ``timeout``; when
Redis fails the router routes on its own state (every replica probes, trials and hedges for
itself, and judges retries by its own counts), logs one warning, retries with backoff and logs one
more warning when Redis is back. The request path never calls Redis.

Liveness is Redis's clock and TTLs; the times in records cross processes as Unix time, so a replica
whose clock is off Redis's is named in a warning (``redis_peers.py``).

``ns`` is ``state.namespace``, or when that is not set ``anorag-`` and a hash of the routes
(``state.fleet_namespace``): replicas of one config share, other apps on the same Redis do not.

One half-open trial fleet-wide: a replica sends a route's trial only while it holds the route's
trial lock and the lock cannot have expired; ``redis_trials.py`` says when it claims, renews and
gives back the lock (a crashed holder's expires within ``leader_ttl``).

A replica that joins the fleet reads it before it serves: ``start`` (called by the router's
constructor) waits for the sync thread's first sync, at most 4 ``timeout``s, so the breakers, Retry-Afters
and probe results the fleet learned are this router's from its first request. If Redis is down or slow
it starts on its own state, as it does during an outage, and the sync thread keeps retrying.

The routes may change while serving (``set_routes``): the next sync is about the new set only.

``RedisState`` is the router's side: the hooks, the two threads and the fall-back to this replica's
own state. The rest lives beside it: the connection and its outages in ``redis_link.py``, one sync
in ``redis_sync.py``, applying other replicas' records in ``redis_adopt.py``, the half-open trials in
``redis_trials.py``, the records themselves in ``redis_records.py`` and the scripts in ``redis_scripts.py``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import forks
from .redis_adopt import Adopter
from .redis_link import BACKOFF_MAX_S, BACKOFF_MIN_S, LISTEN_POLL_S, Backoff, RedisLink
from .redis_prefix import Learner, PrefixShare
from .redis_sync import HEDGE_BURST, Sync
from .state import Elsewhere, fleet_namespace

if TYPE_CHECKING:
    from ...config import StateConfig
    from ..admission import RetryBudget
    from ..endpoints.route import Route
    from ..hedge import Hedger

log = logging.getLogger("anorag_integrations.router")

FIRST_SYNC_CALLS = 4
"""Redis calls a first sync may take (connect, scripts, exchange), each bounded by ``state.timeout``: ``start``
waits at most this many timeouts (the same bound as ``staleness_bound_s``'s)."""

__all__ = ["BACKOFF_MAX_S", "BACKOFF_MIN_S", "HEDGE_BURST", "LISTEN_POLL_S", "RedisState"]


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
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self.namespace_derived = config.namespace is None
        """Whether the namespace was derived from the routes (``state.namespace`` not set)."""
        if config.namespace is None:
            derived = fleet_namespace((r.name, r.base_url, r.model) for r in routes.values())
            config = config.model_copy(update={"namespace": derived})
        self.config = config
        self.routes = dict(routes)
        self.hedger = hedger
        self.retry_budget = retry_budget
        """The router's retry budget: judged by the fleet's counts while Redis answers (None: not shared)."""
        self.replica = _replica_name(label)
        """This router's name in the fleet: host, process, config name and a random part."""
        self._link = RedisLink(config)
        self.url = self._link.url
        """The Redis URL as shown (``***@`` for its credentials)."""
        self.namespace: str = config.namespace or ""
        """The prefix of every key this replica reads and writes: its fleet's."""
        self._adopter = Adopter(self.routes, self.replica, max_retry_after)
        self._sync = Sync(config, self.routes, hedger, self.replica, self._link, self._adopter, retry_budget)
        self._wake = forks.event()
        self._sync.trials.wake = self._wake_up
        self._stop = forks.event()
        self._threads: list[threading.Thread] = []
        for route in self.routes.values():
            route.breaker.listener = self
            route.listener = self
        forks.renew_in_child(self)

    @property
    def connected(self) -> bool:
        """Whether the last exchange with Redis succeeded (else the router runs on its own state)."""
        return self._link.connected

    def renew_after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``): a fresh replica with its own connection and threads.

        The child inherits the parent's memory but none of its threads, and a connection it must not
        share; left as it was, it would claim to be connected and never be granted a trial.
        """
        label = self.replica.split(":")[2] if self.replica.count(":") >= 3 else ""
        self.replica = _replica_name(label)
        self._link.renew()
        self._sync.renew(self.replica)
        self._adopter.renew(self.replica)
        if self._sync.prefixes is not None:
            self._sync.prefixes.renew()
        self._wake, stop = forks.event(), self._stop
        self._stop = forks.event()
        started, self._threads = bool(self._threads), []
        if started and not stop.is_set():
            self.start()

    def __repr__(self) -> str:
        return f"RedisState(url={self.url!r}, namespace={self.namespace!r}, connected={self.connected})"

    # --- hooks: called on the request path, local memory only ---------------------------------------

    def breaker_changed(self, route: str) -> None:
        self._mark("breakers", route)

    def throttled(self, route: str) -> None:
        self._mark("throttle", route)

    def probed(self, route: str) -> None:
        self._mark("probes", route)

    def _wake_up(self) -> None:
        """Have the sync thread exchange with Redis now (it reads ``_wake`` anew: a forked child has its own)."""
        self._wake.set()

    def _mark(self, kind: str, route: str) -> None:
        self._sync.mark(kind, route)
        self._wake.set()

    def may_trial(self, route: str, epoch: int) -> bool:
        """Only the replica holding the route's trial lock sends its half-open trial, and only while the lock cannot
        have expired (anyone, while Redis is down)."""
        return not self.connected or self._sync.trials.allows(route, epoch)

    def probing_started(self) -> None:
        """This router's prober runs: only a probing replica runs for leader."""
        self._sync.probing = True
        self._wake.set()

    def leads(self, route: Route) -> bool:
        """Whether this replica probes ``route``: its elected leader, or every replica while Redis is down."""
        return not self.connected or route.name in self._sync.leading

    def share_prefixes(self, policies: Mapping[str, Learner], max_blocks: int, block_chars: int) -> PrefixShare | None:
        """Share ``prefix_aware``'s indexes with the fleet from the next sync (``redis_prefix.py``)."""
        if not policies:
            return None
        self._sync.prefixes = PrefixShare(max_blocks, policies, block_chars)
        return self._sync.prefixes

    @property
    def staleness_bound_s(self) -> float:
        return self.config.staleness_bound_s

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "url": self.url,
            "namespace": self.namespace,
            "namespace_from": "routes" if self.namespace_derived else "config",
            "replica": self.replica,
            "connected": self.connected,
            "leads": sorted(n for n in self._sync.leading if n in self.routes)
            if self.connected
            else sorted(self.routes),
            "trials": self._sync.trials.live() if self.connected else [],
            "staleness_bound_s": self.staleness_bound_s,
            **({"prefix_blocks_adopted": prefixes.adopted} if (prefixes := self._sync.prefixes) is not None else {}),
        }

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start both threads and wait for the first sync (at most ``FIRST_SYNC_CALLS`` timeouts): a new replica
        serves its first request knowing the fleet's state, or, with Redis down or slow, on its own (retrying)."""
        if self._threads:
            return
        first = threading.Event()
        sync = threading.Thread(target=self._run, args=(first,), name="anorag-state-sync", daemon=True)
        listen = threading.Thread(target=self._listen, name="anorag-state-listen", daemon=True)
        for thread in (sync, listen):
            thread.start()
            self._threads.append(thread)
        bound = FIRST_SYNC_CALLS * self.config.timeout
        if not first.wait(bound):
            log.debug("shared state: no first sync within %.2f s; serving on this replica's own state", bound)

    def set_routes(self, routes: Mapping[str, Route]) -> None:
        """The router's routes changed while serving: the fleet state follows them from the next sync (woken now).

        The new mapping is swapped whole, so a sync under way finishes with the set it read. New routes
        report their changes here; removed ones no longer do, nothing more about them is published, and
        the leader and trial locks this replica held for them are given back by the next sync (left to
        expire within ``leader_ttl`` if that sync fails).
        """
        new = dict(routes)
        old, self.routes = self.routes, new
        kept = {id(route) for route in new.values()}
        for route in old.values():
            if id(route) not in kept:  # gone, or replaced under its name: a draining route reports to nobody
                if route.breaker.listener is self:
                    route.breaker.listener = None
                if route.listener is self:
                    route.listener = None
        for route in new.values():
            route.breaker.listener = self
            route.listener = self
        self._adopter.set_routes(new)
        self._sync.set_routes(new)
        self._wake.set()

    def halt(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop both threads and give up this replica's leaderships, trials and load (bounded by ``timeout``)."""
        self.halt()
        for thread in self._threads:
            thread.join(timeout=5)
        self._link.close(self._sync.give_back)

    # --- the threads --------------------------------------------------------------------------------

    def _run(self, first: threading.Event) -> None:
        """The sync thread: one sync every ``refresh_interval``, or at once when woken; backoff while Redis fails.

        ``first`` is set once the first sync succeeded or failed (``start`` waits for it)."""
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                again = self._sync.sync(self._link.connect())
            except Exception as exc:  # Redis down, slow, refusing us: never the thread's end
                self._down(exc)
                first.set()
                backoff.wait(self._stop)
                continue
            backoff.reset()
            self._link.up(self.replica)
            first.set()
            if again:
                self._wake.set()
            self._wake.wait(self.config.refresh_interval)
            self._wake.clear()

    def _down(self, exc: BaseException) -> None:
        """Redis failed: route on this replica's own state (it probes, trials, hedges and counts retries for itself)."""
        self._link.lost(exc)
        self._sync.lost()
        for route in self.routes.values():
            route.elsewhere = Elsewhere()
        if self.hedger is not None:
            self.hedger.fleet_lost()
        if self.retry_budget is not None:
            self.retry_budget.fleet_lost()

    def _listen(self) -> None:
        """The listen thread: wake the sync thread whenever another replica publishes a change (read at once)."""
        self._link.listen(self._sync.channel, self._stop, self._heard)

    def _heard(self, data: object) -> None:
        """Another replica's change: adopt its breaker news at once, and have the sync thread read the rest."""
        if self._adopter.heard(data, self.connected):
            self._wake.set()


def _replica_name(label: str) -> str:
    """A replica's name in the fleet: host, process, config name and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{label}:{secrets.token_hex(4)}"

"""The half-open trials the fleet grants this replica: at most one replica sends a route's trial at a time.

A route's trial belongs to whoever holds its lock in Redis (``ns:trial:<route>``, a TTL of
``leader_ttl``). ``TrialGrants`` keeps this replica's side, and each sync (``redis_sync.py``) asks it
what to give back, what to renew and what to claim, then hands it the answers:

- a grant admits a trial only until its lock could have expired (``TrialGrant.until``, counted from
  before the exchange that took or renewed it), so a holder whose syncs stop (crashed, hung, starved)
  sends no trial once another replica may hold the lock;
- the holder renews the lock every sync while its breaker is open in the granted generation and the
  trial is taken (half-open: in flight, or given back, when the breaker admits the next without
  asking) or was asked for within ``leader_ttl``; a crashed holder's lock expires within one TTL;
- a replica claims a trial only when its own requests ask for it (a pick found the breaker open with
  its cool-down over), and gives an unused grant back after ``leader_ttl``: a replica without traffic
  for a route never keeps the fleet's one trial from the replicas that have some.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .state import TrialGrant

if TYPE_CHECKING:
    from ..endpoints.route import Route


class TrialGrants:
    """This replica's trial grants, and when its requests last asked for each route's trial (see the module)."""

    def __init__(self, routes: Mapping[str, Route], ttl_s: float) -> None:
        self.routes = routes
        self.ttl_s = ttl_s
        """``leader_ttl``: a lock's TTL, and how long an ask keeps (or claims) a grant."""
        self.wake: Callable[[], None] = _nothing
        """Wakes the sync thread (set by ``RedisState``): a trial was asked for that this replica holds no grant of."""
        self.grants: dict[str, TrialGrant] = {}
        """Per route whose trial lock this replica holds: the breaker generation and until when it counts.
        Replaced whole, never changed in place: the request path reads it without a lock."""
        self._asked: dict[str, float] = {}
        """Per route, when (monotonic) this replica's requests last asked for its trial."""

    # --- the request path: local memory only ---------------------------------------------------------

    def allows(self, route: str, epoch: int) -> bool:
        """Whether this replica may send ``route``'s trial of generation ``epoch`` now; the ask is recorded first,
        so a sync giving the grant back at this moment sees it and keeps the grant."""
        now = time.monotonic()
        last = self._asked.get(route, -math.inf)
        self._asked[route] = now
        grant = self.grants.get(route)
        if grant is None and now - last >= self.ttl_s:
            self.wake()  # a new ask: claim the trial now rather than at the next refresh
        return grant is not None and grant.allows(epoch)

    def held(self) -> list[str]:
        """The routes whose trial lock this replica holds (to give back when it leaves)."""
        return list(self.grants)

    def live(self) -> list[str]:
        """The routes whose trial this replica may send now (a grant whose lock cannot have expired)."""
        now = time.monotonic()
        return sorted(name for name, grant in self.grants.items() if grant.until > now)

    def clear(self) -> None:
        """Redis is out of reach (or this is a forked child): no lock is this replica's any more."""
        self.grants = {}

    # --- the sync thread ----------------------------------------------------------------------------

    def split(self) -> tuple[list[str], list[str]]:
        """(give back, renew): the locks this exchange releases and those it renews. A grant given back admits no
        trial from this call on; one its requests asked for meanwhile is kept after all."""
        grants = self.grants
        drop = [name for name, grant in grants.items() if not self._keeps(name, grant)]
        if drop:
            self.grants = {name: grant for name, grant in grants.items() if name not in drop}
            kept = {name: grants[name] for name in drop if self._keeps(name, grants[name])}  # asked for meanwhile
            if kept:
                self.grants = {**self.grants, **kept}
                drop = [name for name in drop if name not in kept]
        return drop, list(self.grants)

    def wanted(self) -> list[tuple[str, int]]:
        """(route, breaker generation) of the trials to claim: asked for, due (open, cooled down), not held."""
        now = time.monotonic()
        return [
            (name, route.breaker.epoch)
            for name, route in self.routes.items()
            if name not in self.grants and now - self._asked.get(name, -math.inf) < self.ttl_s
            and route.breaker.wants_trial()
        ]  # fmt: skip

    def settle(
        self, renewed: list[str], renewals: list[bool], wanted: list[tuple[str, int]], claims: list[bool], sent: float
    ) -> None:
        """Keep the grants whose lock the exchange sent at ``sent`` renewed or took, each until ``sent + ttl``."""
        grants, until = dict(self.grants), sent + self.ttl_s
        for name, held in zip(renewed, renewals, strict=True):
            grant = grants.pop(name, None)
            if held and grant is not None:
                grants[name] = TrialGrant(grant.epoch, until)
            # else: the lock lapsed and another replica took it: its trial now, not this one's
        for (name, epoch), held in zip(wanted, claims, strict=True):
            if held:
                grants[name] = TrialGrant(epoch, until)
        self.grants = grants

    def _keeps(self, name: str, grant: TrialGrant) -> bool:
        """Whether a grant stands: its breaker still open in the granted generation, and its trial taken (half-open,
        or cooling down again) or asked for within the TTL."""
        breaker = self.routes[name].breaker
        is_open, _, epoch = breaker.reading()
        if not is_open or epoch != grant.epoch:
            return False
        asked = time.monotonic() - self._asked.get(name, -math.inf) < self.ttl_s
        return asked or not breaker.wants_trial()


def _nothing() -> None:
    """No sync thread to wake."""

"""``lb_policy: prefix_aware``: send a prompt where its prefix is most likely cached, unless that server is overloaded.

Registered by ``policies.py`` (which imports this module last); see :class:`PrefixAware`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from .. import forks
from .policies import STALE_AFTER_S, Request, Turns, Usable, _fewest, _usable, register
from .prefix_index import BLOCK_CHARS, MAX_BLOCKS_PER_ROUTE, PrefixIndex

if TYPE_CHECKING:
    from ..endpoints.route import Route


MATCH_THRESHOLD = 0.5
"""``prefix_aware``: a route whose cached prefix covers this share of the prompt is a hit (SGLang: 0.3-0.5)."""
BALANCE_ABS = 2.0
"""``prefix_aware`` leaves a hit for the least loaded route when the hit's load is this much higher..."""
BALANCE_REL = 1.5
"""...and this many times higher (both: a small fleet at low load keeps its affinity)."""
FOOTPRINT_RATIO = 1.25
"""A miss leaves the least loaded route for the one with the smallest index when the least loaded one's
index is this many times larger (plus the prompt's own blocks), and the smaller one is not overloaded."""
KV_FULL = 0.95
"""A server whose KV cache is this full (``/metrics``) is overloaded when the least loaded one has room."""
KV_ROOM = 0.25
"""How much emptier the least loaded server's KV cache must be for ``KV_FULL`` to count."""


class FleetIndex(Protocol):
    """Where the policy also reports what it records, to share it with other replicas (``fleet/redis_prefix.py``)."""

    def recorded(self, route: str, blocks: Sequence[int], depth: int) -> None: ...

    def restarted(self, route: str) -> None: ...

    def left(self, route: str) -> None: ...

    def fleet_hit_rates(self) -> dict[str, float | None]: ...


@register
class PrefixAware:
    """The route that most likely holds the prompt's prefix in its KV cache, unless it is overloaded.

    Each route's recent prompts are kept as chained block hashes in a bounded LRU index
    (:class:`~.prefix_index.PrefixIndex`); a prompt's blocks cover every part a server caches (text,
    image and audio payloads or URLs, other parts in a canonical form), read no further than the
    hashing cap (:func:`~.prefix_index.conversation_blocks`). A request goes to the usable route with the longest
    cached match when that match is a hit (at least ``match_threshold`` of the prompt) and that
    route is not overloaded against the least loaded one (``balance_abs`` more *and* ``balance_rel``
    times more load, or a full KV cache beside one with room); otherwise it goes to the least loaded
    route (ties take turns, so a prefix every prompt shares does not pull them all to one), or to the
    route with the smallest index when the least loaded one's is ``FOOTPRINT_RATIO`` times larger and
    the smaller one is not overloaded (so new contexts split the fleet's caches evenly). Either
    way the chosen route records the prompt, so a miss seeds the prefix where it went and a
    conversation keeps its route as it grows (its earlier turns are a prefix of the next).

    Load is this router's in-flight count plus, where ``/metrics`` is read, the other clients'
    requests on the server at the last scrape, per unit of weight; KV-cache use breaks ties. A route
    whose breaker has opened since it was last seen, or whose server's prefix-cache counters went
    back (``/metrics``), is forgotten: its server may have restarted with an empty cache.
    ``hit_rates()`` gives, per route, the share of prompt blocks the index predicted cached.

    With shared state (``state: {backend: redis}``) the router sets ``fleet``: what this policy records
    is pushed to the fleet's index and what the other replicas record is adopted into this one
    (``fleet/redis_prefix.py``), so each replica places a prompt knowing where every replica sent its prefix.
    """

    name: ClassVar[str] = "prefix_aware"

    def __init__(
        self,
        match_threshold: float = MATCH_THRESHOLD,
        balance_abs: float = BALANCE_ABS,
        balance_rel: float = BALANCE_REL,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS_PER_ROUTE,
        scrape_metrics: bool = True,
        stale_after: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < match_threshold <= 1 or balance_abs < 0 or balance_rel < 1 or block_chars < 1 or max_blocks < 1:
            raise ValueError(
                "prefix_aware needs 0 < match_threshold <= 1, balance_abs >= 0, balance_rel >= 1, "
                "block_chars >= 1 and max_blocks >= 1"
            )
        self.match_threshold = match_threshold
        self.balance_abs, self.balance_rel, self.block_chars = balance_abs, balance_rel, block_chars
        self.scrapes_metrics = scrape_metrics
        self.index = PrefixIndex(max_blocks)
        self.stale_after = stale_after
        self._clock = clock
        self._turn = Turns()
        self._lock = forks.lock()
        self._epochs: dict[str, int] = {}
        self._queries: dict[str, float] = {}
        """Per route: the server's ``vllm:prefix_cache_queries_total`` at the last pick (it goes back on a restart)."""
        self.fleet: FleetIndex | None = None
        """The fleet's shared index (None: this replica's own only)."""
        self._blocks: dict[str, list[int]] = {}
        """Per route: [blocks predicted cached, blocks sent]."""

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        candidates = _usable(routes, usable)
        if not candidates:
            return None
        self._forget_restarted(candidates)
        now = self._clock()
        loads = {route.name: self._load(route, now) for route in candidates}
        turn = self._turn(routes)
        least = _fewest(candidates, lambda route: loads[route.name], turn)
        assert least is not None
        blocks = request.prefix_blocks(self.block_chars) if request is not None else ()
        if not blocks:
            return least
        depths = self.index.match([route.name for route in candidates], blocks)
        top = max(depths.values())
        chosen = None
        if top >= self.match_threshold * len(blocks):  # a hit somewhere
            if depths[least.name] == top:
                chosen = least
            else:
                best = _fewest([r for r in candidates if depths[r.name] == top], lambda r: loads[r.name], turn)
                assert best is not None
                if not self._overloaded(loads[best.name], loads[least.name]):
                    chosen = best
        if chosen is None:  # a miss, or the hit's route is overloaded
            chosen = self._spread(candidates, least, loads, len(blocks))
        self._sent(chosen.name, blocks, depths[chosen.name])
        return chosen

    def _spread(self, candidates: list[Route], least: Route, loads: dict[str, tuple[float, float]], size: int) -> Route:
        """Where a miss goes: the least loaded route, unless its index (the prefixes it caches) is much
        larger than another's that is not overloaded next to it; so new contexts split the fleet's caches
        evenly instead of following whichever server happened to be idle (SGLang's smallest tree). Sizes
        are per unit of ``weight``: a route of weight 3 is taken to hold three times the cache."""
        sizes = {route.name: self.index.size(route.name) / route.weight for route in candidates}
        small = min(candidates, key=lambda route: sizes[route.name])
        if small is least or sizes[least.name] < FOOTPRINT_RATIO * sizes[small.name] + size / least.weight:
            return least
        return least if self._overloaded(loads[small.name], loads[least.name]) else small

    def note(self, route: Route, request: Request) -> None:
        """``route`` takes ``request`` without a pick (its conversation is pinned there): record the prompt."""
        blocks = request.prefix_blocks(self.block_chars)
        if blocks:
            self._sent(route.name, blocks, self.index.depth(route.name, blocks))

    def _sent(self, route: str, blocks: Sequence[int], depth: int) -> None:
        self.index.record(route, blocks)
        if (fleet := self.fleet) is not None:
            fleet.recorded(route, blocks, depth)
        with self._lock:
            tally = self._blocks.setdefault(route, [0, 0])
            tally[0] += depth
            tally[1] += len(blocks)

    def _load(self, route: Route, now: float) -> tuple[float, float]:
        """(requests queued or running per unit of weight, KV-cache use) as far as this router can tell.

        Its own in-flight requests, exactly, plus what *other* clients had on the server at the last
        fresh ``/metrics`` reading (running + waiting, less this router's share then). Unlike
        ``least_queue``'s estimate it forgets a request of ours that finished since the scrape, so
        a lone client balances as ``least_outstanding`` would.
        """
        in_flight = route.stats.in_flight
        load = route.load
        if load is None or now - load.scraped_at > self.stale_after:
            return in_flight / route.weight, 0.0
        others = max(0.0, load.running + load.waiting - load.own_in_flight)
        return (others + in_flight) / route.weight, load.kv_usage

    def _overloaded(self, best: tuple[float, float], least: tuple[float, float]) -> bool:
        """Whether the route with the match is too loaded next to the least loaded one ((queue, KV use) each)."""
        (queue, kv), (least_queue, least_kv) = best, least
        if queue - least_queue >= self.balance_abs and queue >= self.balance_rel * least_queue:
            return True
        return kv >= KV_FULL and least_kv <= kv - KV_ROOM

    def adopt(self, route: Route, hashes: list[int]) -> None:
        """Blocks other replicas sent ``route`` (``fleet/redis_prefix.py``), least recent first: indexed as if sent.

        The route's breaker generation is noted now if it was not (a replica that never picked the route
        still knows what its cache held), so a restart after this is seen at the next pick."""
        with self._lock:
            self._epochs.setdefault(route.name, route.breaker.epoch)
        self.index.adopt(route.name, hashes)

    def _forget_restarted(self, routes: Sequence[Route]) -> None:
        """Forget the index of a route whose breaker opened, or whose server's prefix-cache query counter went
        back, since the last pick: its server may have restarted, its cache is gone."""
        for route in routes:
            name, epoch = route.name, route.breaker.epoch
            restarted = self._epochs.get(name, epoch) != epoch
            self._epochs[name] = epoch
            queries = route.load.prefix_queries if route.load is not None else None
            if queries is not None:
                restarted |= queries < self._queries.get(name, queries)
                self._queries[name] = queries
            if restarted:
                self.index.forget(name)
                if (fleet := self.fleet) is not None:
                    fleet.restarted(name)

    def forget(self, route: str) -> None:
        """``route`` left the router: release its part of the index and its hit-rate tally."""
        self.index.forget(route)
        if (fleet := self.fleet) is not None:
            fleet.left(route)
        with self._lock:
            self._epochs.pop(route, None)
            self._queries.pop(route, None)
            self._blocks.pop(route, None)

    def tallies(self) -> dict[str, tuple[int, int]]:
        """Per route: (blocks the index predicted cached, blocks sent) of the prompts this router sent there."""
        with self._lock:
            return {name: (hit, sent) for name, (hit, sent) in self._blocks.items()}

    def hit_rates(self) -> dict[str, float | None]:
        """Per route: the share of the prompt blocks this router sent there that the index predicted cached."""
        return {name: (hit / sent if sent else None) for name, (hit, sent) in self.tallies().items()}

    def fleet_hit_rates(self) -> dict[str, float | None]:
        """Per route: the same over every replica of the fleet (shared state); empty when the index is not shared."""
        fleet = self.fleet
        return fleet.fleet_hit_rates() if fleet is not None else {}

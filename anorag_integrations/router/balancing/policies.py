"""Load-balancing policies: each is one small object with one method, ``pick(routes, usable, request)``.

The router passes every primary route, a predicate telling which may take this request now
(breaker closed or half-open, not under a ``Retry-After``, not yet tried) and the request (for
policies that route by content); the policy returns one for which the predicate holds, or None.
Small fleets are scanned exactly; above ``EXACT_LIMIT`` routes the load-aware policies use the
power of two random choices (Envoy's and NGINX's answer at scale), so a pick stays O(1) with a
thousand routes. A new policy is a new class registered with ``@register``. The prefix-cache-aware
policy, ``prefix_aware``, lives beside this file in ``prefix_aware.py`` with its index in ``prefix_index.py``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from .. import forks

if TYPE_CHECKING:
    from ..endpoints.route import Route

Usable = Callable[["Route"], bool]

EXPLORE_AFTER_S = 1.0
"""``least_latency`` re-measures a route it has not picked for this many seconds."""
EXACT_LIMIT = 16
"""Up to this many routes a policy scans them all; above it, it samples."""
SAMPLE_TRIES = 8
"""Random draws a sampling policy makes to find usable routes before falling back to a scan."""


class Request(Protocol):
    """What a policy may read of the request it places."""

    def prefix_key(self, chars: int) -> int:
        """A stable 64-bit hash of the conversation's first ``chars`` characters."""
        ...

    def prefix_blocks(self, block_chars: int) -> Sequence[int]:
        """The chained hashes of the conversation's blocks of ``block_chars`` characters (see prefix_index)."""
        ...


class Policy(Protocol):
    name: ClassVar[str]

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        """One of ``routes`` for which ``usable`` holds, or None when there is none."""
        ...


POLICIES: dict[str, Callable[..., Policy]] = {}
_P = TypeVar("_P", bound="type[Policy]")


def register(cls: _P) -> _P:
    """Class decorator: make a policy selectable by its ``name`` in ``lb_policy``."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **options: Any) -> Policy:
    """The policy registered as ``name``, built with its options from the config."""
    try:
        return POLICIES[name](**options)
    except KeyError:
        raise ValueError(f"unknown lb_policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None


CACHED_LISTS = 256
"""Route lists (model groups) whose derived data (weights, a hash ring) a policy keeps; more: it starts over."""


def list_key(routes: Sequence[Route]) -> object:
    """What identifies a route list for a policy's caches: a model group's generation (new whenever its
    members change), else the list's identity and length."""
    generation = getattr(routes, "generation", None)
    return generation if generation is not None else (id(routes), len(routes))


class Turns:
    """A counter per route list (model group): each group's rotation and ties take turns on their own (one
    counter shared by 50 groups called in turn would step 50 at a time and visit 2 of a group's 20 routes)."""

    def __init__(self) -> None:
        self._counters: dict[object, Iterator[int]] = {}

    def __call__(self, routes: Sequence[Route]) -> Iterator[int]:
        key = list_key(routes)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= CACHED_LISTS:
                self._counters.clear()
            counter = self._counters[key] = itertools.count()
        return counter


def _usable(routes: Sequence[Route], usable: Usable) -> list[Route]:
    return [route for route in routes if usable(route)]


def _sample_two(routes: Sequence[Route], usable: Usable) -> list[Route] | None:
    """Two distinct usable routes drawn at random, or None when the draws kept missing."""
    found: list[Route] = []
    for _ in range(SAMPLE_TRIES):
        route = routes[random.randrange(len(routes))]
        if route not in found and usable(route):
            found.append(route)
            if len(found) == 2:
                return found
    return None


@register
class RoundRobin:
    """Rotation; with unequal weights, smooth weighted round robin (nginx's).

    Smooth WRR adds every candidate's weight to its running score, takes the highest and lowers the
    winner by the total, so weights 3:1 give A A B A, never bursts. With equal weights a cursor
    walks the routes and skips unusable ones: O(1) per pick however many routes there are.
    """

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._lock = forks.lock()
        self._current: dict[str, float] = {}
        self._cursor = Turns()
        self._equal: dict[object, bool] = {}

    def _equal_weights(self, routes: Sequence[Route]) -> bool:
        """Whether all weights are equal; computed once per route list (a model group's members are fixed)."""
        key = list_key(routes)
        equal = self._equal.get(key)
        if equal is None:
            if len(self._equal) >= CACHED_LISTS:
                self._equal.clear()
            equal = self._equal[key] = len({route.weight for route in routes}) <= 1
        return equal

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        if self._equal_weights(routes):
            n, start = len(routes), next(self._cursor(routes))
            for i in range(n):
                route = routes[(start + i) % n]
                if usable(route):
                    return route
            return None
        return self._smooth(_usable(routes, usable))

    def forget(self, route: str) -> None:
        """``route`` left the router: drop its running score."""
        with self._lock:
            self._current.pop(route, None)

    def _smooth(self, candidates: list[Route]) -> Route | None:
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        with self._lock:
            total = 0.0
            best: Route | None = None
            best_score = 0.0
            for route in candidates:
                score = self._current.get(route.name, 0.0) + route.weight
                self._current[route.name] = score
                total += route.weight
                if best is None or score > best_score:
                    best, best_score = route, score
            assert best is not None
            self._current[best.name] = best_score - total
            return best


@register
class LeastLatency:
    """Lowest moving-average latency (time to first token for streams), with timed exploration.

    A route never measured gets one request, then waits for its answer (a burst to an unknown route
    is how a slow one gets flooded). A route not picked for ``explore_after_s`` seconds gets the next
    request, so a route that was slow once, or has just recovered, is re-measured without sending it
    a fixed share of the traffic.
    """

    name: ClassVar[str] = "least_latency"

    def __init__(self, explore_after_s: float = EXPLORE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.explore_after_s = explore_after_s
        self._clock = clock
        self._last_pick: dict[str, float] = {}

    def forget(self, route: str) -> None:
        """``route`` left the router: drop when it was last picked."""
        self._last_pick.pop(route, None)

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        now = self._clock()
        if len(routes) > EXACT_LIMIT and (pair := _sample_two(routes, usable)) is not None:
            candidates = pair
        else:
            candidates = _usable(routes, usable)
            if not candidates:
                return None
        for route in candidates:
            self._last_pick.setdefault(route.name, now)  # first seen now: the timer starts here
        stale = min(candidates, key=lambda r: self._last_pick[r.name])
        if now - self._last_pick[stale.name] >= self.explore_after_s:
            chosen = stale  # not picked for a while: re-measure it
        else:
            chosen = min(candidates, key=_latency_key)
        self._last_pick[chosen.name] = now
        return chosen


def _latency_key(route: Route) -> float:
    """Measured routes by their average; an unmeasured one first, unless its first answer is pending."""
    estimate = route.latency_estimate()  # the fleet's, with shared state
    if estimate is not None:
        return estimate
    return math.inf if route.stats.in_flight else -1.0


@register
class LeastOutstanding:
    """Fewest requests in flight (divided by weight); ties rotate so no route is always first.

    With shared state the count is the fleet's (``Route.outstanding``), so six replicas do not all
    pick the same idle-looking server.
    """

    name: ClassVar[str] = "least_outstanding"

    def __init__(self) -> None:
        self._turn = Turns()

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        if len(routes) > EXACT_LIMIT and (pair := _sample_two(routes, usable)) is not None:
            return min(pair, key=_load)
        return _fewest(_usable(routes, usable), _load, self._turn(routes))


def _fewest(candidates: list[Route], key: Callable[[Route], Any], turn: Iterator[int]) -> Route | None:
    """The candidate with the lowest ``key`` (read once each: loads move under us); ties take turns."""
    if not candidates:
        return None
    keys = [key(route) for route in candidates]
    best = min(keys)
    tied = [route for route, k in zip(candidates, keys, strict=True) if k == best]
    return tied[next(turn) % len(tied)]


def _load(route: Route) -> float:
    return route.outstanding / route.weight  # with shared state, the other replicas' requests count too


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


PREFIX_CHARS = 2000
"""Characters of the conversation ``prefix_affinity`` hashes by default (about 500 tokens)."""
LOAD_FACTOR = 1.25
"""``prefix_affinity``'s bound: no route takes more than this times the average in-flight load."""
VNODES = 64
"""Points per unit of weight each route gets on the hash ring (more: smoother key shares)."""


@register
class PrefixAffinity:
    """Consistent hashing of the prompt's leading characters, with bounded load.

    Requests whose first ``prefix_chars`` characters are equal go to the same route, whose engine
    then reuses the KV cache of that prefix (vLLM's prefix caching, llama.cpp's slot cache). Each
    route owns ``64 * weight`` points on a hash ring; a key goes to the first route clockwise that
    is usable and has fewer than ``load_factor * (in flight + 1) * weight / total weight`` requests
    in flight (Mirrokni et al., consistent hashing with bounded loads), so one hot prefix spills
    over instead of queueing. A route that goes down hands its keys to its ring successors only;
    when it comes back the same keys return to it.
    """

    name: ClassVar[str] = "prefix_affinity"

    def __init__(self, prefix_chars: int = PREFIX_CHARS, load_factor: float = LOAD_FACTOR) -> None:
        if prefix_chars < 1 or load_factor < 1:
            raise ValueError("prefix_affinity needs prefix_chars >= 1 and load_factor >= 1")
        self.prefix_chars = prefix_chars
        self.load_factor = load_factor
        self._rings: dict[object, tuple[list[int], list[Route]]] = {}
        self._spread = LeastOutstanding()

    def _points(self, routes: Sequence[Route]) -> tuple[list[int], list[Route]]:
        """The ring (sorted points, the route at each point); built once per route list (model group)."""
        key = list_key(routes)
        ring = self._rings.get(key)
        if ring is None:
            points = sorted(
                (stable_hash(f"{route.name}#{i}"), n)
                for n, route in enumerate(routes)
                for i in range(max(1, round(VNODES * route.weight)))
            )
            if len(self._rings) >= CACHED_LISTS:
                self._rings.clear()
            ring = self._rings[key] = ([p for p, _ in points], [routes[n] for _, n in points])
        return ring

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        if request is None:
            return self._spread.pick(routes, usable)
        points, owners = self._points(routes)
        total_weight = sum(route.weight for route in routes)
        budget = self.load_factor * (sum(route.stats.in_flight for route in routes) + 1) / total_weight
        start = bisect.bisect(points, request.prefix_key(self.prefix_chars))
        seen: set[str] = set()
        spill: Route | None = None
        for i in range(len(points)):
            if len(seen) == len(routes):
                break
            route = owners[(start + i) % len(points)]
            if route.name in seen:
                continue
            seen.add(route.name)
            if not usable(route):
                continue
            if route.stats.in_flight < math.ceil(budget * route.weight):
                return route
            if spill is None or _load(route) < _load(spill):
                spill = route  # every usable route is over its bound: the least loaded one
        return spill


STALE_AFTER_S = 5.0
"""``least_queue`` ignores a ``/metrics`` reading older than this and uses in-flight counts."""


@register
class LeastQueue:
    """Shortest server-side queue, read from each route's ``/metrics``; KV-cache use breaks ties.

    Depth is the server's running + waiting requests at the last scrape plus the requests this
    router has started there since (so a burst between scrapes spreads), per unit of weight. A route
    without a fresh reading (no ``/metrics``, a failed or stale scrape) counts its in-flight
    requests instead. The router scrapes every ``least_queue.interval`` seconds (see ``Router``).
    """

    name: ClassVar[str] = "least_queue"
    scrapes_metrics: ClassVar[bool] = True

    def __init__(self, stale_after: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after = stale_after
        self._clock = clock
        self._turn = Turns()

    def depth(self, route: Route, now: float) -> tuple[float, float]:
        """(queue depth per weight, KV-cache use) as this policy sees the route now."""
        in_flight = route.stats.in_flight
        load = route.load
        if load is None or now - load.scraped_at > self.stale_after:
            return in_flight / route.weight, 0.0
        since = max(0, in_flight - load.own_in_flight)
        return (load.running + load.waiting + since) / route.weight, load.kv_usage

    def pick(self, routes: Sequence[Route], usable: Usable, request: Request | None = None) -> Route | None:
        now = self._clock()
        if len(routes) > EXACT_LIMIT and (pair := _sample_two(routes, usable)) is not None:
            return min(pair, key=lambda route: self.depth(route, now))
        return _fewest(_usable(routes, usable), lambda route: self.depth(route, now), self._turn(routes))


from . import prefix_aware as _prefix_aware  # noqa: E402, F401 - registers ``prefix_aware`` (it builds on the above)

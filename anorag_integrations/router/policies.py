"""Load-balancing policies: each is one small object with one method, ``pick(candidates)``.

The router passes the routes that may take a request now (breaker closed or half-open, not under a
``Retry-After``, not yet tried for this request) and sends to the one picked; on a transient failure
it calls ``pick`` again without the failed route. A new policy is a new class registered with
``@register``; the router never changes for it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

if TYPE_CHECKING:
    from .route import Route

EXPLORE_EVERY = 20
"""``least_latency`` sends every N-th pick to the route sampled longest ago (5% exploration)."""


class Policy(Protocol):
    name: ClassVar[str]

    def pick(self, candidates: Sequence[Route]) -> Route:
        """Choose one of ``candidates`` (never empty)."""
        ...


POLICIES: dict[str, Callable[[], Policy]] = {}
_P = TypeVar("_P", bound="type[Policy]")


def register(cls: _P) -> _P:
    """Class decorator: make a policy selectable by its ``name`` in ``lb_policy``."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown lb_policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None


@register
class RoundRobin:
    """Smooth weighted round robin (nginx's): with equal weights, plain rotation.

    Each pick adds every candidate's weight to its running score, takes the highest, and lowers the
    winner by the total, so weights 3:1 give A A B A, never bursts, and skipped routes lose nothing.
    """

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, float] = {}

    def pick(self, candidates: Sequence[Route]) -> Route:
        if len(candidates) == 1:
            return candidates[0]
        with self._lock:
            current = self._current
            total = 0.0
            best: Route | None = None
            best_score = 0.0
            for route in candidates:
                score = current.get(route.name, 0.0) + route.weight
                current[route.name] = score
                total += route.weight
                if best is None or score > best_score:
                    best, best_score = route, score
            assert best is not None
            current[best.name] = best_score - total
            return best


@register
class LeastLatency:
    """Lowest moving-average latency (time to first token for streams), with exploration.

    Routes never measured are tried first; every ``EXPLORE_EVERY``-th pick goes to the candidate
    measured longest ago, so a route that was slow once, or has just recovered, gets re-measured.
    """

    name: ClassVar[str] = "least_latency"

    def __init__(self, explore_every: int = EXPLORE_EVERY) -> None:
        self.explore_every = explore_every
        self._picks = itertools.count(1)
        self._last_pick: dict[str, int] = {}

    def pick(self, candidates: Sequence[Route]) -> Route:
        n = next(self._picks)
        if self.explore_every and n % self.explore_every == 0 and len(candidates) > 1:
            chosen = min(candidates, key=lambda r: self._last_pick.get(r.name, 0))
        else:
            chosen = min(candidates, key=_latency_key)
        self._last_pick[chosen.name] = n
        return chosen


def _latency_key(route: Route) -> float:
    ewma = route.stats.ewma_latency_s
    return -1.0 if ewma is None else ewma


@register
class LeastOutstanding:
    """Fewest requests in flight (divided by weight); ties rotate so no route is always first."""

    name: ClassVar[str] = "least_outstanding"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[Route]) -> Route:
        loads = [route.stats.in_flight / route.weight for route in candidates]  # one read: they move
        best_load = min(loads)
        tied = [route for route, load in zip(candidates, loads, strict=True) if load == best_load]
        return tied[next(self._turn) % len(tied)]

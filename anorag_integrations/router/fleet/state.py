"""Where a router keeps what it learns about the fleet: in this process alone, or shared through Redis.

Many app processes (gunicorn or uvicorn workers, pods) each run a router over the same servers.
With ``state: {backend: local}`` (the default) each learns on its own. With ``backend: redis``
(``redis_state.py``) they share what one replica learns with the others:

=========================  ====================================================================
breaker transitions        an open breaker opens everywhere; one replica in the fleet owns each
                           half-open trial; the trial's success closes the breaker everywhere
``Retry-After``            a route that throttled one replica is skipped by all until then
probe results              one replica (the route's leader) probes each route; all read the result
in-flight counts           each replica's own counts under a key that expires; ``least_outstanding``
                           adds the other replicas' counts to its own
latency estimate           ``least_latency`` averages its own estimate with the other replicas'
prefix index               ``prefix_aware``'s blocks sent per route, so every replica knows where each
                           prompt's prefix went, whichever replica sent it (``redis_prefix.py``)
hedge budget               one token bucket for the fleet (``hedge.max_rate`` of all its requests)
retry budget               retries and failovers judged against the fleet's calls and retries over
                           ``retry_budget.window`` (each replica adds its counts at every sync)
=========================  ====================================================================

The request path never waits on Redis: a pick reads local memory only. The hooks below record a
change in local memory and wake a background thread, which publishes it and refreshes the fleet's
state every ``refresh_interval`` (sooner when another replica announces a change).

A fleet is the replicas whose routes are the same: unless ``state.namespace`` names it, its
namespace is derived from its routes (``fleet_namespace``), so two apps on one Redis never share a
breaker by accident, and replicas of one config always find each other.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..secrets import redact_url

if TYPE_CHECKING:
    from ...config import StateConfig
    from ..admission import RetryBudget
    from ..endpoints.route import Route
    from ..hedge import Hedger
    from .redis_prefix import Learner, PrefixShare


@dataclass(slots=True)
class Elsewhere:
    """What the other replicas of the fleet report about one route (all zero with local state)."""

    in_flight: int = 0
    """Requests the other live replicas have in flight on the route."""
    latency_sum: float = 0.0
    """Sum of the other replicas' moving-average latencies of the route (seconds)..."""
    latency_n: int = 0
    """...over this many replicas that have measured it."""

    def clear(self) -> None:
        self.in_flight, self.latency_sum, self.latency_n = 0, 0.0, 0


@dataclass(frozen=True, slots=True)
class TrialGrant:
    """The fleet's half-open trial of one route, granted to this replica for one breaker generation.

    ``until`` is when the grant's lock in Redis expires at the earliest (measured from before the
    exchange that took or renewed it was sent): past it another replica may hold the lock, so this
    one sends no trial until a renewal says the lock is still its own.
    """

    epoch: int
    """The breaker's generation the trial belongs to."""
    until: float
    """Monotonic time past which the grant no longer counts here."""

    def allows(self, epoch: int) -> bool:
        """Whether this grant lets the breaker in generation ``epoch`` send its trial now."""
        return self.epoch == epoch and time.monotonic() < self.until


NAMESPACE_PREFIX = "anorag-"
"""What a derived namespace starts with (``fleet_namespace``)."""
NAMESPACE_HASH_CHARS = 12
"""Hex digits of the routes' hash in a derived namespace (48 bits)."""


def fleet_namespace(routes: Iterable[tuple[str, str, str]]) -> str:
    """The namespace of the fleet whose routes are ``routes`` ((name, base URL, model) each).

    ``anorag-`` and a hash of the routes sorted by name (URLs with credentials masked), stable across
    processes, hosts and Python hash seeds: replicas of one config derive the same namespace, and
    an app whose routes differ in any name, URL or model derives another.
    """
    fleet = sorted([name, redact_url(url), model] for name, url, model in routes)
    digest = hashlib.sha256(json.dumps(fleet, separators=(",", ":")).encode()).hexdigest()
    return NAMESPACE_PREFIX + digest[:NAMESPACE_HASH_CHARS]


class State(Protocol):
    """The router's state backend. Hooks are called on the request path and touch local memory only."""

    backend: str

    def start(self) -> None:
        """Start the background work, having read the fleet's state once (bounded; no-op for local state)."""
        ...

    def set_routes(self, routes: Mapping[str, Route]) -> None:
        """The router's routes changed while serving (added, removed, replaced): share about these from now on."""
        ...

    def stop(self) -> None:
        """Stop the background work and give up what this replica holds in the fleet (leaderships)."""
        ...

    def halt(self) -> None:
        """Ask the background work to stop without waiting (safe from a finaliser)."""
        ...

    def leads(self, route: Route) -> bool:
        """Whether this replica probes ``route`` (the fleet elects one prober per route)."""
        ...

    def probing_started(self) -> None:
        """This router's prober runs: it may be elected to probe routes for the fleet."""
        ...

    def status(self) -> dict[str, Any]:
        """What the backend is doing, fit to show (no credentials)."""
        ...

    def share_prefixes(self, policies: Mapping[str, Learner], max_blocks: int, block_chars: int) -> PrefixShare | None:
        """Share the ``prefix_aware`` policies' indexes (per route kind) with the fleet; None: not shared (local state).

        Called before ``start``, so a replica's first sync reads the fleet's index."""
        ...


class LocalState:
    """Today's behaviour: every replica learns on its own; nothing runs in the background."""

    backend = "local"

    def start(self) -> None:
        pass

    def set_routes(self, routes: Mapping[str, Route]) -> None:
        pass

    def stop(self) -> None:
        pass

    def halt(self) -> None:
        pass

    def leads(self, route: Route) -> bool:
        return True

    def probing_started(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def share_prefixes(self, policies: Mapping[str, Learner], max_blocks: int, block_chars: int) -> PrefixShare | None:
        return None

    def __repr__(self) -> str:
        return "LocalState()"


def make_state(
    config: StateConfig,
    routes: Mapping[str, Route],
    hedger: Hedger | None,
    label: str,
    max_retry_after: float,
    retry_budget: RetryBudget | None = None,
) -> State:
    """The backend ``config`` asks for; Redis needs the ``redis`` extra (``pip install anorag-integrations[redis]``).

    With Redis, ``hedger`` and ``retry_budget`` count fleet-wide; local state leaves them this replica's own.
    """
    if config.backend == "local":
        return LocalState()
    try:
        from .redis_state import RedisState
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "state.backend: redis needs the redis client: pip install 'anorag-integrations[redis]'"
        ) from exc
    return RedisState(config, routes, hedger, label, max_retry_after, retry_budget)

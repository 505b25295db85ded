"""A route's queue, read from its server's Prometheus ``/metrics`` (for ``lb_policy: least_queue``).

vLLM exports ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:kv_cache_usage_perc`` (servers before v0.10: ``vllm:gpu_cache_usage_perc``); llama.cpp's
``--metrics`` exports ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``. vLLM's
prefix-cache counters are read too (``prefix_aware`` reports the measured hit rate). Samples of
one name are summed over their labels (one per engine under data parallelism). Parsing is
prometheus_client's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
"""Each signal's metric names, newest first: the first one a server exports is used."""
PREFIX_HITS = ("vllm:prefix_cache_hits_total",)
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total",)
"""vLLM's automatic prefix caching, in prompt tokens since the server started (``prefix_aware``'s stats)."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One scrape: requests running and waiting on the server, KV-cache use (0-1), when, and our share.

    ``own_in_flight`` is how many requests this router had in flight at the scrape; requests it has
    sent since are added to ``running`` by the policy, so a burst between two scrapes does not all
    land on the route that looked emptiest.
    """

    running: float
    waiting: float
    kv_usage: float
    scraped_at: float
    own_in_flight: int
    prefix_hits: float | None = None
    prefix_queries: float | None = None

    @property
    def prefix_hit_rate(self) -> float | None:
        """The server's prefix-cache hit rate since it started (prompt tokens found cached), when it exports one."""
        hits, queries = self.prefix_hits, self.prefix_queries
        if hits is None or queries is None or not (0 <= hits <= queries) or not 0 < queries < math.inf:
            return None  # nothing asked yet, or counters no cache could produce (NaN, negative, hits > queries)
        return hits / queries


def parse_load(text: str, own_in_flight: int, now: float | None = None) -> LoadReport | None:
    """The load signals in a ``/metrics`` page, or None when it has no queue metric we know."""
    values: dict[str, float] = {}
    wanted = set(RUNNING + WAITING + KV_USAGE + PREFIX_HITS + PREFIX_QUERIES)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    running, waiting = _first(values, RUNNING), _first(values, WAITING)
    if running is None and waiting is None:
        return None
    return LoadReport(
        running=running or 0.0,
        waiting=waiting or 0.0,
        kv_usage=_first(values, KV_USAGE) or 0.0,
        scraped_at=time.monotonic() if now is None else now,
        own_in_flight=own_in_flight,
        prefix_hits=_first(values, PREFIX_HITS),
        prefix_queries=_first(values, PREFIX_QUERIES),
    )


def _first(values: dict[str, float], names: Iterable[str]) -> float | None:
    return next((values[name] for name in names if name in values), None)

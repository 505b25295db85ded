"""The records replicas leave in Redis, written and read in one place.

``redis_sync.py`` and ``redis_adopt.py`` decide what to do with them.

Every reader checks what it reads: a record is another process's word (another version, a hand
edit), so a malformed one raises ``ValueError``/``TypeError``/``KeyError`` for the caller to skip,
and numbers that are not plausible (non-finite times, negative counts) never reach a route. Times
cross processes as Unix time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from .state import Elsewhere

if TYPE_CHECKING:
    from ..endpoints.probe import ProbeResult
    from ..endpoints.route import Route

MAX_PEER_IN_FLIGHT = 1_000_000
"""A replica's in-flight count past this is not a count (a tampered key): ignored."""

MAX_CLOCK_AHEAD_S = 60.0
"""How far ahead of this host's clock another replica's clock may be; a probe time further on is malformed."""

MALFORMED = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
"""What reading a malformed record raises (RecursionError: JSON nested deeper than Python recurses)."""


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """One replica's word on a route's breaker: it opened (or closed) at ``at``."""

    is_open: bool
    at: float
    """Unix time."""
    by: str
    """The replica."""
    n: int
    """Its sequence number: a record is adopted once."""

    def dumps(self) -> str:
        return json.dumps({"open": self.is_open, "at": self.at, "by": self.by, "n": self.n})

    @classmethod
    def loads(cls, raw: str) -> BreakerRecord:
        record = json.loads(raw)
        at = float(record["at"])
        if not math.isfinite(at):
            raise ValueError(f"time {at}")
        return cls(bool(record["open"]), at, str(record["by"]), int(record["n"]))


def throttle_record(not_before: float) -> str:
    """A route's Retry-After (``not_before``, monotonic) as Redis keeps it."""
    return repr(wall(not_before))


def read_throttle(raw: str, max_retry_after: float) -> float | None:
    """Until when (monotonic) another replica's Retry-After holds, bounded by ``max_retry_after``; None if over."""
    until, now = float(raw), time.time()
    if not math.isfinite(until) or until <= now:
        return None
    return monotonic(min(until, now + max_retry_after))


def probe_record(result: ProbeResult, by: str) -> str:
    return json.dumps({**asdict(result), "by": by})


def read_probe(raw: str) -> tuple[str, ProbeResult]:
    """(the replica that probed, its result); fields a newer replica added are left out."""
    from ..endpoints.probe import ProbeResult

    record = json.loads(raw)
    by = str(record.pop("by"))
    known = {f.name for f in fields(ProbeResult)}
    result = ProbeResult(**{key: value for key, value in record.items() if key in known})
    at = result.checked_at
    if not isinstance(at, int | float | None):
        raise TypeError(f"checked_at {at!r}")
    if at is not None and not (math.isfinite(at) and at <= time.time() + MAX_CLOCK_AHEAD_S):
        raise ValueError(f"checked_at {at} is not a time of now or before")  # it would outrank every real probe
    return by, result


def load_record(routes: Mapping[str, Route]) -> str:
    """This replica's load: per route, [requests in flight, moving-average latency]."""
    return json.dumps({name: [r.stats.in_flight, r.stats.ewma_latency_s] for name, r in routes.items()})


def read_loads(raws: Iterable[Any], names: Iterable[str]) -> dict[str, Elsewhere]:
    """The other replicas' load records summed per route; entries that are not plausible counts are skipped."""
    reports = [report for raw in raws if isinstance(report := parsed(raw), dict)]
    out = {}
    for name in names:
        in_flight, latency_sum, latency_n = 0, 0.0, 0
        for report in reports:
            entry = report.get(name)
            if not isinstance(entry, list) or len(entry) != 2:
                continue
            count, latency = entry
            if type(count) is int and 0 < count < MAX_PEER_IN_FLIGHT:
                in_flight += count
            if type(latency) in (int, float) and 0 <= latency < math.inf:
                latency_sum += float(latency)
                latency_n += 1
        out[name] = Elsewhere(in_flight, latency_sum, latency_n)
    return out


def decoded(mapping: object) -> dict[str, str]:
    """A hash's fields as text; a command that failed (a key of another type) reads as empty."""
    if not isinstance(mapping, Mapping):
        return {}
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in mapping.items()}


def wall(monotonic_at: float) -> float:
    """A monotonic instant of this process as Unix time (what other processes can read)."""
    return monotonic_at - time.monotonic() + time.time()


def monotonic(unix_at: float) -> float:
    """A Unix time as a monotonic instant of this process."""
    return unix_at - time.time() + time.monotonic()


def parsed(raw: object) -> object:
    """JSON text (str or bytes) as Python, or None for anything that is not (nesting too deep included)."""
    if not isinstance(raw, bytes | str):
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None

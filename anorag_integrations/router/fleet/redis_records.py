"""The records replicas leave in Redis, written and read in one place.

``redis_sync.py`` and ``redis_adopt.py`` decide what to do with them; ``redis_peers.py`` reads the loads.

A record is another process's word (another version, a hand edit, a hostile peer), so it is read
as strictly as config: its size is checked before it is parsed, then its types and ranges (pydantic,
strict: ``"12.5"`` is not a number, ``1`` is not a boolean, ``-1`` is not a context window, ``5`` is
not a list of models). One that fails raises ``ValueError`` (pydantic's ``ValidationError`` is one)
and is never adopted; fields a newer replica added are left out. What this replica writes is trimmed
to the same limits, so its own records always read back. Times cross processes as Unix time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from ..endpoints.probe import ProbeResult
    from ..endpoints.route import Route

MAX_PEER_IN_FLIGHT = 1_000_000
"""A replica's in-flight count past this is not a count (a tampered key)."""
MAX_LATENCY_S = 86_400.0
"""A moving-average latency or a probe's past a day is not one."""
MAX_CLOCK_AHEAD_S = 60.0
"""How far ahead of this host's clock a probe time may be; one further on would outrank every real probe."""
MAX_CONTEXT = 1 << 31
"""The largest context window a probe record may report (a server saying -1 or 10**30 is not reporting one)."""
MAX_NAME_CHARS = 512
"""The longest replica name (host, pid, config name, random part)."""
MAX_MODELS = 100
"""Most served models a probe record lists (a longer list is trimmed by its writer)..."""
MAX_MODEL_NAME_CHARS = 256
"""...each named in at most this many characters."""
MAX_ERROR_CHARS = 2000
"""The longest probe error kept in a record (a longer one is cut by its writer)."""

MAX_BREAKER_BYTES = 1024
"""The longest breaker record read; longer ones are not parsed (about 100 bytes are written)."""
MAX_THROTTLE_BYTES = 32
"""The longest Retry-After record read (a Unix time, about 18 bytes)."""
MAX_PROBE_BYTES = 32_768
"""The longest probe record read (its writer trims the models it lists to stay under this)."""
MAX_LOAD_BYTES = 64
"""The longest per-route load value read (``[in flight, latency]``, about 30 bytes)."""
MAX_MESSAGE_BYTES = 65_536
"""The longest pub/sub message parsed; a longer one's news comes with the next read instead."""
MAX_BYTES = {"breakers": MAX_BREAKER_BYTES, "throttle": MAX_THROTTLE_BYTES, "probes": MAX_PROBE_BYTES}
"""The longest record of each fleet hash that a sync reads (longer ones never leave Redis)."""

MALFORMED = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
"""What reading a malformed record may raise (``ValidationError`` and ``JSONDecodeError`` are ``ValueError``)."""

_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
UnixTime = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Breaker(BaseModel):
    model_config = _STRICT
    open: bool
    at: UnixTime
    by: Name
    n: Annotated[int, Field(ge=0, lt=1 << 63)]


class _Probe(BaseModel):
    model_config = _STRICT
    by: Name
    healthy: bool | None = None
    latency_ms: Annotated[float, Field(ge=0, le=MAX_LATENCY_S * 1000, allow_inf_nan=False)] | None = None
    models: Annotated[list[Annotated[str, Field(max_length=MAX_MODEL_NAME_CHARS)]], Field(max_length=MAX_MODELS)] = []
    max_model_len: Annotated[int, Field(gt=0, le=MAX_CONTEXT)] | None = None
    error: Annotated[str, Field(max_length=MAX_ERROR_CHARS)] | None = None
    checked_at: UnixTime | None = None


class _Message(BaseModel):
    model_config = _STRICT
    by: Name
    breakers: dict[str, str] = {}


_THROTTLE = TypeAdapter(UnixTime, config=ConfigDict(strict=True))
_LOAD = TypeAdapter(
    tuple[
        Annotated[int, Field(ge=0, lt=MAX_PEER_IN_FLIGHT)],
        Annotated[float, Field(ge=0, le=MAX_LATENCY_S, allow_inf_nan=False)] | None,
    ],
    config=ConfigDict(strict=True),
)


def checked(raw: object, limit: int) -> str | bytes:
    """``raw`` if it is text of at most ``limit`` bytes (checked before anything parses it), else ValueError.

    An int is the size of a record Redis kept to itself (``redis_peers.py``: it was longer than the limit).
    """
    if isinstance(raw, int) and not isinstance(raw, bool):
        raise ValueError(f"{raw} bytes, more than the {limit} such a record takes (left in Redis)")
    if not isinstance(raw, str | bytes):
        raise TypeError(f"a {type(raw).__name__}, not text")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode(errors="surrogatepass"))
    if size > limit:
        raise ValueError(f"{size} bytes, more than the {limit} such a record takes")
    return raw


def why(exc: BaseException) -> str:
    """What was wrong with a record, in one short line (pydantic's first complaint, without a URL)."""
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


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
    def loads(cls, raw: object) -> BreakerRecord:
        record = _Breaker.model_validate_json(checked(raw, MAX_BREAKER_BYTES))
        return cls(record.open, record.at, record.by, record.n)


def read_message(raw: object) -> tuple[str, dict[str, str]]:
    """A message on the fleet's channel: (the replica that sent it, its breaker records by route)."""
    message = _Message.model_validate_json(checked(raw, MAX_MESSAGE_BYTES))
    return message.by, message.breakers


def throttle_record(not_before: float) -> str:
    """A route's Retry-After (``not_before``, monotonic) as Redis keeps it."""
    return repr(wall(not_before))


def read_throttle(raw: object, max_retry_after: float) -> float | None:
    """Until when (monotonic) another replica's Retry-After holds, bounded by ``max_retry_after``; None if over."""
    until, now = _THROTTLE.validate_json(checked(raw, MAX_THROTTLE_BYTES)), time.time()
    if until <= now:
        return None
    return monotonic(min(until, now + max_retry_after))


def probe_record(result: ProbeResult, by: str) -> str:
    """``result`` as Redis keeps it, trimmed to what a reader accepts (models listed, error length)."""
    record: dict[str, Any] = {**asdict(result), "by": by}
    record["models"] = [name for name in result.models if len(name) <= MAX_MODEL_NAME_CHARS][:MAX_MODELS]
    if result.error is not None:
        record["error"] = result.error[:MAX_ERROR_CHARS]
    length = result.max_model_len
    if not (isinstance(length, int) and 0 < length <= MAX_CONTEXT):
        record["max_model_len"] = None
    while len(text := json.dumps(record).encode()) > MAX_PROBE_BYTES and record["models"]:
        record["models"] = record["models"][: len(record["models"]) // 2]
    return text.decode()


def read_probe(raw: object) -> tuple[str, ProbeResult]:
    """(the replica that probed, its result); fields a newer replica added are left out."""
    from ..endpoints.probe import ProbeResult

    record = _Probe.model_validate_json(checked(raw, MAX_PROBE_BYTES))
    at = record.checked_at
    if at is not None and at > time.time() + MAX_CLOCK_AHEAD_S:
        raise ValueError(f"checked_at {at} is not a time of now or before")  # it would outrank every real probe
    return record.by, ProbeResult(**record.model_dump(exclude={"by"}))


def load_fields(routes: Mapping[str, Route]) -> list[str]:
    """This replica's load as a hash's fields and values: per route, ``[requests in flight, latency]``."""
    out: list[str] = []
    for name, route in routes.items():
        out += [name, json.dumps([route.stats.in_flight, route.stats.ewma_latency_s])]
    return out


def read_load(raw: object) -> tuple[int, float | None]:
    """Another replica's load of one route: (requests in flight, moving-average latency or None)."""
    return _LOAD.validate_json(checked(raw, MAX_LOAD_BYTES))


def read_time(raw: object) -> float:
    """A Unix time another replica wrote (its clock, as text)."""
    return _THROTTLE.validate_json(checked(raw, MAX_THROTTLE_BYTES))


def wall(monotonic_at: float) -> float:
    """A monotonic instant of this process as Unix time (what other processes can read)."""
    return monotonic_at - time.monotonic() + time.time()


def monotonic(unix_at: float) -> float:
    """A Unix time as a monotonic instant of this process."""
    return unix_at - time.time() + time.monotonic()

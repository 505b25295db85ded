"""The fault corpus soak and invariant runs inject: every way a route fails, each with what it means.

One list for both the soak benchmark (``benchmarks/soak.py``, a route flapping through it) and the
property tests (``tests/test_invariants.py``, random schedules over it). The options suit a short
reply of two words or more ("from a"): the mid-stream faults strike after the first chunk, and the
waits stay within the runs' route timeouts (0.4 s in the property tests)::

    for case in TRANSIENT_FAULTS:
        case.apply(server)          # server.set_fault(case.fault, **case.options)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .faults import Fault
from .malformed import MODELS_FAULTS

if TYPE_CHECKING:
    from .fault_server import FaultServer


@dataclass(frozen=True, eq=False)
class FaultCase:
    """One fault of the corpus, its options, what it stands for, and whether the router may heal it."""

    fault: Fault
    options: Mapping[str, Any] = field(default_factory=dict)
    meaning: str = field(default="", repr=False)  # kept out of the schedules hypothesis prints
    permanent: bool = field(default=False, repr=False)
    """A failure the router raises at once (a 4xx): no failover heals it, so callers see it."""

    def apply(self, server: FaultServer) -> None:
        """Switch ``server`` to this fault, until the next case is applied."""
        server.set_fault(self.fault, **self.options)


FAULT_CORPUS: tuple[FaultCase, ...] = (
    FaultCase(Fault.NONE, meaning="healthy again"),
    FaultCase(Fault.STATUS, {"status": 500}, "a server error: fail over, the breaker counts it"),
    FaultCase(Fault.STATUS, {"status": 503, "retry_after": "0.1"}, "overloaded, asks for a short wait"),
    FaultCase(Fault.STATUS, {"status": 429, "retry_after": "inf"}, "rate limited, an endless Retry-After"),
    FaultCase(Fault.STATUS, {"status": 429, "retry_after": "nan"}, "rate limited, a Retry-After not a number"),
    FaultCase(Fault.STATUS, {"status": 400}, "the request is refused: raised at once", permanent=True),
    FaultCase(Fault.REFUSE, meaning="the process is gone: connections refused"),
    FaultCase(Fault.HANG, meaning="accepts and never answers: only a timeout ends it"),
    FaultCase(Fault.CUT, {"after_chunks": 1}, "the connection drops mid-answer"),
    FaultCase(Fault.ERROR_EVENT, {"after_chunks": 1}, "a stream reports an error after its first chunk"),
    FaultCase(Fault.HTML, meaning="a captive portal's page instead of JSON"),
    FaultCase(Fault.TRUNCATED_JSON, {"after_chunks": 1}, "JSON cut short, the connection closed"),
    FaultCase(Fault.INVALID_JSON, {"after_chunks": 0}, "a body or an event that is not JSON"),
    FaultCase(Fault.STRING_BODY, meaning="JSON, but a bare string, not a completion"),
    FaultCase(Fault.UNSTREAMED, meaning="a stream answered with one JSON document, no events"),
    FaultCase(Fault.NO_CHOICES, meaning="a completion without choices"),
    FaultCase(Fault.SSE_NOISE, meaning="comments, retry, id and ping events among the chunks"),
    FaultCase(Fault.TRICKLE, {"interval": 0.02}, "one byte at a time: no read times out, the whole is late"),
    FaultCase(Fault.STALL, {"after_chunks": 1}, "a stream that stops after its first chunk, left open"),
    FaultCase(Fault.DELAY, {"delay": 0.05}, "slow but healthy"),
    FaultCase(Fault.SLOW_FIRST_TOKEN, {"delay": 0.3}, "a first token late, within the route timeout"),
)
"""Every fault a run injects (the property tests draw from all of them)."""

TRANSIENT_FAULTS: tuple[FaultCase, ...] = tuple(case for case in FAULT_CORPUS if not case.permanent)
"""The faults a router heals by failing over: while other routes are healthy, no request may be lost
to them (the soak's pass condition)."""

MODELS_FAULT_CORPUS: tuple[str | None, ...] = (*MODELS_FAULTS, None)
"""How a run breaks ``GET /v1/models`` (``FaultServer.models_fault``), and None: healthy again."""

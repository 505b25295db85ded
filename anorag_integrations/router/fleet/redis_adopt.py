"""What this replica takes from the others: their breaker, Retry-After and probe records, applied to its routes.

Records come from the fleet's hashes (read by each sync) and, for breakers, from the messages other
replicas publish (heard by the listen thread), so a record is adopted once whichever way it came
first. A record is another process's word, read as strictly as config (``redis_records.py``): a
malformed one is never adopted, the others still count; the first of each kind is logged as a
warning (the route and what was wrong, never the Redis URL), later ones at debug level. Another
replica's Retry-After is bounded as this replica bounds its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..endpoints.probe import Listed
from .redis_records import MALFORMED, BreakerRecord, monotonic, read_message, read_probe, read_throttle, why

if TYPE_CHECKING:
    from ..endpoints.route import Route

log = logging.getLogger("anorag_integrations.router")


class Adopter:
    """Applies other replicas' records to this replica's routes (see the module docstring)."""

    def __init__(self, routes: Mapping[str, Route], replica: str, max_retry_after: float) -> None:
        self.routes = routes
        self.replica = replica
        """This replica's name: its own records are not adopted."""
        self.max_retry_after = max_retry_after
        """The longest Retry-After this replica honours: another replica's is bounded by it too."""
        self._malformed: set[str] = set()
        """Kinds of record found malformed in Redis (the first of each is a warning)."""
        self._seen: dict[str, tuple[str, int]] = {}
        """Per route, the other replica's breaker record last adopted (each is adopted once)."""

    def set_routes(self, routes: Mapping[str, Route]) -> None:
        """The router's routes changed: records apply to ``routes`` (swapped whole); a route new under a name, or
        gone, has adopted nothing yet (the fleet's record of it is adopted afresh)."""
        old, self.routes = self.routes, routes
        self._seen = {name: seen for name, seen in self._seen.items() if routes.get(name) is old.get(name)}

    def renew(self, replica: str) -> None:
        """In a forked child: a replica of another name, which has adopted nothing yet."""
        self.replica = replica
        self._seen = {}

    def heard(self, data: object, connected: bool) -> bool:
        """A message on the fleet's channel: adopt the breaker news it carries (while ``connected``).

        Whether it was another replica's (then the sync thread should read the rest at once).
        """
        try:
            by, news = read_message(data)
        except MALFORMED as exc:
            self.skipped("message", "", exc)
            return False
        if by == self.replica:
            return False
        if connected:
            for name, raw in news.items():
                self.adopt("breakers", name, raw)
        return True

    def adopt(self, kind: str, name: str, raw: object) -> None:
        """Apply one record of another replica's; a malformed one is skipped (logged once), the others still count."""
        route = self.routes.get(name)
        if route is None:
            return
        try:
            if kind == "breakers":
                self._adopt_breaker(route, raw)
            elif kind == "throttle":
                self._adopt_throttle(route, raw)
            else:
                self._adopt_probe(route, raw)
        except MALFORMED as exc:
            self.skipped(kind, name, exc)

    def skipped(self, kind: str, name: str, exc: BaseException) -> None:
        """A malformed record of ``kind`` for route ``name`` was not adopted: a warning the first time per kind."""
        first = kind not in self._malformed
        if not first and not log.isEnabledFor(logging.DEBUG):
            return  # a flood of malformed records costs no formatting
        self._malformed.add(kind)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "shared state: ignoring a malformed %s record%s in Redis (%s)%s",
            kind, f" for route {name!r}" if name else "", why(exc),
            "; later ones of this kind are logged at debug level" if first else "",
        )  # fmt: skip

    def _adopt_throttle(self, route: Route, raw: object) -> None:
        """Another replica's Retry-After, bounded as this replica bounds its own (``params.max_retry_after``)."""
        until = read_throttle(raw, self.max_retry_after)
        if until is not None:
            route.not_before = max(route.not_before, until)

    def _adopt_breaker(self, route: Route, raw: object) -> None:
        record = BreakerRecord.loads(raw)
        seen_by, seen_n = self._seen.get(route.name, ("", 0))
        if record.by == self.replica or (seen_by == record.by and seen_n >= record.n):
            return  # ours, or already adopted (from the message, then from the hash)
        self._seen[route.name] = (record.by, record.n)
        at = min(monotonic(record.at), time.monotonic())  # a clock ahead of ours cannot open a breaker in the future
        if record.is_open:
            route.breaker.adopt_open(at)
        else:
            route.breaker.adopt_closed(at)

    def _adopt_probe(self, route: Route, raw: object) -> None:
        by, result = read_probe(raw)
        if by == self.replica or (result.checked_at or 0) <= (route.probe_result.checked_at or 0):
            return
        route.probe_result = result
        if result.healthy is True and result.models:  # what the leader's probe saw the server list
            route.listed_models([Listed(name, parent=result.parents.get(name)) for name in result.models],
                                result.checked_at or time.time())  # fmt: skip
        if result.healthy is True:
            route.breaker.probe_succeeded()  # the leader found it up: the cool-down ends here too

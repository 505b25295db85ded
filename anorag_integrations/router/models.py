"""Model groups: which routes serve which model name, from the config and from each server's ``/v1/models``.

A route serves its configured ``model``, its ``aliases`` (names callers may use; the configured name
is sent) and every name its server lists (``--served-model-name`` aliases, LoRA adapters with their
``parent``), as the prober or a lookup last saw them. A call's ``model=`` picks the group of routes
serving that name (no model: the default route's model); the policy only ever sees that group. A name
a server answered 404 for leaves that route's group until its ``/v1/models`` lists the name again,
without touching the route's breaker. Groups are built when something changed (a version number),
so a pick costs one dict lookup however many routes and models the fleet has.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import itertools
import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from . import forks
from .errors import UnknownModelError

if TYPE_CHECKING:
    from ..config import Config
    from .endpoints.route import Route
    from .loop import LoopThread

LOOKUP_EVERY_S = 5.0
"""A name no route is known to serve asks each route's ``/v1/models`` at most this often (a caller's typo
repeated a thousand times costs each server one listing per interval, not a thousand)."""
MAX_COMPARED = 2000
"""Served names an unknown one is compared with for "did you mean" (difflib is quadratic-ish per pair)."""
MAX_COMPARED_CHARS = 256
"""Characters of a caller's unknown name compared and shown (a caller may send a megabyte)."""

_generations = itertools.count(1)


class Group(list["Route"]):
    """The routes serving one model name, in config order; ``generation`` changes whenever its members do,
    so a policy's per-list caches (a hash ring, weights) key on it instead of on ``id()``."""

    __slots__ = ("generation", "members")

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        super().__init__(routes)
        self.generation = next(_generations)
        self.members = frozenset(route.name for route in self)


EMPTY = Group()


class Catalog:
    """The fleet's model groups, per route kind; one per router, shared by every call (thread-safe)."""

    def __init__(self, routes: Mapping[str, Route], config: Config, loop: LoopThread) -> None:
        self._loop = loop
        """Where lookups run (a sync call waits for them there, bounded by its time left)."""
        self._lock = forks.lock()
        self._version = 0
        self._built = -1
        self._groups: dict[tuple[str, str], Group] = {}
        self._dropped: list[Route] = []
        """Routes with names out of their groups after a 404 (as of the last build): re-listed in the background."""
        self._looked_up: dict[str, float] = {}
        self.reconfigure(routes, config)

    def reconfigure(self, routes: Mapping[str, Route], config: Config) -> None:
        """Take the router's routes and config (at start, and when routes are added, removed or reloaded live):
        the groups are built again before the next pick; a pick in flight keeps the groups it read."""
        from ..config import ROUTE_KINDS  # the config module imports the router: not at import time

        fallback: dict[str, Route | None] = {}
        default: dict[str, str | None] = {}
        for kind in ROUTE_KINDS:
            name = config.fallback_route_of(kind)
            fallback[kind] = routes[name] if name else None
            first = config.default_route_of(kind)
            default[kind] = routes[first].model if first is not None else None
        for route in routes.values():
            route.models_changed = self._changed
        with self._lock:
            self._routes = routes
            self.fallback = fallback
            """Each kind's ``fallback_route``: tried last for its default model (and for names it serves)."""
            self.default = default
            """Each kind's default model: the one a call without ``model=`` asks for (its default route's)."""
            self.fallbacks: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in config.fallbacks.items()}
            """``fallbacks:``: the models a call goes on to when every route of its own has failed."""
            self.window_fallbacks: dict[str, tuple[str, ...]] = {
                k: tuple(v) for k, v in config.context_window_fallbacks.items()
            }
            """``context_window_fallbacks:``: the models a prompt too long for its own goes on to."""
            self._looked_up = {name: at for name, at in self._looked_up.items() if name in routes}
            self._version += 1

    def _changed(self) -> None:
        """A route's names changed (a listing, a 404): the groups are built again before the next pick."""
        with self._lock:
            self._version += 1

    def group(self, kind: str, name: str) -> Group:
        """The primary routes of ``kind`` serving ``name`` (the fallback route is never among them)."""
        if self._built != self._version:
            self._build()
        return self._groups.get((kind, name), EMPTY)

    def _build(self) -> None:
        with self._lock:
            version = self._version
            members: dict[tuple[str, str], list[Route]] = {}
            self._dropped = [route for route in self._routes.values() if route.dropped]
            for route in self._routes.values():
                if route is self.fallback.get(route.kind):
                    continue
                for name in route.served_names():
                    members.setdefault((route.kind, name), []).append(route)
            old = self._groups
            groups: dict[tuple[str, str], Group] = {}
            for key, routes in members.items():
                kept = old.get(key)  # unchanged members keep their generation (and the policies' caches)
                groups[key] = kept if kept is not None and list(kept) == routes else Group(routes)
            self._groups = groups
            self._built = version

    def fallback_for(self, kind: str, name: str) -> Route | None:
        """The kind's fallback route when it may take a call for ``name``: the default model's calls (as
        documented for ``fallback_route``), and those naming a model it serves."""
        route = self.fallback.get(kind)
        if route is None or (name != self.default.get(kind) and name not in route.served_names()):
            return None
        return route

    def candidates(self, kind: str, name: str | None) -> list[Route]:
        """Every route a call of ``kind`` for ``name`` (None: the default model) may go to: its group, then the
        fallback route where it may take it."""
        name = name or self.default.get(kind) or ""
        fallback = self.fallback_for(kind, name)
        return [*self.group(kind, name), *([fallback] if fallback is not None else [])]

    def serves(self, kind: str, name: str) -> bool:
        """Whether any route of ``kind`` (the fallback route included) is known to serve ``name``."""
        return bool(self.group(kind, name)) or self.fallback_for(kind, name) is not None

    def names(self, kind: str) -> list[str]:
        """Every model name the routes of ``kind`` are known to serve, sorted."""
        if self._built != self._version:
            self._build()
        names = {name for (k, name), routes in self._groups.items() if k == kind and routes}
        fallback = self.fallback.get(kind)
        if fallback is not None:
            names |= fallback.served_names()
        return sorted(names)

    def unknown(self, kind: str, name: str) -> UnknownModelError:
        served = self.names(kind)
        close = difflib.get_close_matches(name[:MAX_COMPARED_CHARS], served[:MAX_COMPARED], n=1)
        fixes = sorted({fix for r in self._routes.values() if r.kind == kind and (fix := r.unknown_model_fix(name))})
        return UnknownModelError(name[:MAX_COMPARED_CHARS], kind, served, close, fixes)

    # --- looking names up: once within the call's time, rate-limited per route ---------------------------

    def _due(self, routes: Iterable[Route]) -> list[Route]:
        """Those of ``routes`` whose ``/v1/models`` may be asked now (each at most every LOOKUP_EVERY_S)."""
        now = time.monotonic()
        due = []
        with self._lock:
            for route in routes:
                if now - self._looked_up.get(route.name, -LOOKUP_EVERY_S) >= LOOKUP_EVERY_S:
                    self._looked_up[route.name] = now
                    due.append(route)
        return due

    def look_up(self, kind: str, name: str, left: float | None) -> None:
        """Make sure some route of ``kind`` serves ``name``: if none is known to, ask the routes' ``/v1/models``
        (on the router's loop, bounded by the call's time left), then UnknownModelError if none does."""
        self._recheck(kind)
        if not self.serves(kind, name):
            self._loop.run(self._ask(kind, left), within=left)
            if not self.serves(kind, name):
                raise self.unknown(kind, name)

    async def alook_up(self, kind: str, name: str, left: float | None) -> None:
        """Async twin of :meth:`look_up`."""
        self._recheck(kind)
        if not self.serves(kind, name):
            await self._ask(kind, left)
            if not self.serves(kind, name):
                raise self.unknown(kind, name)

    async def _ask(self, kind: str, left: float | None) -> None:
        """Every due route of ``kind`` lists its models, all at once, within the probe timeout and the time left."""
        due = self._due(route for route in self._routes.values() if route.kind == kind)
        if due:
            bound = min(max(route.probe_timeout for route in due), left if left is not None else math.inf)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(r.alist_models(max(bound, 0.001)) for r in due)), bound)

    def _recheck(self, kind: str) -> None:
        """Routes out of a group after a 404 list their models again in the background, at most every
        LOOKUP_EVERY_S: a spurious 404 (a proxy during a redeploy) does not keep a route out for good when
        nothing probes it."""
        if self._built != self._version:
            self._build()
        if not self._dropped:  # the common case: one attribute read per call
            return
        for route in self._due(route for route in self._dropped if route.kind == kind and route.dropped):
            self._loop.submit(route.alist_models(route.probe_timeout))

    def fallback_models(self, kind: str, name: str, overflow: bool) -> tuple[str, ...]:
        """Where a call for ``name`` goes next: ``context_window_fallbacks`` for a prompt that does not fit, else
        ``fallbacks``; for a name the table does not list (an alias, a name a server lists), those of the model
        its routes serve."""
        table = self.window_fallbacks if overflow else self.fallbacks
        if name in table:
            return table[name]
        for route in self.group(kind, name):
            if route.model in table:
                return table[route.model]
        return ()

    def window_fallback_for(self, kind: str, name: str) -> bool:
        """Whether a prompt too long for ``name`` has somewhere to go (predicting an overflow is worth it)."""
        return bool(self.fallback_models(kind, name, overflow=True))

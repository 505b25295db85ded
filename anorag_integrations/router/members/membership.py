"""Changing the router's routes while it serves: what ``add_route``, ``remove_route``, ``reload`` and discovery share.

A change builds the new route set beside the old one and publishes it in one step (a new dict for
``router.routes``, the catalog's groups, the pools, the prober, the shared state): a call in flight
keeps the routes it picked from, a new call sees the new set. A route that leaves is *retired*: its
breaker issues no new ticket, the requests and streams it has in flight finish, and when its last ticket
comes back its clients are closed and the router forgets it (its policy state, its call outcomes; its
statistics and metric series go with the route object). A route whose settings did not change is kept
as it is, breaker, statistics and prefix index included.

Where each route came from (its *origin*) decides what a reload may change: ``config`` routes follow the
file, ``api`` routes (``add_route``) and ``discovery:N`` routes (found in DNS) are kept by a reload.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..secrets import preview

if TYPE_CHECKING:
    from ...config import Config, RouteConfig
    from ..core import Router
    from ..endpoints.route import Route

log = logging.getLogger("anorag_integrations.router")

CONFIG, API = "config", "api"
"""Origins of a route: the config file, or ``Router.add_route``; discovery's are ``discovery:<index>``."""
RESTART_ONLY = (
    "lb_policy",
    "prefix_affinity",
    "prefix_aware",
    "least_queue",
    "hedge",
    "state",
    "observability",
    "admission",
    "retry_budget",
)
"""Sections a reload does not change in a running router (they shape its policies, threads and exports)."""


class Drain:
    """A route that left the router: ``done`` once its last request in flight ended and it was released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the route is released (True), or ``timeout`` seconds (False)."""
        return self._done.wait(timeout)

    async def async_wait(self, timeout: float | None = None) -> bool:
        """:meth:`wait` without blocking the running loop."""
        return await asyncio.to_thread(self._done.wait, timeout)

    def set(self) -> None:
        self._done.set()

    def __repr__(self) -> str:
        return f"Drain({self.name!r}, done={self.done})"


@dataclass
class Changes:
    """What one membership change did: route names added, removed, replaced (new settings) and kept."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    """Config sections that changed but take effect only in a new router (``RESTART_ONLY``)."""
    drains: dict[str, Drain] = field(default_factory=dict)
    """The routes that left (removed, or the old route of a replaced name), each draining."""

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every route that left is released; False when ``timeout`` (for them all) ran out first."""
        end = None if timeout is None else time.monotonic() + timeout
        return all(
            drain.wait(None if end is None else max(0.0, end - time.monotonic())) for drain in self.drains.values()
        )

    def summary(self) -> str:
        return f"added {self.added}, removed {self.removed}, replaced {self.replaced}, kept {len(self.kept)}" + (
            f"; needs a restart to change: {', '.join(self.restart_needed)}" if self.restart_needed else ""
        )


def settings(cfg: RouteConfig, config: Config) -> tuple[Any, ...]:
    """Everything a route object is built from: equal settings keep the route (breaker, statistics, index)."""
    return cfg.model_dump(), config.params.timeout, config.health.model_dump()


def apply(router: Router, config: Config, origins: Mapping[str, str]) -> Changes:
    """Make ``config``'s routes the router's (``origins``: each route's origin); the caller holds the members lock."""
    from ..core import make_route

    old, running = router.routes, router.config
    routes: dict[str, Route] = {}
    changes = Changes()
    leaving: list[Route] = []
    for name, cfg in config.routes.items():
        route, was = old.get(name), running.routes.get(name)
        if route is not None and was is not None and settings(was, running) == settings(cfg, config):
            routes[name] = route
            changes.kept.append(name)
            continue
        routes[name] = make_route(name, cfg, config)
        router.owned.add(routes[name])
        if route is None:
            changes.added.append(name)
        else:
            changes.replaced.append(name)
            leaving.append(route)
    for name, route in old.items():
        if name not in routes:
            changes.removed.append(name)
            leaving.append(route)
    _publish(router, config, routes, dict(origins))
    for route in leaving:
        changes.drains[route.name] = retire(router, route)
    router.admission.offer(routes[name] for name in (*changes.added, *changes.replaced))
    if changes.added or changes.removed or changes.replaced:
        log.info("routes changed: %s", changes.summary())
    return changes


def _publish(router: Router, config: Config, routes: dict[str, Route], origins: dict[str, str]) -> None:
    """Every part of the router that holds the route set takes the new one; new calls see it from here."""
    from ..rounds import update_pools

    router.config = config
    router.origins = origins
    router.state.set_routes(routes)
    router.routes = routes
    router.models.reconfigure(routes, config)
    update_pools(router.pools, config, routes)
    router.prober.routes = list(routes.values())
    if config.health.probe_interval > 0:
        router.prober.interval_s = config.health.probe_interval
    if router.scraper is not None:
        router.scraper.routes = list(routes.values())
    router.continuable = any(route.continue_streams for route in routes.values())


def retire(router: Router, route: Route) -> Drain:
    """Take ``route`` out of service: no new request; released once its requests in flight have ended."""
    drain = Drain(route.name)
    router.draining[route] = drain
    for pool in router.pools.values():
        if (forget := getattr(pool.policy, "forget", None)) is not None:
            forget(route.name)  # a replaced route's name now means another server: its prefix index is stale
    ref = weakref.ref(router)

    def idle() -> None:
        route.release()
        owner = ref()
        if owner is not None:
            owner.draining.pop(route, None)
            owner.owned.discard(route)
            if route.name not in owner.routes:
                owner.outcomes.forget(route.name)
        drain.set()

    route.breaker.retire(idle)
    return drain


def origin(index: int) -> str:
    """The origin of the routes the ``index``-th discovery entry found."""
    return f"discovery:{index}"


def reloaded(running: Config, new: Config, origins: Mapping[str, str]) -> tuple[Config, dict[str, str], list[str]]:
    """The config a reload applies: ``new``'s routes and settings, the running router's routes of other
    origins (``api``, discovery's while its entry is unchanged) and its ``RESTART_ONLY`` sections; with the
    new origins and the sections that need a restart to change."""
    restart = [key for key in RESTART_ONLY if getattr(running, key) != getattr(new, key)]
    keep_from: set[str] = {API}
    keep_from |= {origin(i) for i, entry in enumerate(new.discovery) if i < len(running.discovery)
                  and running.discovery[i] == entry}  # fmt: skip
    routes: dict[str, Any] = dict(new.routes)
    new_origins = {name: CONFIG for name in new.routes}
    for name, origin in origins.items():
        if origin in keep_from and name not in routes:
            routes[name] = running.routes[name]
            new_origins[name] = origin
    update = {key: getattr(running, key) for key in restart}
    update["source"] = running.source if new.source == "<dict>" else new.source  # reload() reads the file again
    merged = new.model_copy(update=update).with_routes(routes)
    return merged, new_origins, restart


def add(router: Router, name: str, route: RouteConfig | Mapping[str, Any]) -> Changes:
    """``Router.add_route``."""
    from ..errors import ConfigError

    with router.members_lock:
        router.check_open()
        if not isinstance(name, str):
            raise ConfigError(router.config.source, [("routes", f"a route name is text, not {type(name).__name__}")])
        if name in router.routes:
            raise ConfigError(router.config.source, [(f"routes.{name}", "exists already: remove_route() it first")])
        config = router.config.with_routes({**router.config.routes, name: route})
        return apply(router, config, {**router.origins, name: API})


def remove(router: Router, name: str) -> Drain:
    """``Router.remove_route``."""
    from ..errors import ConfigError

    with router.members_lock:
        router.check_open()
        if not isinstance(name, str) or name not in router.routes:
            problem = f"no such route; routes: {', '.join(router.routes)}"
            raise ConfigError(router.config.source, [(f"routes.{preview(name)}", problem)])
        config = router.config.with_routes({n: r for n, r in router.config.routes.items() if n != name})
        changes = apply(router, config, {n: o for n, o in router.origins.items() if n != name})
        return changes.drains[name]


def reload(router: Router, new: Config) -> Changes:
    """``Router.reload`` with the config read: apply it, and restart discovery when its entries changed."""
    from . import discovery

    with router.members_lock:
        router.check_open()
        merged, origins, restart = reloaded(router.config, new, router.origins)
        if restart:
            log.warning("reload: %s changed; the running router keeps its own until restarted", ", ".join(restart))
        rediscover = merged.discovery != router.config.discovery
        changes = apply(router, merged, origins)
        changes.restart_needed = restart
        if rediscover:
            discovery.rewatch(router)
    return changes

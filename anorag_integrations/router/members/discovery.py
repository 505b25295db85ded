"""``discovery:`` in the router: one DNS watcher per entry, whose address sets become routes (``members/dns.py``).

The router's first lookups run before it serves (each bounded by the entry's ``timeout``), so a router
built on a headless Service starts with its pods. After that each watcher runs in a daemon thread and
hands every changed address set to :meth:`Router.found`, which adds a route per new address and drains
the routes of addresses that vanished. A failed lookup keeps the last good set (the watcher says so once).
The watchers hold the router weakly: a router nobody holds is collected and its watchers halted.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...config.discovery import DiscoveryConfig, base_url, route_name
from ..fleet.state import fleet_namespace
from .membership import CONFIG, apply, origin

if TYPE_CHECKING:
    from ...config import Config, RouteConfig, StateConfig
    from ..core import Router
    from .dns import DnsWatcher

log = logging.getLogger("anorag_integrations.router")


def make_watchers(entries: list[DiscoveryConfig], router: Router) -> list[DnsWatcher]:
    """One watcher per entry, each handing what it finds to ``router.found`` (held weakly; nothing before the
    router serves: the first lookups' results are read by :func:`first_config`)."""
    if not entries:
        return []
    from .dns import DnsWatcher

    ref = weakref.ref(router)
    watchers = []
    for index, entry in enumerate(entries):
        nameservers, port = entry.nameservers()
        watchers.append(
            DnsWatcher(
                entry.dns,
                _sink(ref, index),
                interval=entry.interval,
                nameservers=nameservers,
                port=port,
                timeout=entry.timeout,
            )
        )
    return watchers


def _sink(ref: weakref.ref[Router], index: int) -> Callable[[frozenset[str]], None]:
    def found(addresses: frozenset[str]) -> None:
        router = ref()
        if router is not None and router.serving and not router.closed:
            router.found(index, addresses)

    return found


def found_routes(entry: DiscoveryConfig, addresses: frozenset[str]) -> dict[str, RouteConfig]:
    """The routes of ``entry`` for ``addresses``, by name, in a stable order."""
    return {
        route_name(entry.prefix, address, entry.port): entry.route_config(base_url(entry, address))
        for address in sorted(addresses)
    }


def fleet_identity(config: Config) -> list[tuple[str, str, str]]:
    """What names a fleet with discovery for shared state: its configured routes and its entries (not the
    addresses found, which differ between replicas started at different times)."""
    fixed = [(name, cfg.base_url, cfg.model) for name, cfg in config.routes.items()]
    found = [(f"discovery:{e.prefix}", f"dns://{e.dns}:{e.port}{e.path}", e.model) for e in config.discovery]
    return fixed + found


def with_found(
    config: Config, origins: Mapping[str, str], index: int, addresses: frozenset[str]
) -> tuple[Config, dict[str, str]] | None:
    """The config with entry ``index``'s routes for ``addresses`` in place of those it had; None: no change."""
    mine = origin(index)
    wanted = found_routes(config.discovery[index], addresses)
    had = {name for name, was in origins.items() if was == mine}
    if had == set(wanted):
        return None
    routes: dict[str, Any] = {name: cfg for name, cfg in config.routes.items() if origins.get(name) != mine}
    new_origins = {name: was for name, was in origins.items() if was != mine}
    for name, cfg in wanted.items():
        if name in routes:
            log.warning("discovery %s: route %r exists already; the address found is not added", mine, name)
            continue
        routes[name], new_origins[name] = cfg, mine
    return config.with_routes(routes), new_origins


def found(router: Router, index: int, addresses: frozenset[str]) -> None:
    """``Router.found``: entry ``index``'s routes become one per address (under the members lock)."""
    with router.members_lock:
        if router.closed or index >= len(router.config.discovery):
            return
        change = with_found(router.config, router.origins, index, addresses)
        if change is not None:
            apply(router, *change)


def rewatch(router: Router) -> None:
    """The discovery entries changed (a reload): new watchers, each applying its first lookup now."""
    for watcher in router.watchers:
        watcher.stop()
    router.watchers[:] = make_watchers(router.config.discovery, router)
    for watcher in router.watchers:
        watcher.resolve_now()
        watcher.start()


def first_config(config: Config, watchers: list[DnsWatcher]) -> tuple[Config, dict[str, str], StateConfig]:
    """The config a router starts with: the file's routes and those the first lookups found, each route's
    origin, and the state config (its namespace derived from the fleet's identity when discovery is on, so
    replicas agree whatever addresses each found)."""
    origins = dict.fromkeys(config.routes, CONFIG)
    if not config.discovery:
        return config, origins, config.state
    state = config.state
    if state.namespace is None:
        state = state.model_copy(update={"namespace": fleet_namespace(fleet_identity(config))})
    for index, watcher in enumerate(watchers):  # one lookup each; a failed one finds nothing yet
        change = with_found(config, origins, index, watcher.resolve_now() or frozenset())
        if change is not None:
            config, origins = change
    return config, origins, state

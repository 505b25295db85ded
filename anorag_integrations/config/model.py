"""``Config``: the router's whole configuration, its sections put together and checked against each other."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from ..router.balancing.policies import POLICIES
from ..router.errors import ConfigError
from ..router.secrets import clip, preview
from .discovery import PLACEHOLDER_URL, DiscoveryConfig, discovery_list
from .sections import (
    AdmissionConfig,
    EmbeddingConfig,
    HealthConfig,
    HedgeConfig,
    LeastQueueConfig,
    ObservabilityConfig,
    Params,
    PrefixAffinityConfig,
    PrefixAwareConfig,
    RetryBudgetConfig,
    RouteConfig,
    StateConfig,
    _Section,
)

MAX_ROUTE_NAME = 200
"""Longest route name (names label metrics and spans; discovery's are ``name@[v6 address]:port``)."""


class Config(_Section):
    """The router's whole configuration."""

    provider: str = "vllm_openai"
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    discovery: list[DiscoveryConfig] = Field(
        default_factory=list, description="routes found in DNS (one mapping, or a list of them)"
    )
    default_route: str | None = None
    fallback_route: str | None = None
    default_embedding_route: str | None = None
    fallback_embedding_route: str | None = None
    lb_policy: str = "round_robin"
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict, description="model -> the models a call goes on to when every route of its own failed"
    )
    context_window_fallbacks: dict[str, list[str]] = Field(
        default_factory=dict, description="model -> the models a prompt too long for its own goes on to"
    )
    params: Params = Params()
    health: HealthConfig = HealthConfig()
    prefix_affinity: PrefixAffinityConfig = PrefixAffinityConfig()
    prefix_aware: PrefixAwareConfig = PrefixAwareConfig()
    least_queue: LeastQueueConfig = LeastQueueConfig()
    hedge: HedgeConfig | None = None
    admission: AdmissionConfig = AdmissionConfig()
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    state: StateConfig = StateConfig()
    source: str = Field(default="<dict>", exclude=True, description="where this config was read from")

    @field_validator("lb_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown lb_policy {preview(value)}; choose one of {', '.join(sorted(POLICIES))}")
        return value

    _discovery_list = field_validator("discovery", mode="before")(discovery_list)

    @field_validator("routes")
    @classmethod
    def _route_names(cls, routes: dict[str, RouteConfig]) -> dict[str, RouteConfig]:
        for name in routes:
            if not 0 < len(name) <= MAX_ROUTE_NAME or not name.isprintable():
                raise ValueError(f"route name {preview(name)}: 1 to {MAX_ROUTE_NAME} printable characters")
        return routes

    @model_validator(mode="after")
    def _known_routes(self) -> Config:
        if not self.routes and not self.discovery:
            raise ValueError("routes: no routes defined; add at least one under routes: (or a discovery: entry)")
        for kind, keys in _KIND_KEYS.items():
            for key in keys:
                name = getattr(self, key)
                if name is None:
                    continue
                if name not in self.routes:
                    raise ValueError(f"{key}: {preview(name)} is not among the routes ({clip(', '.join(self.routes))})")
                if self.routes[name].kind != kind:
                    raise ValueError(f"{key}: route {preview(name)} is of kind {self.routes[name].kind}, not {kind}")
            fallback = getattr(self, keys[1])
            if fallback is not None and len(self.route_names(kind)) == 1:
                raise ValueError(f"{keys[1]}: needs at least one other {kind} route to fall back from")
        return self

    @model_validator(mode="after")
    def _known_models(self) -> Config:
        for key in ("fallbacks", "context_window_fallbacks"):
            check_fallbacks(key, getattr(self, key), self.configured_models(), self._served_as())
        return self

    def configured_models(self) -> dict[str, str]:
        """Every model name the config gives a route (its model, its aliases) -> that route's kind."""
        names: dict[str, str] = {}
        for route in self.routes.values():
            for name in (route.model, *route.aliases):
                names.setdefault(name, route.kind)
        for entry in self.discovery:
            found = entry.route_config(PLACEHOLDER_URL)
            for name in (found.model, *found.aliases):
                names.setdefault(name, found.kind)
        return names

    def _served_as(self) -> dict[str, set[str]]:
        """Each configured name -> the models it is sent as (an alias: its routes' models; a model: itself)."""
        served: dict[str, set[str]] = {}
        found = [entry.route_config(PLACEHOLDER_URL) for entry in self.discovery]
        for route in [*self.routes.values(), *found]:
            for name in (route.model, *route.aliases):
                served.setdefault(name, set()).add(route.model)
        return served

    def route_names(self, kind: str) -> list[str]:
        """The routes of ``kind`` ("chat" or "embedding"), in config order."""
        return [name for name, route in self.routes.items() if route.kind == kind]

    def default_route_of(self, kind: str) -> str | None:
        """The default route of ``kind``: the configured one, else the first of that kind (None: there is none)."""
        named = getattr(self, _KIND_KEYS[kind][0])
        return named if named is not None else next(iter(self.route_names(kind)), None)

    def fallback_route_of(self, kind: str) -> str | None:
        """The route of ``kind`` tried last (``fallback_route``, ``fallback_embedding_route``)."""
        name: str | None = getattr(self, _KIND_KEYS[kind][1])
        return name

    def policy_options(self) -> dict[str, Any]:
        """Keyword arguments for the ``lb_policy`` in use (its section, when it has one)."""
        if self.lb_policy == "prefix_affinity":
            return self.prefix_affinity.model_dump()
        if self.lb_policy == "prefix_aware":
            return {**self.prefix_aware.model_dump(), "stale_after": self.least_queue.stale_after}
        if self.lb_policy == "least_queue":
            return {"stale_after": self.least_queue.stale_after}
        return {}

    @property
    def default_route_name(self) -> str:
        """The default chat route (the first route when there is no chat route at all)."""
        return self.default_route_of("chat") or next(iter(self.routes))

    def with_routes(self, routes: Mapping[str, RouteConfig | Mapping[str, Any]]) -> Config:
        """A copy with ``routes`` instead of its own, checked as a file is (``ConfigError`` naming the key)."""
        data = {**self.model_dump(exclude={"routes"}), "routes": dict(routes), "source": self.source}
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            from .loading import validation_problems

            raise ConfigError(self.source, validation_problems(exc, prefix="llm", root=Config)) from None

    def with_api_key(self, api_key: str) -> Config:
        """A copy in which every route uses ``api_key``."""
        secret = SecretStr(api_key)
        routes = {name: route.model_copy(update={"api_key": secret}) for name, route in self.routes.items()}
        return self.model_copy(update={"routes": routes})


_KIND_KEYS = {
    "chat": ("default_route", "fallback_route"),
    "embedding": ("default_embedding_route", "fallback_embedding_route"),
}
"""Each route kind's (default, fallback) keys."""


def check_fallbacks(
    key: str, table: dict[str, list[str]], known: dict[str, str], served_as: dict[str, set[str]]
) -> None:
    """``fallbacks`` / ``context_window_fallbacks``: configured chat names, no model falling back to itself, no
    cycle (aliases count as the models they are sent as: ``big -> tiny`` with ``tiny`` an alias of ``small``
    is ``big -> small``)."""
    for name, targets in table.items():
        for shown in (name, *targets):
            if shown not in known:
                close = difflib.get_close_matches(shown, list(known), n=1)
                meant = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"{key}.{clip(name)}: {preview(shown)} is not a configured model or alias{meant}; "
                    f"configured: {clip(', '.join(sorted(known)))}"
                )
            if known[shown] == "embedding":
                raise ValueError(
                    f"{key}.{clip(name)}: {preview(shown)} is an embedding model: embedding models never fall back "
                    "to another model (its vectors would not compare with the ones already stored)"
                )
        if any(served_as[name] & served_as[target] for target in targets):
            raise ValueError(f"{key}.{clip(name)}: a model cannot fall back to itself (or to an alias of itself)")
    edges: dict[str, set[str]] = {}
    for name, targets in table.items():
        for model in served_as[name]:
            edges.setdefault(model, set()).update(m for target in targets for m in served_as[target])
    cycle = _cycle(edges)
    if cycle:
        raise ValueError(f"{key}: the fallbacks form a cycle: {' -> '.join(cycle)}")


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph, as the names along it (the first repeated at the end), or None; iterative, so a
    chain of any length is checked (a recursive walk would hit Python's recursion limit)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return [*path[path.index(step) :], step]
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(edges.get(step, ()))))
    return None

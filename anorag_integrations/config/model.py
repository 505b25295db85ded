"""``Config``: the router's whole configuration, its sections put together and checked against each other."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from ..router.balancing.policies import POLICIES
from ..router.secrets import clip, preview
from .sections import (
    EmbeddingConfig,
    HealthConfig,
    HedgeConfig,
    LeastQueueConfig,
    ObservabilityConfig,
    Params,
    PrefixAffinityConfig,
    PrefixAwareConfig,
    RouteConfig,
    StateConfig,
    _Section,
)


class Config(_Section):
    """The router's whole configuration."""

    provider: str = "vllm_openai"
    routes: dict[str, RouteConfig] = Field(min_length=1)
    default_route: str | None = None
    fallback_route: str | None = None
    default_embedding_route: str | None = None
    fallback_embedding_route: str | None = None
    lb_policy: str = "round_robin"
    params: Params = Params()
    health: HealthConfig = HealthConfig()
    prefix_affinity: PrefixAffinityConfig = PrefixAffinityConfig()
    prefix_aware: PrefixAwareConfig = PrefixAwareConfig()
    least_queue: LeastQueueConfig = LeastQueueConfig()
    hedge: HedgeConfig | None = None
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

    @model_validator(mode="after")
    def _known_routes(self) -> Config:
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

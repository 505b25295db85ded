"""Typed configuration: ``config.yaml`` (either layout the anorag docs use) plus env overrides.

Layouts accepted::

    llm:                          llm:
      provider: vllm_openai         provider: vllm_openai
      routes: {a: {...}}            vllm_openai:
      lb_policy: round_robin          routes: {a: {...}}
                                      lb_policy: round_robin

Environment: ``ANORAG_CONFIG`` (path), and ``VLLM_BASE_URL`` / ``VLLM_MODEL`` / ``VLLM_API_KEY``,
which override the default route (or define a single route when there is no file). Every problem is
reported in one ``ConfigError`` naming the file and the key path.

The package's modules: ``sections.py`` (one pydantic model per section), ``model.py`` (``Config``, the
whole), ``files.py`` (finding and reading the file) and ``loading.py`` (layouts, env overrides, errors).
Every name is importable from here.
"""

from __future__ import annotations

from ..router.errors import ConfigError
from .files import DEFAULT_CONFIG_PATH, ENV_CONFIG_PATH, ENV_ONLY_ROUTE, MAX_ALIAS_EXPANSION, config_file, read_document
from .loading import (
    ENV_ROUTE_OVERRIDES,
    OLLAMA_FALLBACK_ROUTE,
    OTHER_PROVIDER_SECTIONS,
    ROUTER_KEYS,
    config_from_dict,
    load_config,
)
from .model import Config
from .sections import (
    REDIS_SCHEMES,
    ROUTE_KINDS,
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
    RouteKind,
    StateConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_CONFIG_PATH",
    "ENV_ONLY_ROUTE",
    "ENV_ROUTE_OVERRIDES",
    "MAX_ALIAS_EXPANSION",
    "OLLAMA_FALLBACK_ROUTE",
    "OTHER_PROVIDER_SECTIONS",
    "REDIS_SCHEMES",
    "ROUTER_KEYS",
    "ROUTE_KINDS",
    "AdmissionConfig",
    "Config",
    "ConfigError",
    "EmbeddingConfig",
    "HealthConfig",
    "HedgeConfig",
    "LeastQueueConfig",
    "ObservabilityConfig",
    "Params",
    "PrefixAffinityConfig",
    "PrefixAwareConfig",
    "RetryBudgetConfig",
    "RouteConfig",
    "RouteKind",
    "StateConfig",
    "config_file",
    "config_from_dict",
    "load_config",
    "read_document",
]

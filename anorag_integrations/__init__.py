"""Route LangChain / LlamaIndex / plain calls over a fleet of vLLM (OpenAI-compatible) servers."""

from __future__ import annotations

from .config import Config, load_config
from .router import (
    AllRoutesFailed,
    AuthenticationError,
    BadRequestError,
    CallInfo,
    ConfigError,
    ContextOverflowError,
    ModelNotFoundError,
    PermanentRouteError,
    RouteError,
    Router,
    RouterError,
    StreamInterruptedError,
    TransientRouteError,
    call_info,
)

__all__ = [
    "AllRoutesFailed",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "ModelNotFoundError",
    "PermanentRouteError",
    "RouteError",
    "Router",
    "RouterError",
    "StreamInterruptedError",
    "TransientRouteError",
    "call_info",
    "load_config",
]

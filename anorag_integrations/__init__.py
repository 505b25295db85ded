"""Route LangChain / LlamaIndex / plain calls over a fleet of vLLM (OpenAI-compatible) servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Config, load_config
from .router import (
    AllRoutesFailed,
    AuthenticationError,
    BadRequestError,
    CallInfo,
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    MalformedResponse,
    ModelNotFoundError,
    PermanentRouteError,
    RouteError,
    Router,
    RouterClosed,
    RouterError,
    StreamInterruptedError,
    TransientRouteError,
    call_info,
)

if TYPE_CHECKING:
    from .langchain import ChatVLLMRouted
    from .llama_index import VLLMRouted

__all__ = [
    "AllRoutesFailed",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "ChatVLLMRouted",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "InvalidRequestError",
    "MalformedResponse",
    "ModelNotFoundError",
    "PermanentRouteError",
    "RouteError",
    "Router",
    "RouterClosed",
    "RouterError",
    "StreamInterruptedError",
    "TransientRouteError",
    "VLLMRouted",
    "call_info",
    "load_config",
]


def __getattr__(name: str) -> Any:
    """Adapters import their framework on first use, so the router alone stays light to import."""
    if name == "ChatVLLMRouted":
        from .langchain import ChatVLLMRouted

        return ChatVLLMRouted
    if name == "VLLMRouted":
        from .llama_index import VLLMRouted

        return VLLMRouted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    InputTooLongError,
    InvalidRequestError,
    MalformedResponse,
    MixedEmbeddingsError,
    ModelNotFoundError,
    NoRouteOfKindError,
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
    from .langchain import ChatVLLMRouted, VLLMRoutedEmbeddings
    from .llama_index import VLLMRouted, VLLMRoutedEmbedding

__all__ = [
    "AllRoutesFailed",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "ChatVLLMRouted",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "InputTooLongError",
    "MixedEmbeddingsError",
    "InvalidRequestError",
    "MalformedResponse",
    "ModelNotFoundError",
    "NoRouteOfKindError",
    "PermanentRouteError",
    "RouteError",
    "Router",
    "RouterClosed",
    "RouterError",
    "StreamInterruptedError",
    "TransientRouteError",
    "VLLMRouted",
    "VLLMRoutedEmbedding",
    "VLLMRoutedEmbeddings",
    "call_info",
    "load_config",
]


_ADAPTERS = {
    "ChatVLLMRouted": "langchain",
    "VLLMRoutedEmbeddings": "langchain",
    "VLLMRouted": "llama_index",
    "VLLMRoutedEmbedding": "llama_index",
}
"""Adapter classes and the module of this package that holds each."""


def __getattr__(name: str) -> Any:
    """Adapters import their framework on first use, so the router alone stays light to import."""
    if name in _ADAPTERS:
        import importlib

        return getattr(importlib.import_module(f".{_ADAPTERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Route LangChain / LlamaIndex / plain calls over a fleet of vLLM (OpenAI-compatible) servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, config_from_dict, load_config
    from .langchain import ChatVLLMRouted, VLLMRoutedEmbeddings
    from .llama_index import VLLMRouted, VLLMRoutedEmbedding
    from .router import (
        AllRoutesFailed,
        AuthenticationError,
        BadRequestError,
        CallInfo,
        ConfigError,
        ContextOverflowError,
        FleetSaturatedError,
        InputTooLongError,
        InvalidRequestError,
        MalformedResponse,
        MixedEmbeddingsError,
        ModelNotFoundError,
        NoRouteOfKindError,
        PermanentRouteError,
        RetryBudgetExhausted,
        RouteError,
        Router,
        RouterClosed,
        RouterError,
        StreamInterruptedError,
        TransientRouteError,
        call_info,
    )
    from .router.errors import EndpointNotFoundError, UnknownModelError

__all__ = [
    "AllRoutesFailed",
    "FleetSaturatedError",
    "RetryBudgetExhausted",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "ChatVLLMRouted",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "EndpointNotFoundError",
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
    "UnknownModelError",
    "VLLMRouted",
    "VLLMRoutedEmbedding",
    "VLLMRoutedEmbeddings",
    "call_info",
    "config_from_dict",
    "load_config",
]


_HOMES = {
    "Config": "config",
    "load_config": "config",
    "config_from_dict": "config",
    "EndpointNotFoundError": "router.errors",
    "UnknownModelError": "router.errors",
    "ChatVLLMRouted": "langchain",
    "VLLMRoutedEmbeddings": "langchain",
    "VLLMRouted": "llama_index",
    "VLLMRoutedEmbedding": "llama_index",
}
"""The module of this package that holds each public name other than the router's."""


_PUBLIC = frozenset(__all__)
_FRAMEWORKS = {"langchain": "langchain_core", "llama_index": "llama_index"}
"""Each adapter module's framework, by its top-level package (finding it imports nothing)."""


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ``from anorag_integrations import *`` takes the adapters whose framework is installed (the others raise)
__all__ = [name for name in __all__ if _HOMES.get(name) not in _FRAMEWORKS or _installed(_FRAMEWORKS[_HOMES[name]])]


def __getattr__(name: str) -> Any:
    """Each name is imported on first use: adapters bring their framework, the router the HTTP client.

    So ``python -m anorag_integrations.testing`` (a fault server, started dozens of times by the
    benchmarks) does not pay for the openai SDK's import, nor a LangChain user for LlamaIndex's.
    """
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_HOMES.get(name, 'router')}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

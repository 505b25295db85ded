"""The seed's provider API, kept so existing anorag code works: factory, providers, LocalLLM.

Every provider is a thin face on a :class:`~anorag_integrations.router.Router`: vLLM and OpenAI
routes speak the OpenAI API, Ollama hosts their native one; failover and statistics are the router's.
"""

from __future__ import annotations

from .base import LLMProvider
from .factory import (
    PROVIDERS,
    LLMFactory,
    MultiOllamaProvider,
    OllamaProvider,
    OpenAIProvider,
    VLLMOpenAIProvider,
)
from .frameworks import create_chat_model, create_embed_model, create_embeddings, create_llm
from .local import LocalLLM

__all__ = [
    "PROVIDERS",
    "LLMFactory",
    "LLMProvider",
    "LocalLLM",
    "MultiOllamaProvider",
    "OllamaProvider",
    "OpenAIProvider",
    "VLLMOpenAIProvider",
    "create_chat_model",
    "create_embed_model",
    "create_embeddings",
    "create_llm",
]

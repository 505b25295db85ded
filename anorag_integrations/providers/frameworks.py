"""The framework-level switch: the chat model / LLM / embeddings the config's ``llm.provider`` asks for.

``vllm_openai`` gives this package's routed adapters; ``ollama`` gives LangChain's ``ChatOllama`` and
``OllamaEmbeddings`` and LlamaIndex's ``Ollama`` and ``OllamaEmbedding`` (the ``ollama`` extra),
configured from ``llm.ollama`` (``embedding_model`` for the embeddings). Swapping Ollama for vLLM is
then one line in config.yaml, with the chains and pipelines untouched.
"""

from __future__ import annotations

from typing import Any

from ..router import ConfigError
from .factory import OllamaSettings, _section, configured_provider


def _ollama(config: str | None) -> OllamaSettings:
    return _section("ollama", OllamaSettings, config)


def _ollama_embedding_model(config: str | None) -> OllamaSettings:
    settings = _ollama(config)
    if not settings.embedding_model:
        raise ConfigError(
            "llm.ollama.embedding_model", [("", "provider ollama needs the embedding model's name, e.g. all-minilm")]
        )
    return settings


def _missing(package: str) -> ImportError:
    return ImportError(f"provider ollama needs {package}: pip install 'anorag-integrations[ollama]'")


def create_chat_model(config: str | None = None, **params: Any) -> Any:
    """A LangChain chat model: ``ChatVLLMRouted`` or ``ChatOllama``."""
    provider = configured_provider(config)
    if provider == "vllm_openai":
        from ..langchain import ChatVLLMRouted

        return ChatVLLMRouted(config_path=config, **params)
    if provider == "ollama":
        try:
            from langchain_ollama import ChatOllama
        except ImportError:
            raise _missing("langchain-ollama") from None
        settings = _ollama(config)
        keep_alive = int(settings.keep_alive) if isinstance(settings.keep_alive, float) else settings.keep_alive
        options = {**settings.options, **params}
        return ChatOllama(base_url=settings.base_url, model=settings.model, keep_alive=keep_alive, **options)
    raise ConfigError(
        "llm.provider", [("", f"no LangChain model for provider {provider!r}; use vllm_openai or ollama")]
    )


def create_llm(config: str | None = None, **params: Any) -> Any:
    """A LlamaIndex LLM: ``VLLMRouted`` or LlamaIndex's ``Ollama``."""
    provider = configured_provider(config)
    if provider == "vllm_openai":
        from ..llama_index import VLLMRouted

        return VLLMRouted(config_path=config, **params)
    if provider == "ollama":
        try:
            from llama_index.llms.ollama import Ollama
        except ImportError:
            raise _missing("llama-index-llms-ollama") from None
        settings = _ollama(config)
        context = settings.options.get("num_ctx")
        extra = {"context_window": context} if context else {}
        return Ollama(
            model=settings.model,
            base_url=settings.base_url,
            request_timeout=settings.timeout,
            keep_alive=settings.keep_alive,
            additional_kwargs=settings.options,
            **extra,
            **params,
        )
    raise ConfigError("llm.provider", [("", f"no LlamaIndex LLM for provider {provider!r}; use vllm_openai or ollama")])


def create_embeddings(config: str | None = None, **params: Any) -> Any:
    """LangChain embeddings: ``VLLMRoutedEmbeddings`` or ``OllamaEmbeddings``."""
    provider = configured_provider(config)
    if provider == "vllm_openai":
        from ..langchain import VLLMRoutedEmbeddings

        return VLLMRoutedEmbeddings(config_path=config, **params)
    if provider == "ollama":
        try:
            from langchain_ollama import OllamaEmbeddings
        except ImportError:
            raise _missing("langchain-ollama") from None
        settings = _ollama_embedding_model(config)
        # LangChain's OllamaEmbeddings takes keep_alive in seconds only: a duration text ("5m") stays Ollama's default
        seconds: dict[str, Any] = {}
        if isinstance(settings.keep_alive, float | int):
            seconds["keep_alive"] = int(settings.keep_alive)
        return OllamaEmbeddings(base_url=settings.base_url, model=str(settings.embedding_model), **seconds, **params)
    raise ConfigError(
        "llm.provider", [("", f"no LangChain embeddings for provider {provider!r}; use vllm_openai or ollama")]
    )


def create_embed_model(config: str | None = None, **params: Any) -> Any:
    """A LlamaIndex embedding model (for ``Settings.embed_model``): ``VLLMRoutedEmbedding`` or ``OllamaEmbedding``."""
    provider = configured_provider(config)
    if provider == "vllm_openai":
        from ..llama_index import VLLMRoutedEmbedding

        return VLLMRoutedEmbedding(config_path=config, **params)
    if provider == "ollama":
        try:
            from llama_index.embeddings.ollama import OllamaEmbedding
        except ImportError:
            raise _missing("llama-index-embeddings-ollama") from None
        settings = _ollama_embedding_model(config)
        return OllamaEmbedding(
            model_name=str(settings.embedding_model),
            base_url=settings.base_url,
            keep_alive=settings.keep_alive,
            ollama_additional_kwargs=settings.options,
            **params,
        )
    raise ConfigError(
        "llm.provider", [("", f"no LlamaIndex embedding model for provider {provider!r}; use vllm_openai or ollama")]
    )

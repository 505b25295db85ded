"""The framework-level switch: the chat model / LLM / embeddings the config's ``llm.provider`` asks for.

``vllm_openai`` gives this package's routed adapters; ``ollama`` gives LangChain's ``ChatOllama`` and
``OllamaEmbeddings`` and LlamaIndex's ``Ollama`` and ``OllamaEmbedding`` (the ``ollama`` extra),
configured from ``llm.ollama`` (``embedding_model`` for the embeddings). Swapping Ollama for vLLM is
then one line in config.yaml, with the chains and pipelines untouched.

One table, ``_CHOICES``, says for each (framework, kind) which class each provider gives and how Ollama's
is configured; ``_create`` reads the config, picks and builds. The four public functions name its rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .._adapters import framework_missing
from ..router import ConfigError
from .factory import OllamaSettings, _section, configured_provider

Framework = Literal["langchain", "llama_index"]
Kind = Literal["chat", "embeddings"]

# Builds Ollama's object from its class, the ``llm.ollama`` settings and the caller's keyword arguments.
_OllamaBuild = Callable[[Any, OllamaSettings, dict[str, Any]], Any]


def _langchain_chat(cls: Any, settings: OllamaSettings, params: dict[str, Any]) -> Any:
    keep_alive = int(settings.keep_alive) if isinstance(settings.keep_alive, float) else settings.keep_alive
    options = {**settings.options, **params}
    return cls(base_url=settings.base_url, model=settings.model, keep_alive=keep_alive, **options)


def _llama_index_llm(cls: Any, settings: OllamaSettings, params: dict[str, Any]) -> Any:
    context = settings.options.get("num_ctx")
    extra = {"context_window": context} if context else {}
    return cls(
        model=settings.model,
        base_url=settings.base_url,
        request_timeout=settings.timeout,
        keep_alive=settings.keep_alive,
        additional_kwargs=settings.options,
        **extra,
        **params,
    )


def _langchain_embeddings(cls: Any, settings: OllamaSettings, params: dict[str, Any]) -> Any:
    # LangChain's OllamaEmbeddings takes keep_alive in seconds only: a duration text ("5m") stays Ollama's default
    seconds: dict[str, Any] = {}
    if isinstance(settings.keep_alive, float | int):
        seconds["keep_alive"] = int(settings.keep_alive)
    return cls(base_url=settings.base_url, model=str(settings.embedding_model), **seconds, **params)


def _llama_index_embeddings(cls: Any, settings: OllamaSettings, params: dict[str, Any]) -> Any:
    return cls(
        model_name=str(settings.embedding_model),
        base_url=settings.base_url,
        keep_alive=settings.keep_alive,
        ollama_additional_kwargs=settings.options,
        **params,
    )


@dataclass(frozen=True)
class _Choice:
    """What one (framework, kind) gives under each provider."""

    noun: str  # names the object in the error for a provider without one: "no LangChain model for ..."
    ours: tuple[str, str]  # (module, class) of our routed adapter, built with ``config_path=config``
    ollama: tuple[str, str, str]  # (pip package, module, class) of Ollama's integration
    build_ollama: _OllamaBuild


_CHOICES: dict[tuple[Framework, Kind], _Choice] = {
    ("langchain", "chat"): _Choice(
        "LangChain model",
        ("..langchain", "ChatVLLMRouted"),
        ("langchain-ollama", "langchain_ollama", "ChatOllama"),
        _langchain_chat,
    ),
    ("llama_index", "chat"): _Choice(
        "LlamaIndex LLM",
        ("..llama_index", "VLLMRouted"),
        ("llama-index-llms-ollama", "llama_index.llms.ollama", "Ollama"),
        _llama_index_llm,
    ),
    ("langchain", "embeddings"): _Choice(
        "LangChain embeddings",
        ("..langchain", "VLLMRoutedEmbeddings"),
        ("langchain-ollama", "langchain_ollama", "OllamaEmbeddings"),
        _langchain_embeddings,
    ),
    ("llama_index", "embeddings"): _Choice(
        "LlamaIndex embedding model",
        ("..llama_index", "VLLMRoutedEmbedding"),
        ("llama-index-embeddings-ollama", "llama_index.embeddings.ollama", "OllamaEmbedding"),
        _llama_index_embeddings,
    ),
}


def _import(module: str, name: str) -> Any:
    """``from module import name`` (``module`` may be relative to this package), its ImportError included."""
    loaded = importlib.import_module(module, __package__)
    try:
        return getattr(loaded, name)
    except AttributeError:
        raise ImportError(f"cannot import name {name!r} from {loaded.__name__!r}") from None


def _ours(module: str, name: str) -> Any:
    """Our adapter ``name``; when its framework is not installed, an error naming the extra that brings it."""
    try:
        return _import(module, name)
    except ModuleNotFoundError as missing:
        if (error := framework_missing(missing, name)) is None:
            raise
        raise error from None


def _ollama_settings(config: str | None, kind: Kind) -> OllamaSettings:
    """``llm.ollama`` of the config; embeddings also need its ``embedding_model``."""
    settings = _section("ollama", OllamaSettings, config)
    if kind == "embeddings" and not settings.embedding_model:
        raise ConfigError(
            "llm.ollama.embedding_model", [("", "provider ollama needs the embedding model's name, e.g. all-minilm")]
        )
    return settings


def _create(framework: Framework, kind: Kind, config: str | None, params: dict[str, Any]) -> Any:
    """The object of ``framework`` and ``kind`` that the config's provider asks for, built with ``params``."""
    choice = _CHOICES[framework, kind]
    provider = configured_provider(config)
    if provider == "vllm_openai":
        return _ours(*choice.ours)(config_path=config, **params)
    if provider == "ollama":
        package, module, name = choice.ollama
        try:
            cls = _import(module, name)
        except ImportError:
            raise ImportError(f"provider ollama needs {package}: pip install 'anorag-integrations[ollama]'") from None
        return choice.build_ollama(cls, _ollama_settings(config, kind), params)
    raise ConfigError("llm.provider", [("", f"no {choice.noun} for provider {provider!r}; use vllm_openai or ollama")])


def create_chat_model(config: str | None = None, **params: Any) -> Any:
    """A LangChain chat model: ``ChatVLLMRouted`` or ``ChatOllama``."""
    return _create("langchain", "chat", config, params)


def create_llm(config: str | None = None, **params: Any) -> Any:
    """A LlamaIndex LLM: ``VLLMRouted`` or LlamaIndex's ``Ollama``."""
    return _create("llama_index", "chat", config, params)


def create_embeddings(config: str | None = None, **params: Any) -> Any:
    """LangChain embeddings: ``VLLMRoutedEmbeddings`` or ``OllamaEmbeddings``."""
    return _create("langchain", "embeddings", config, params)


def create_embed_model(config: str | None = None, **params: Any) -> Any:
    """A LlamaIndex embedding model (for ``Settings.embed_model``): ``VLLMRoutedEmbedding`` or ``OllamaEmbedding``."""
    return _create("llama_index", "embeddings", config, params)

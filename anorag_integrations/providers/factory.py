"""LLMFactory and the providers it builds from ``config.yaml`` (``llm.provider`` chooses)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .._adapters import shared_router
from ..config import config_from_dict, read_document
from ..router import ConfigError, Router
from .base import LLMProvider

OLLAMA_URL = "http://localhost:11434"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OllamaSettings(_Settings):
    base_url: str = OLLAMA_URL
    model: str
    embedding_model: str | None = Field(default=None, description="the model embeddings use, e.g. all-minilm")
    timeout: float = Field(default=120.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: str | float | None = None


class MultiOllamaSettings(_Settings):
    hosts: list[str] = Field(min_length=1)
    model: str
    lb_policy: str = "least_outstanding"
    timeout: float = Field(default=120.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: str | float | None = None


class OpenAISettings(_Settings):
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = None
    timeout: float = Field(default=60.0, gt=0)


def configured_provider(config: str | None) -> str:
    """``llm.provider`` of the config file (``vllm_openai`` when absent); no routes needed."""
    data, _ = read_document(config)
    llm = data.get("llm") if isinstance(data, dict) else None
    provider = llm.get("provider") if isinstance(llm, dict) else None
    return str(provider or "vllm_openai")


_S = TypeVar("_S", bound=_Settings)


def _section(name: str, cls: type[_S], config: str | None) -> _S:
    """Validate ``llm.<name>`` of the config file; errors name the file and key path."""
    data, source = read_document(config)
    llm = data.get("llm") if isinstance(data, dict) else None
    section = llm.get(name) if isinstance(llm, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(source, [(f"llm.{name}", f"missing: the {name} provider needs this section")])
    try:
        return cls.model_validate(section)
    except ValidationError as exc:
        problems = [(".".join(("llm", name, *map(str, e["loc"]))), e["msg"]) for e in exc.errors()]
        raise ConfigError(source, problems) from None


def _ollama_route(url: str, settings: OllamaSettings | MultiOllamaSettings) -> dict[str, Any]:
    route: dict[str, Any] = {"api": "ollama", "base_url": url, "model": settings.model, "timeout": settings.timeout}
    route["options"] = settings.options
    if settings.keep_alive is not None:
        route["keep_alive"] = settings.keep_alive
    return route


class VLLMOpenAIProvider(LLMProvider):
    """vLLM servers through the router: ``VLLMOpenAIProvider(base_url=..., model=...)`` or config routes."""

    name = "vllm_openai"

    def __init__(
        self, base_url: str | None = None, model: str | None = None, *, config: str | None = None, **defaults: Any
    ) -> None:
        router = shared_router(config, base_url=base_url, model=model, api_key=None)  # the adapters' router
        super().__init__(router, **defaults)


class OpenAIProvider(LLMProvider):
    """OpenAI (or any OpenAI-compatible cloud) from ``llm.openai``; key from there or ``OPENAI_API_KEY``."""

    name = "openai"

    def __init__(self, *, config: str | None = None, **defaults: Any) -> None:
        settings = _section("openai", OpenAISettings, config)
        key = settings.api_key.get_secret_value() if settings.api_key else os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError("llm.openai", [("api_key", "missing: set llm.openai.api_key or OPENAI_API_KEY")])
        route = {"base_url": settings.base_url, "model": settings.model, "api_key": key, "timeout": settings.timeout}
        router = Router(config_from_dict({"llm": {"routes": {"openai": route}}}, source="llm.openai", env={}))
        super().__init__(router, **defaults)


class OllamaProvider(LLMProvider):
    """One Ollama host over its native API (``/api/chat``, NDJSON streams, ``options``) from ``llm.ollama``."""

    name = "ollama"

    def __init__(self, *, config: str | None = None, **defaults: Any) -> None:
        settings = _section("ollama", OllamaSettings, config)
        document = {"llm": {"routes": {"ollama": _ollama_route(settings.base_url, settings)}}}
        super().__init__(Router(config_from_dict(document, source="llm.ollama", env={})), **defaults)


class MultiOllamaProvider(LLMProvider):
    """Several Ollama hosts balanced by the router's policies, breakers and failover (``llm.multi_ollama``)."""

    name = "multi_ollama"

    def __init__(self, *, config: str | None = None, **defaults: Any) -> None:
        settings = _section("multi_ollama", MultiOllamaSettings, config)
        routes = {f"ollama_{i}": _ollama_route(url, settings) for i, url in enumerate(settings.hosts)}
        document = {"llm": {"routes": routes, "lb_policy": settings.lb_policy}}
        super().__init__(Router(config_from_dict(document, source="llm.multi_ollama", env={})), **defaults)


PROVIDERS: dict[str, type[LLMProvider]] = {
    "vllm_openai": VLLMOpenAIProvider,
    "openai": OpenAIProvider,
    "ollama": OllamaProvider,
    "multi_ollama": MultiOllamaProvider,
}


class LLMFactory:
    """``LLMFactory.create_provider(name=None, config=None)``; ``llm.provider`` chooses by default."""

    providers: ClassVar[dict[str, type[LLMProvider]]] = PROVIDERS

    @classmethod
    def create_provider(cls, name: str | None = None, config: str | None = None, **defaults: Any) -> LLMProvider:
        name = name or configured_provider(config)
        try:
            provider = cls.providers[name]
        except KeyError:
            raise ConfigError(
                "llm.provider", [("", f"unknown provider {name!r}; choose one of {', '.join(cls.providers)}")]
            ) from None
        return provider(config=config, **defaults)

"""The fields every LangChain adapter takes to find its router, and how it finds it (one set of rules)."""

from __future__ import annotations

from typing import Any

from langchain_core.utils import secret_from_env
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .._adapters import API_KEY_ENV, arguments_error, shared_router, sort_arguments
from ..router import Router
from ..router.secrets import redact_repr_args


class Routed(BaseModel):
    """``config_path`` / ``router`` / ``route`` / ``model`` / ``base_url`` / ``api_key``, and the per-call bounds.

    ``ChatVLLMRouted()`` and ``VLLMRoutedEmbeddings()`` read ``./config.yaml`` (or ``$ANORAG_CONFIG``);
    ``config_path=`` names a file, ``router=`` shares a router, ``base_url=`` + ``model=`` skip the config
    for a single server, ``route=`` pins a route. Adapters built from the same config share one router.

    Any problem with the arguments or the config raises ``ConfigError`` (``NoRouteOfKindError`` when the
    config has no route of the adapter's kind); an unknown argument goes to ``model_kwargs``, with a warning.
    """

    config_path: str | None = None
    router: Router | None = Field(default=None, exclude=True)
    route: str | None = None
    model_name: str | None = Field(default=None, alias="model")
    """Model to request; default: each route's configured model."""
    base_url: str | None = None
    api_key: SecretStr | None = Field(default_factory=secret_from_env(API_KEY_ENV, default=None))
    """Passed explicitly: every route's key. Read from ``$VLLM_API_KEY``: the default route's (config loader)."""
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds per attempt; default: each route's ``timeout``, else ``params.timeout``."""
    max_retries: int | None = Field(default=None, ge=0)
    """Extra full rounds over the routes; default ``params.max_retries``."""
    priority: int | None = None
    """Lower is served first when the fleet is saturated (e.g. 0 interactive, 10 batch); default 0."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other request parameters, sent as they are (vLLM's ``top_k``, ``use_activation``, ...); unknown arguments too."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        """Pydantic's ``ValidationError`` becomes the package's ``ConfigError``, its own message first."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise arguments_error(type(self).__name__, exc) from None

    @model_validator(mode="before")
    @classmethod
    def _sort_arguments(cls, data: Any) -> Any:
        """Unknown arguments go to ``model_kwargs`` (warned of), or raise when they cannot be meant for the server."""
        if not isinstance(data, dict):
            return data
        known = {key for name, field in cls.model_fields.items() for key in (name, field.alias) if key}
        return sort_arguments(cls.__name__, data, known, "model_kwargs")

    def _connect_router(self, kind: str) -> Router:
        """The router given, else the shared one of the config (or of ``base_url``, a route of ``kind``)."""
        if self.router is None:
            key = self.api_key if "api_key" in self.model_fields_set else None  # else $VLLM_API_KEY's default
            self.router = shared_router(
                self.config_path, base_url=self.base_url, model=self.model_name, api_key=key, kind=kind
            )
        return self.router

    @property
    def _router(self) -> Router:
        assert self.router is not None  # set by the adapter's validator
        return self.router

    def __repr_args__(self) -> Any:
        """Fields for repr: credentials in ``base_url`` are masked."""
        return redact_repr_args(super().__repr_args__())

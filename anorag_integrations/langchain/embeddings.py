"""VLLMRoutedEmbeddings: LangChain embeddings over the routes of kind ``embedding``; it converts, nothing else.

Batching, failover, retries, truncation and statistics are the router's (``Router.embed``). Built
from the same config as a ``ChatVLLMRouted`` it shares that model's router, so one health state
covers both.
"""

from __future__ import annotations

from typing import Any, Self

from langchain_core.embeddings import Embeddings
from pydantic import ConfigDict, Field, model_validator

from .._adapters import embedding_model, embedding_params, embedding_route, vectors
from ._errors import langchain_errors
from ._routed import Routed


class VLLMRoutedEmbeddings(Routed, Embeddings):
    """Embeddings from a fleet of vLLM pooling servers (routes with ``kind: embedding``).

    Same constructor rules as ``ChatVLLMRouted``: ``VLLMRoutedEmbeddings()`` reads ``./config.yaml``
    (or ``$ANORAG_CONFIG``), ``config_path=`` names a file, ``router=`` shares a router, ``base_url=`` +
    ``model=`` skip the config for a single server, ``route=`` pins an embedding route.
    """

    batch_size: int | None = Field(default=None, gt=0)
    """Inputs per request; default ``embedding.batch_size`` of the config."""
    truncate: bool | None = None
    """Let the server cut inputs past its context window; default ``embedding.truncate`` of the config."""

    model_config = ConfigDict(protected_namespaces=())  # model_name is a field, not pydantic's

    @model_validator(mode="after")
    def _connect(self) -> Self:
        router = self._connect_router("embedding")
        router._check_kind("embedding")  # NoRouteOfKindError now, not at the first call
        embedding_route(type(self).__name__, router, self.route)
        return self

    @property
    def model(self) -> str:
        """The model requested: ``model=``, else the route's (the default embedding route's)."""
        return embedding_model(self._router, self.route, self.model_name)

    # --- Embeddings -------------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order (batched, failed over and retried by the router)."""
        with langchain_errors():
            return vectors(self._router.embed(texts, **self._params()))

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async twin of :meth:`embed_documents` on the router's async path."""
        with langchain_errors():
            return vectors(await self._router.aembed(texts, **self._params()))

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]

    # --- internal --------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        """The router keywords of a call: the fields that are set, then ``model_kwargs``."""
        return {**embedding_params(self, model=self.model_name, batch_size=self.batch_size), **self.model_kwargs}

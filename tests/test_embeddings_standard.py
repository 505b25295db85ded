"""LangChain's own standard embeddings suites for VLLMRoutedEmbeddings (unit: no network; integration: live).

The integration half runs against a real vLLM pooling server (all-MiniLM-L6-v2), through a config
file with one route of kind embedding, as a user would set it up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from langchain_core.embeddings import Embeddings
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from anorag_integrations.langchain import VLLMRoutedEmbeddings

UNIT_CONFIG = "tests/data/unit_embeddings.yaml"


def one_route_config(tmp: pytest.TempPathFactory, name: str, base_url: str, model: str = "minilm") -> str:
    """A config file with one embedding route, as a user would write it; its path."""
    path = Path(tmp.getbasetemp()) / f"{name}_embeddings.yaml"
    route = {"base_url": base_url, "model": model, "kind": "embedding", "timeout": 60}
    path.write_text(yaml.safe_dump({"llm": {"routes": {"minilm": route}}}))
    return str(path)


class TestVLLMRoutedEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[Embeddings]:
        return VLLMRoutedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"config_path": UNIT_CONFIG}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"VLLM_API_KEY": "sk-from-env"}, {"config_path": UNIT_CONFIG}, {"api_key": "sk-from-env"}


@pytest.mark.live
class TestVLLMRoutedEmbeddingsIntegration(EmbeddingsIntegrationTests):
    _config: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _server(self, vllm_embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
        type(self)._config = one_route_config(tmp_path_factory, "live", vllm_embedder.base_url, vllm_embedder.alias)

    @property
    def embeddings_class(self) -> type[Embeddings]:
        return VLLMRoutedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"config_path": type(self)._config}


CASSETTE_PORT = 8213
"""Fixed port of the pooling server the embeddings cassettes were recorded from (`make record` starts it)."""


@pytest.mark.vcr
class TestVLLMRoutedEmbeddingsCassettes(EmbeddingsIntegrationTests):
    """The same suite replayed from cassettes/ (recorded from a real vLLM pooling server): no network."""

    _config: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _server(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        type(self)._config = one_route_config(tmp_path_factory, "cassette", f"http://127.0.0.1:{CASSETTE_PORT}/v1")

    @property
    def embeddings_class(self) -> type[Embeddings]:
        return VLLMRoutedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"config_path": type(self)._config}

"""LangChain's own standard test suites for ChatVLLMRouted (unit: no network; integration: live)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from anorag_integrations.langchain import ChatVLLMRouted

MODEL = "smollm2"
"""The served name of SmolLM2-135M-Instruct on the test session's vLLM servers."""
UNIT_CONFIG = "tests/data/unit_config.yaml"  # relative: the serialisation snapshot must not hold a machine path


class TestChatVLLMRoutedUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatVLLMRouted

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"config_path": UNIT_CONFIG}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"VLLM_API_KEY": "sk-from-env"}, {"config_path": UNIT_CONFIG}, {"api_key": "sk-from-env"}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.mark.xfail(
        strict=True,
        reason="langchain-core's load(allowed_objects='all') admits only the partner classes in its own "
        "mapping, never a third-party class; test_serialisation_round_trip loads with an explicit allowlist",
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
def test_serialisation_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.load import dumpd, dumps, load

    monkeypatch.setenv("VLLM_API_KEY", "sk-from-env")
    model = ChatVLLMRouted(config_path=UNIT_CONFIG, temperature=0.3, max_tokens=7, route="gpu_b")
    data = dumpd(model)
    assert "sk-from-env" not in dumps(model)  # the key is a reference to $VLLM_API_KEY, not its value
    loaded = load(
        data, allowed_objects=[ChatVLLMRouted], valid_namespaces=["anorag_integrations"], secrets_from_env=True
    )
    assert isinstance(loaded, ChatVLLMRouted)
    assert (loaded.temperature, loaded.max_tokens, loaded.route) == (0.3, 7, "gpu_b")
    assert loaded.api_key is not None and loaded.api_key.get_secret_value() == "sk-from-env"
    assert loaded.router is model.router  # same config, same process: one shared router


# What SmolLM2-135M did on vLLM 0.32 (--enable-auto-tool-choice --tool-call-parser hermes, max_tokens 80):
# each test below fails on the model's output, not on the request or its conversion (which
# test_langchain.py covers against FaultServer).
NEVER_CLOSES = (
    "SmolLM2-135M, asked for a call to magic_function(input: int), wrote "
    """'<tool_call> {"name": "magic_function", "arguments": [1, 3, 4, 5, ...' until max_tokens: """
    "vLLM's hermes parser found no complete call"
)


@pytest.mark.live
class TestChatVLLMRoutedIntegration(ChatModelIntegrationTests):
    _config: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _servers(self, vllm_pair: list[Any], tmp_path_factory: pytest.TempPathFactory) -> None:
        self._write_config(tmp_path_factory, "live_config.yaml", [s.base_url for s in vllm_pair])

    @classmethod
    def _write_config(cls, tmp: pytest.TempPathFactory, name: str, urls: list[str]) -> None:
        import yaml

        path = tmp.getbasetemp() / name
        routes = {f"vllm{i}": {"base_url": url, "model": MODEL, "timeout": 60} for i, url in enumerate(urls)}
        path.write_text(yaml.safe_dump({"llm": {"routes": routes, "lb_policy": "round_robin"}}))
        cls._config = str(path)

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatVLLMRouted

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"config_path": type(self)._config, "temperature": 0, "max_tokens": 80}  # room for a whole JSON answer

    xfail_reasons: ClassVar[dict[str, str]] = {
        "test_tool_calling": NEVER_CLOSES,
        "test_tool_calling_async": NEVER_CLOSES,
        "test_bind_runnables_as_tools": "SmolLM2-135M wrote greeting_generator's arguments as a list of nested "
        "objects that never closed before max_tokens: no call parsed",
        "test_tool_choice": 'forced to call magic_function, SmolLM2-135M wrote \'"arguments": "mamagmamag...\' '
        "until max_tokens: no call parsed",
        "test_tool_calling_with_no_arguments": "for a tool without parameters SmolLM2-135M wrote arguments "
        '[1, "magic_function_no_args_1", 2, ...]: no call parsed',
        "test_agent_loop": "with tool_choice='auto' SmolLM2-135M answers the weather question in prose and never "
        "calls get_weather",
        "test_unicode_tool_call_integration": "SmolLM2-135M's streamed call had arguments that are a JSON string, "
        "not an object (the adapter keeps it in invalid_tool_calls)",
    }
    """Read by conftest.pytest_collection_modifyitems: one xfail per test the small model cannot pass."""

    xfail_run: ClassVar[bool] = False
    """Live, those are not run: each spent 20-60 s of CPU to watch the model fail again. The cassette suite
    below replays what the model did (recorded by `make record`), so their requests and conversion still run."""

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per server

    skip_reasons: ClassVar[dict[str, str]] = {
        # Marked vcr by langchain-tests, so `make record` (-m vcr) would start the live servers for it.
        "test_stream_time": "a pytest-benchmark timing, not a check: benchmarks/ measures streaming overhead",
    }
    """Read by conftest.pytest_collection_modifyitems: skipped before any fixture (no server starts)."""


CASSETTE_PORTS = (8211, 8212)
"""Fixed ports of the vLLM servers the cassettes were recorded from (`make record` starts them)."""


@pytest.mark.vcr
class TestChatVLLMRoutedCassettes(TestChatVLLMRoutedIntegration):
    """The same suite replayed from cassettes/ (recorded from two real vLLM servers): no network."""

    xfail_run: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _servers(self, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[override]
        self._write_config(
            tmp_path_factory, "cassette_config.yaml", [f"http://127.0.0.1:{p}/v1" for p in CASSETTE_PORTS]
        )

"""Set-up mistakes, as all four adapters and the router report them: each says what is wrong and how to fix it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from langchain_core import exceptions as lc_errors

from anorag_integrations import (
    ConfigError,
    EndpointNotFoundError,
    ModelNotFoundError,
    Router,
)
from anorag_integrations.langchain import ChatVLLMRouted, VLLMRoutedEmbeddings
from anorag_integrations.llama_index import VLLMRouted, VLLMRoutedEmbedding
from anorag_integrations.router.classify import classify, trips_breaker
from anorag_integrations.testing import FaultServer

from .conftest import MODEL, USER

ADAPTERS = [ChatVLLMRouted, VLLMRoutedEmbeddings, VLLMRouted, VLLMRoutedEmbedding]
EXTRA = {ChatVLLMRouted: "model_kwargs", VLLMRoutedEmbeddings: "model_kwargs"}
"""Where each adapter keeps request parameters it has no argument for (LlamaIndex: additional_kwargs)."""
SECRET = "sk-secret-123"


def extra_of(adapter: Any) -> dict[str, Any]:
    return getattr(adapter, EXTRA.get(type(adapter), "additional_kwargs"))  # type: ignore[no-any-return]


@pytest.fixture
def mixed_router(router_for: Callable[..., Router]) -> Router:
    """Chat route a and embedding route b: a router every adapter can be built on."""
    return router_for("a", "b", route_overrides={"b": {"kind": "embedding"}})


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda cls: cls.__name__)
def test_a_broken_config_raises_config_error_with_its_own_message_first(tmp_path: Path, adapter: type) -> None:
    path = tmp_path / "config.yaml"
    routes = {"e": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "kind": "embedding", "timeout": -1}}
    path.write_text(yaml.safe_dump({"llm": {"routes": routes}}))
    with pytest.raises(ConfigError) as info:
        adapter(config_path=str(path))
    assert str(info.value).startswith("invalid configuration\n"), str(info.value)  # not pydantic's wrapper
    assert f"{path}: llm.routes.e.timeout: Input should be greater than 0" in str(info.value)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(
    ("argument", "value", "problem"),
    [
        ("timeout", -1, "timeout: Input should be greater than 0 (got -1)"),
        ("timeout", float("inf"), "timeout: Input should be a finite number"),
        ("max_retries", -2, "max_retries: Input should be greater than or equal to 0"),
        ("route", "nope", "route 'nope' is not among the"),
        ("api_key", ["sk-secret-123"], "api_key: Input should be a valid string"),
    ],
)
def test_bad_argument_values_raise_config_error_naming_the_argument(
    mixed_router: Router, adapter: type, argument: str, value: Any, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        adapter(router=mixed_router, **{argument: value})
    text = str(info.value)
    assert f"{adapter.__name__} arguments: " in text and problem in text, text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("adapter", "argument", "value", "problem"),
    [
        (ChatVLLMRouted, "temperature", 7, "temperature: Input should be less than or equal to 2"),
        (VLLMRouted, "top_p", 0, "top_p: Input should be greater than 0"),
        (VLLMRouted, "max_tokens", 0, "max_tokens: Input should be greater than 0"),
        (VLLMRoutedEmbeddings, "batch_size", 0, "batch_size: Input should be greater than 0"),
    ],
)
def test_bad_request_defaults_are_refused_when_built_not_at_the_first_call(
    mixed_router: Router, adapter: type, argument: str, value: Any, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        adapter(router=mixed_router, **{argument: value})


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda cls: cls.__name__)
def test_an_unknown_argument_is_warned_of_and_kept_for_the_server(mixed_router: Router, adapter: type) -> None:
    with pytest.warns(UserWarning, match=r"'temprature'.*, 'top_k' are not arguments; sent to the server") as seen:
        built = adapter(router=mixed_router, temprature=0.5, top_k=4)
    [warning] = [w for w in seen if "not arguments" in str(w.message)]
    assert warning.filename == __file__  # the user's line, not pydantic's
    hint = "'temprature' (did you mean 'temperature'?)"  # the chat models have a temperature; no "did you mean top_p"
    assert (hint in str(warning.message)) is ("temperature" in adapter.model_fields), warning.message
    assert extra_of(built) == {"temprature": 0.5, "top_k": 4}


def test_unknown_arguments_reach_the_request(servers: dict[str, FaultServer], mixed_router: Router) -> None:
    with pytest.warns(UserWarning, match="top_k"):
        chat = ChatVLLMRouted(router=mixed_router, top_k=4, model_kwargs={"seed": 1})
    chat.invoke("hi")
    assert (servers["a"].requests[-1]["top_k"], servers["a"].requests[-1]["seed"]) == (4, 1)
    with pytest.warns(UserWarning, match="min_p"):
        llm = VLLMRouted(router=mixed_router, min_p=0.1)
    llm.complete("hi")
    assert servers["a"].requests[-1]["min_p"] == 0.1


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda cls: cls.__name__)
def test_arguments_that_cannot_be_meant_for_the_server_raise(mixed_router: Router, adapter: type) -> None:
    extra = "model_kwargs" if adapter in EXTRA else "additional_kwargs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused outright: nothing is moved, so nothing is warned of
        with pytest.raises(ConfigError) as info:
            adapter(
                router=mixed_router,
                config={"llm": {}},
                api_kye=SECRET,
                openai_api_key=SECRET,
                access_token=SECRET,
                client=object(),
                seed=1,
                **{extra: {"seed": 2}},
            )
    text = str(info.value)
    assert text.startswith("6 problems in configuration"), text
    assert f"config: not an argument of {adapter.__name__}; did you mean config_path?" in text
    assert "Router.from_config({...})" in text  # how to pass a config that is already a dict
    assert "api_kye: not an argument" in text and "did you mean api_key?" in text
    assert "openai_api_key: not an argument" in text and text.count("did you mean api_key?") == 2
    assert "access_token: not an argument" in text and "a secret is never sent" in text
    assert "client: not an argument" in text and "a object cannot be sent to the server" in text
    assert f"seed: given twice: as an argument and in {extra}" in text
    assert SECRET not in text


def test_a_misspelt_config_path_no_longer_reads_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``config={...}`` used to be ignored: ./config.yaml was read instead, silently."""
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"llm": {"routes": {"x": {"base_url": "http://h:1/v1", "model": "m"}}}})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANORAG_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="did you mean config_path"):
        ChatVLLMRouted(config="other.yaml")


# --- a base_url without /v1 ----------------------------------------------------------------------------------------


def test_a_base_url_without_v1_says_so_instead_of_blaming_the_model(servers: dict[str, FaultServer]) -> None:
    root = servers["a"].base_url.removesuffix("/v1")
    routes = {"a": {"base_url": root, "model": MODEL}, "b": {"base_url": servers["b"].base_url, "model": MODEL}}
    router = Router.from_config({"llm": {"routes": routes, "params": {"max_retries": 0}, "default_route": "a"}})
    try:
        with pytest.raises(EndpointNotFoundError) as info:
            router.chat(USER, route="a")
        error = info.value
        assert not isinstance(error, ModelNotFoundError) and error.status == 404
        assert error.message == "the server has no /chat/completions"
        assert error.hint == f"does base_url end with /v1? vLLM serves the API under /v1: base_url: {root}/v1"
        health = router.health()["a"]
        assert health["dropped"] == [] and health["serves"] == [MODEL]  # the model's group keeps the route
        assert router.stats()["a"]["failures"] == 1
        probed = router.routes["a"].probe()  # the prober says the same
        assert probed.healthy is False and "the server has no /models" in (probed.error or "")
        assert f"base_url: {root}/v1" in (probed.error or "")
    finally:
        router.close()


def test_the_langchain_adapter_reports_a_missing_v1_as_both_error_types(servers: dict[str, FaultServer]) -> None:
    llm = ChatVLLMRouted(base_url=servers["c"].base_url.removesuffix("/v1"), model=MODEL, max_retries=0)
    with pytest.raises(lc_errors.ModelNotFoundError) as info:
        llm.invoke("hi")
    assert isinstance(info.value, EndpointNotFoundError) and "does base_url end with /v1?" in str(info.value)


def _not_found(url: str, body: object) -> openai.NotFoundError:
    request = httpx.Request("POST", url)
    response = httpx.Response(404, json=body, request=request)
    return openai.NotFoundError("Error code: 404", response=response, body=body)


def test_fastapis_path_404_and_vllms_model_404_are_told_apart() -> None:
    """vLLM (FastAPI) answers a path it has no handler for with ``{"detail": "Not Found"}``."""
    where: dict[str, Any] = {"route": "r", "model": "m", "timeout": None}
    path = classify(_not_found("http://h:8000/chat/completions", {"detail": "Not Found"}), url="http://h:8000", **where)
    assert isinstance(path, EndpointNotFoundError) and trips_breaker(path)
    assert "the server has no /chat/completions" in str(path) and "base_url: http://h:8000/v1" in str(path)
    mounted = classify(
        _not_found("http://h:8000/v1/embeddings", {"detail": "Not Found"}), url="http://h:8000/v1", **where
    )
    assert isinstance(mounted, EndpointNotFoundError) and "/v1/embeddings" in str(mounted)
    assert "does base_url end with /v1" not in str(mounted)  # it does: the hint says what else to check
    vllm_model = {"message": "The model `m` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}
    model = classify(_not_found("http://h:8000/v1/chat/completions", vllm_model), url="http://h:8000/v1", **where)
    assert type(model) is ModelNotFoundError and not trips_breaker(model)

"""What the hostile review of issue 30 found: each defect, as a test (errors must say what to do, lose nothing,
and a caller's mistake must never count against a route)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest

from anorag_integrations import (
    AllRoutesFailed,
    ConfigError,
    EndpointNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    Router,
)
from anorag_integrations.config import config_from_dict
from anorag_integrations.langchain import ChatVLLMRouted, VLLMRoutedEmbeddings
from anorag_integrations.llama_index import VLLMRouted
from anorag_integrations.router.classify import status_error
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.testing import FaultServer

from .conftest import MODEL, USER, make_config

KEY = "sk-live-0123456789abcdef"


def test_a_route_without_v1_fails_over_to_one_that_serves(servers: dict[str, FaultServer]) -> None:
    routes = {"a": servers["a"].base_url.removesuffix("/v1"), "b": servers["b"]}
    with Router(make_config(routes), start_prober=False) as router:
        answers = [router.chat(USER).choices[0].message.content for _ in range(6)]
        assert answers == ["from b"] * 6
        assert "EndpointNotFoundError" in (router.stats()["a"]["last_error"] or "")


def test_once_the_breakers_are_open_the_error_still_says_why(servers: dict[str, FaultServer]) -> None:
    routes = {"a": servers["a"].base_url.removesuffix("/v1")}
    with Router(make_config(routes, health={"failure_threshold": 1}), start_prober=False) as router:
        with pytest.raises(EndpointNotFoundError):
            router.chat(USER)
        assert router.routes["a"].breaker.state is BreakerState.OPEN
        with pytest.raises(AllRoutesFailed, match=r"all circuit breakers open; last: .*does base_url end with /v1"):
            router.chat(USER)


@pytest.mark.parametrize(
    "message",
    ["<html><body><h1>404 Not Found</h1>nginx</body></html>", "File Not Found", "", "Cannot POST /v1/x"],
)
def test_a_404_that_names_no_model_is_the_endpoint_not_the_model(message: str) -> None:
    error = status_error(404, message, route="a", url="http://h:8000/v1", model="m")
    assert isinstance(error, EndpointNotFoundError) and not isinstance(error, ModelNotFoundError)


def test_vllms_model_404_is_still_the_model() -> None:
    error = status_error(404, "The model `m` does not exist.", route="a", url="http://h:8000/v1", model="m")
    assert isinstance(error, ModelNotFoundError)


def test_a_base_url_that_is_an_endpoint_gets_the_root_back() -> None:
    url = "http://h:8000/v1/chat/completions"
    error = status_error(404, "Not Found", route="a", url=url, model="m", body={"detail": "Not Found"})
    assert error.hint == "base_url is the API's root, not an endpoint: base_url: http://h:8000/v1"


@pytest.mark.parametrize("where", ["model_kwargs", "bind"])
def test_a_callers_stream_field_is_refused_and_no_route_pays_for_it(
    servers: dict[str, FaultServer], where: str
) -> None:
    with Router(make_config({"a": servers["a"]}), start_prober=False) as router:
        if where == "model_kwargs":
            llm = ChatVLLMRouted(router=router, model_kwargs={"stream": True})
            with pytest.raises(InvalidRequestError, match="'stream' is set by the router"):
                llm.invoke("hi")
        else:
            with pytest.raises(InvalidRequestError, match="'messages' is set by the router"):
                router.chat(USER, extra_body={"messages": []})
        assert servers["a"].hits == 0 and router.routes["a"].breaker._failures == 0


def test_model_kwargs_may_not_hold_arguments_secrets_or_headers(servers: dict[str, FaultServer]) -> None:
    with Router(make_config({"a": servers["a"]}), start_prober=False) as router:
        for kwargs in ({"temperature": 99}, {"api_key": KEY}, {"Authorization": f"Bearer {KEY}"}):
            with pytest.raises(ConfigError) as raised:
                ChatVLLMRouted(router=router, model_kwargs=kwargs)
            assert KEY not in str(raised.value)
        with pytest.raises(ConfigError, match="headers are not set per adapter") as raised:
            ChatVLLMRouted(router=router, default_headers={"Authorization": f"Bearer {KEY}"})
        assert KEY not in str(raised.value)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llm = ChatVLLMRouted(router=router, max_token=5)  # a misspelling, no secret: sent, with a warning
        assert "max_token" in str(caught[0].message) and llm.model_kwargs == {"max_token": 5}


def test_embeddings_adapters_decode_base64_vectors() -> None:
    from anorag_integrations.llama_index import VLLMRoutedEmbedding
    from anorag_integrations.testing.embeddings import fake_vector

    with FaultServer(MODEL) as server:
        routes = {"e": {"base_url": server.base_url, "model": MODEL, "kind": "embedding"}}
        with Router(config_from_dict({"llm": {"routes": routes}}, env={}), start_prober=False) as router:
            wanted = pytest.approx(fake_vector("x"), abs=1e-6)
            lc = VLLMRoutedEmbeddings(router=router, model_kwargs={"encoding_format": "base64"})
            assert lc.embed_query("x") == wanted  # floats, not the base64 text's characters
            li = VLLMRoutedEmbedding(router=router, additional_kwargs={"encoding_format": "base64"})
            assert li.get_text_embedding("x") == wanted


def test_a_path_given_as_router_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"expected a Router, got str \(a config file: config_path"):
        VLLMRouted("config.yaml")  # type: ignore[arg-type]


def test_from_config_never_echoes_text_it_cannot_read() -> None:
    text = f"llm:\n  routes:\n    a: {{base_url: http://h/v1, model: m, api_key: {KEY}}}\n"
    with pytest.raises(ConfigError, match="YAML text") as raised:
        Router.from_config(text)
    assert KEY not in str(raised.value)
    for wrong in (b"llm: {}", 5, ["llm"]):
        with pytest.raises(ConfigError, match="expected a config file's path, a dict or a Config"):
            Router.from_config(wrong)  # type: ignore[arg-type]


def test_the_demo_reports_a_config_yaml_that_is_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anorag_integrations.cli.demo import demo_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(ConfigError):
        demo_config(None, env={})
    (tmp_path / "config.yaml").rmdir()
    (tmp_path / "config.yaml").symlink_to(tmp_path / "missing.yaml")  # dangling
    with pytest.raises(ConfigError):
        demo_config(None, env={})


def test_setup_does_not_take_an_interrupted_virtualenv_for_a_finished_one(tmp_path: Path) -> None:
    from anorag_integrations.cli import setup

    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to("/bin/true")  # what Ctrl-C during `python -m venv` can leave
    with pytest.raises(setup.SetupError, match="did not answer as a Python does"):
        setup._make_venv(env, "/bin/true", setup._Progress(io.StringIO()))

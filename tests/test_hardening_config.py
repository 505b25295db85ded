"""Secrets and hostile input: config errors, credentials in base_url, adapter keys and serialisation."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from anorag_integrations import ConfigError, Router, RouterError, load_config
from anorag_integrations.config import MAX_ALIAS_EXPANSION, config_from_dict
from anorag_integrations.langchain import ChatVLLMRouted
from anorag_integrations.llama_index import VLLMRouted
from anorag_integrations.router.secrets import is_secret_key, preview, redact_url, split_credentials
from anorag_integrations.testing import Fault, FaultServer
from anorag_integrations.testing.ollama_server import OllamaFaultServer

from .conftest import MODEL, USER

PASSWORD = "s3cr3t-pw-4711"
KEY = "sk-secret-0451"


def with_credentials(url: str, user: str = "alice", password: str = PASSWORD) -> str:
    """``url`` with ``user:password@`` in front of its host."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


def write(tmp_path: Path, data: object, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --- A: config errors never echo secrets, and echo little --------------------------------------------


def test_routes_written_as_a_list_do_not_echo_the_key(tmp_path: Path) -> None:
    url = with_credentials("http://gpu1:8000/v1")
    path = write(tmp_path, {"llm": {"routes": [{"base_url": url, "model": "m", "api_key": KEY, "token": KEY}]}})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert "llm.routes: Input should be a valid dictionary" in text  # still says what is wrong, and where
    assert KEY not in text and PASSWORD not in text and "alice" not in text
    assert "'api_key': '***'" in text and "***@gpu1:8000" in text


@pytest.mark.parametrize(
    "document",
    [
        # "billion laughs": 9**6 values from a few hundred bytes (and 9**9 from a few more lines)
        "a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef", strict=True))
        + "llm: {routes: *f}\n",
        "llm: {routes: &r [*r]}\n",  # an alias inside its own anchor
    ],
    ids=["billion_laughs", "self_reference"],
)
def test_yaml_alias_expansion_is_bounded(tmp_path: Path, document: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert f"{path}: YAML aliases expand past {MAX_ALIAS_EXPANSION:,} extra values" in text
    assert len(text) < 500


def test_anchors_and_aliases_in_a_normal_config_still_load(tmp_path: Path) -> None:
    document = """
defaults: &defaults {model: m, timeout: 5}
llm:
  routes:
    a: {<<: *defaults, base_url: "http://gpu1:8000/v1"}
    b: {<<: *defaults, base_url: "http://gpu2:8000/v1"}
"""
    config = load_config(write(tmp_path, document), env={})
    assert [(r.model, r.timeout) for r in config.routes.values()] == [("m", 5.0), ("m", 5.0)]


@pytest.mark.parametrize(
    ("llm", "where"),
    [
        ({"lb_policy": "f" * 5000}, "llm.lb_policy: unknown lb_policy 'fff"),
        ({"routes": "r" * 5000}, "llm.routes: Input should be a valid dictionary"),
        ({"routes": {"a": {"base_url": "h" * 5000, "model": "m"}}}, "llm.routes.a.base_url: not an http(s) URL: 'hhh"),
        ({"default_route": "d" * 5000}, "llm.default_route: 'ddd"),
    ],
    ids=["lb_policy", "routes", "base_url", "default_route"],
)
def test_echoed_input_is_capped(llm: dict[str, Any], where: str) -> None:
    routes = {"routes": {"a": {"base_url": "http://gpu1:8000/v1", "model": "m"}}}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"llm": {**routes, **llm}}, env={})
    text = str(info.value)
    assert where in text
    assert "…" in text and len(text) < 600


@pytest.mark.parametrize(
    "base_url",
    [f"alice:{PASSWORD}@gpu1:8000/v1", f"http://alice:{PASSWORD}@gpu1:notaport/v1"],
    ids=["no_scheme", "bad_port"],
)
def test_a_bad_base_url_is_echoed_without_its_credentials(base_url: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"llm": {"routes": {"a": {"base_url": base_url, "model": "m"}}}}, env={})
    text = str(info.value)
    assert "llm.routes.a.base_url" in text and "***@gpu1:" in text
    assert PASSWORD not in text and "alice" not in text


def test_preview_masks_secrets_at_any_depth_and_stays_short() -> None:
    value = {"routes": {"a": {"Authorization": "Bearer x1", "db_password": "x2", "url": "https://u:x3@h/v1"}}}
    text = preview(value)
    assert not any(secret in text for secret in ("x1", "x2", "x3"))
    assert text == "{'routes': {'a': {'Authorization': '***', 'db_password': '***', 'url': 'https://***@h/v1'}}}"
    nested: list[Any] = []
    for _ in range(10_000):
        nested = [nested, "y" * 100]
    assert len(preview(nested)) == 200 and preview(nested).endswith("…")


def test_secret_keys_are_told_from_ordinary_ones() -> None:
    secret = ["api_key", "x-api-key", "apiKey", "password", "db_passwd", "access_token", "accessToken", "Authorization",
              "client_secret", "key", "auth", "Cookie"]  # fmt: skip
    ordinary = ["max_tokens", "model", "base_url", "keep_alive", "timeout", "author", "tokenizer", "monkeys"]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in ordinary if is_secret_key(k)] == []


def test_ordinary_values_and_huge_keys_in_errors() -> None:
    routes = {"a": {"base_url": "http://g:1/v1", "model": "m"}}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"llm": {"routes": routes, "params": {"max_tokens": -5}}}, env={})
    assert "llm.params.max_tokens: Input should be greater than 0 (got -5)" in str(info.value)  # no secret: shown
    with pytest.raises(ConfigError) as info:
        config_from_dict({"llm": {"routes": routes, "k" * 5000: 1}}, env={})
    text = str(info.value)
    assert "llm.kkk" in text and "…: unknown key" in text and len(text) < 800


def test_url_helpers() -> None:
    assert redact_url("http://bob:pw@h:1/v1") == "http://***@h:1/v1"
    assert redact_url("http://h:1/v1/@x") == "http://h:1/v1/@x"  # an @ in the path is no userinfo
    assert split_credentials("http://bob:p%40ss@h:1/v1") == ("http://h:1/v1", ("bob", "p@ss"))
    assert split_credentials("http://h:1/v1") == ("http://h:1/v1", None)


# --- B: credentials in base_url are used, and shown nowhere -------------------------------------------


@pytest.fixture
def credential_router(servers: dict[str, FaultServer]) -> Iterator[Router]:
    """Route a (password in its URL) and b, no retries between rounds."""
    routes = {
        "a": {"base_url": with_credentials(servers["a"].base_url), "model": MODEL, "timeout": 2},
        "b": {"base_url": servers["b"].base_url, "model": MODEL, "timeout": 2},
    }
    config = config_from_dict({"llm": {"routes": routes, "params": {"max_retries": 0}}}, env={})
    with Router(config) as router:
        yield router


def test_credentials_in_base_url_reach_the_server_only(
    credential_router: Router, servers: dict[str, FaultServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    router = credential_router
    response = router.chat(USER, route="a")
    assert response.choices[0].message.content == "from a"
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert servers["a"].last_authorization == f"Basic {basic}"  # the credentials were sent

    servers["a"].set_fault(Fault.STATUS, status=503, times=1)  # a failover, logged
    router.chat(USER, route=None)
    router.chat(USER)
    servers["a"].set_fault(Fault.REFUSE)
    with pytest.raises(RouterError) as info:
        router.chat(USER, route="a")
    health, stats = router.health(), router.stats()

    assert stats["a"]["url"] == health["a"]["url"] == redact_url(with_credentials(servers["a"].base_url))
    assert "***@127.0.0.1" in stats["a"]["url"] and "cannot connect" in str(health["a"]["error"])
    shown = [
        str(info.value),
        repr(info.value),
        json.dumps(health, default=str),
        json.dumps(stats, default=str),
        repr(router.routes["a"]),
        repr(router.config),
        str(router.config.routes["a"]),
        caplog.text,
    ]
    assert "failing over" in caplog.text  # the logs did mention route a
    for text in shown:
        assert PASSWORD not in text and "alice" not in text


def test_adapters_on_a_base_url_with_credentials(servers: dict[str, FaultServer]) -> None:
    url = with_credentials(servers["c"].base_url)
    chat, llm = ChatVLLMRouted(base_url=url, model=MODEL), VLLMRouted(base_url=url, model=MODEL)
    try:
        assert chat.invoke("hi").content == "from c"
        assert servers["c"].last_authorization is not None and servers["c"].last_authorization.startswith("Basic ")
        for text in (repr(chat), str(chat), repr(llm), str(llm), repr(chat.router.routes)):
            assert "***@127.0.0.1" in text and PASSWORD not in text
    finally:
        chat.router.close()


def test_credentials_in_an_ollama_base_url(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("ollama")
    caplog.set_level(logging.DEBUG)
    with OllamaFaultServer("llama3.2", reply="hi") as server:
        url = with_credentials(server.root_url)
        route = {"api": "ollama", "base_url": url, "model": "llama3.2"}
        with Router(config_from_dict({"llm": {"routes": {"o": route}}}, env={})) as router:
            assert router.chat(USER).choices[0].message.content == "hi"
            basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
            assert server.last_authorization == f"Basic {basic}"
            shown = json.dumps([router.stats(), router.health()], default=str) + repr(router.routes["o"])
    assert "***@127.0.0.1" in shown
    assert PASSWORD not in shown + caplog.text


# --- C: VLLMRouted serialises without its key ---------------------------------------------------------


def test_vllm_routed_serialises_with_the_key_masked(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    path = write(tmp_path, {"llm": {"routes": {"a": {"base_url": servers["a"].base_url, "model": MODEL}}}})
    llm = VLLMRouted(config_path=str(path), api_key=KEY, temperature=0.5)
    text = llm.to_json()
    data = json.loads(text)
    assert (data["api_key"], data["temperature"], data["class_name"]) == ("**********", 0.5, "VLLMRouted")
    assert KEY not in text and KEY not in repr(llm) and KEY not in str(llm.to_dict())
    again = VLLMRouted.from_dict(llm.to_dict(), api_key=KEY)  # the key is given again, not read back
    assert again.api_key is not None and again.api_key.get_secret_value() == KEY
    assert again.router is llm.router and again.temperature == 0.5
    assert VLLMRouted.from_json(text).api_key is None  # the mask never becomes a key
    assert json.loads(VLLMRouted(config_path=str(path)).to_json())["api_key"] is None
    llm.router.close()


# --- E: $VLLM_API_KEY is the default route's key; adapters of one config share one router ----------------


@pytest.fixture
def two_keys(tmp_path: Path, servers: dict[str, FaultServer], monkeypatch: pytest.MonkeyPatch) -> str:
    """A config whose default route a and cloud fallback b have their own keys; $VLLM_API_KEY set."""
    routes = {
        "a": {"base_url": servers["a"].base_url, "model": MODEL, "api_key": "key-a"},
        "b": {"base_url": servers["b"].base_url, "model": MODEL, "api_key": "key-b"},
    }
    path = write(tmp_path, {"llm": {"routes": routes, "default_route": "a", "fallback_route": "b"}})
    monkeypatch.setenv("VLLM_API_KEY", "key-from-env")
    return str(path)


def test_env_key_reaches_the_default_route_only(two_keys: str, servers: dict[str, FaultServer]) -> None:
    llm = ChatVLLMRouted(config_path=two_keys)
    try:
        assert llm.invoke("hi", route="a").content == "from a"
        assert llm.invoke("hi", route="b").content == "from b"
        assert servers["a"].last_authorization == "Bearer key-from-env"
        assert servers["b"].last_authorization == "Bearer key-b"  # the fallback keeps its own key
        assert llm.api_key is not None and llm.api_key.get_secret_value() == "key-from-env"  # LangChain's convention
        assert llm.router is VLLMRouted(config_path=two_keys).router  # one router, one health state
    finally:
        llm.router.close()


def test_an_explicit_key_replaces_every_routes_key(two_keys: str, servers: dict[str, FaultServer]) -> None:
    from langchain_core.load import dumpd

    llm = ChatVLLMRouted(config_path=two_keys, api_key="explicit")
    try:
        llm.invoke("hi", route="a")
        llm.invoke("hi", route="b")
        assert servers["a"].last_authorization == servers["b"].last_authorization == "Bearer explicit"
        assert llm.router is not ChatVLLMRouted(config_path=two_keys).router
        assert dumpd(llm)["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["VLLM_API_KEY"]}
        assert "api_key" not in dumpd(ChatVLLMRouted(config_path=two_keys))["kwargs"]  # from env: read again
    finally:
        llm.router.close()


def test_one_server_by_base_url_takes_the_env_key_in_both_adapters(
    servers: dict[str, FaultServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "key-one-server")
    url = servers["c"].base_url
    llm = ChatVLLMRouted(base_url=url, model=MODEL)
    try:
        assert llm.router is VLLMRouted(base_url=url, model=MODEL).router
        llm.invoke("hi")
        assert servers["c"].last_authorization == "Bearer key-one-server"
    finally:
        llm.router.close()

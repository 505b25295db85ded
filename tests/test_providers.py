"""The seed's provider API on the router: vLLM, OpenAI-shaped, Ollama native, multi-Ollama, fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from anorag_integrations import ConfigError, ModelNotFoundError, Router
from anorag_integrations.providers import (
    LLMFactory,
    LocalLLM,
    MultiOllamaProvider,
    OllamaProvider,
    OpenAIProvider,
    VLLMOpenAIProvider,
    create_chat_model,
    create_embed_model,
    create_embeddings,
    create_llm,
)
from anorag_integrations.testing import Fault, FaultServer
from anorag_integrations.testing.embeddings import fake_vector
from anorag_integrations.testing.ollama_server import OllamaFaultServer

from .conftest import MODEL


@pytest.fixture
def ollamas() -> Iterator[list[OllamaFaultServer]]:
    with OllamaFaultServer("llama3.2", reply="ollama one") as a, OllamaFaultServer("llama3.2", reply="ollama two") as b:
        yield [a, b]


def write(tmp_path: Path, llm: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"llm": llm}))
    return str(path)


def vllm_section(servers: dict[str, FaultServer], *names: str) -> dict[str, Any]:
    return {"routes": {n: {"base_url": servers[n].base_url, "model": MODEL} for n in names}}


def test_factory_follows_llm_provider(tmp_path: Path, servers: dict[str, FaultServer], ollamas: list[Any]) -> None:
    llm = {"provider": "vllm_openai", "vllm_openai": vllm_section(servers, "a"),
           "ollama": {"base_url": ollamas[0].root_url, "model": "llama3.2"}}  # fmt: skip
    config = write(tmp_path, llm)
    provider = LLMFactory.create_provider(config=config)
    assert isinstance(provider, VLLMOpenAIProvider) and provider.chat("hi") == "from a"
    ollama = LLMFactory.create_provider("ollama", config=config)
    assert isinstance(ollama, OllamaProvider) and ollama.chat("hi") == "ollama one"
    with pytest.raises(ConfigError, match="unknown provider 'bedrock'"):
        LLMFactory.create_provider("bedrock", config=config)


def test_vllm_provider_all_methods(servers: dict[str, FaultServer]) -> None:
    provider = VLLMOpenAIProvider(base_url=servers["b"].base_url, model=MODEL, temperature=0.1)
    assert provider.chat([{"role": "user", "content": "hi"}]) == "from b"
    assert list(provider.stream("hi")) == ["from ", "b"]

    async def both() -> tuple[str, list[str]]:
        return await provider.achat("hi"), [piece async for piece in provider.astream("hi")]

    assert asyncio.run(both()) == ("from b", ["from ", "b"])
    assert servers["b"].requests[-1]["temperature"] == 0.1
    assert provider.is_available() and provider.list_models() == [MODEL]
    servers["b"].set_fault(Fault.REFUSE)
    assert provider.is_available() is False


def test_ollama_native_api_options_stream_and_errors(tmp_path: Path, ollamas: list[OllamaFaultServer]) -> None:
    section = {"base_url": ollamas[0].root_url, "model": "llama3.2", "options": {"num_ctx": 8192}, "keep_alive": "10m"}
    config = write(tmp_path, {"provider": "ollama", "ollama": section})
    provider = OllamaProvider(config=config)
    assert provider.chat("hi", max_tokens=1, temperature=0) == "ollama "
    body = ollamas[0].requests[-1]
    assert body["stream"] is False and body["keep_alive"] == "10m"
    assert body["options"] == {"num_ctx": 8192, "num_predict": 1, "temperature": 0}  # native options, not /v1
    assert list(provider.stream("hi")) == ["ollama ", "one"]
    assert ollamas[0].requests[-1]["stream"] is True  # NDJSON
    assert provider.list_models() == ["llama3.2:latest"] and provider.is_available()
    stats = provider.stats()["ollama"]
    assert stats["successes"] == 2 and stats["output_tokens"] == 3  # eval_count: 1, then 2
    with pytest.raises(ModelNotFoundError, match="ollama pull mistral"):
        provider.chat("hi", model="mistral")  # not pulled on any host: refused before sending, saying how
    assert provider.chat("hi", model="llama3.2:latest", max_tokens=1) == "ollama "  # the tag as listed


def test_multi_ollama_balances_and_fails_over(tmp_path: Path, ollamas: list[OllamaFaultServer]) -> None:
    hosts = [o.root_url for o in ollamas]
    config = write(tmp_path, {"provider": "multi_ollama", "multi_ollama": {"hosts": hosts, "model": "llama3.2",
                                                                           "lb_policy": "round_robin"}})  # fmt: skip
    provider = MultiOllamaProvider(config=config)
    assert sorted(provider.chat("hi") for _ in range(4)) == ["ollama one"] * 2 + ["ollama two"] * 2
    ollamas[0].set_fault(Fault.STATUS, status=503)
    assert [provider.chat("hi") for _ in range(4)] == ["ollama two"] * 4
    ollamas[1].set_fault(Fault.CUT, after_chunks=0)
    ollamas[0].set_fault(None)
    assert provider.is_available()  # host 0's breaker may have opened; a good probe lets a trial through
    # Two streams: round robin sends at least one of them to host 1 first, whose cut stream fails over.
    assert ["".join(provider.stream("hi")) for _ in range(2)] == ["ollama one"] * 2
    assert provider.stats()["ollama_1"]["failures"] >= 1


def test_fallback_to_ollama_when_no_vllm_route_is_left(
    tmp_path: Path, servers: dict[str, FaultServer], ollamas: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    llm = {"provider": "vllm_openai",
           "vllm_openai": {**vllm_section(servers, "a", "b"), "fallback_to_ollama": True},
           "ollama": {"base_url": ollamas[0].root_url, "model": "llama3.2"}}  # fmt: skip
    provider = LLMFactory.create_provider(config=write(tmp_path, llm))
    assert provider.chat("hi") in ("from a", "from b") and ollamas[0].hits == 0
    servers["a"].set_fault(Fault.REFUSE)
    servers["b"].set_fault(Fault.STATUS, status=503)
    caplog.set_level(logging.WARNING, logger="anorag_integrations")
    assert [provider.chat("hi") for _ in range(3)] == ["ollama one"] * 3
    assert sum("serving from fallback route 'ollama'" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert provider.stats()["ollama"]["successes"] == 3  # visible in stats


def test_openai_provider_reads_its_section_and_key(
    tmp_path: Path, servers: dict[str, FaultServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, {"provider": "openai", "openai": {"base_url": servers["c"].base_url, "model": MODEL}})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIProvider(config=config)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-42")
    assert LLMFactory.create_provider(config=config).chat("hi") == "from c"
    assert servers["c"].last_authorization == "Bearer sk-test-42"


def test_provider_section_errors_name_the_key(tmp_path: Path) -> None:
    config = write(tmp_path, {"provider": "ollama", "routes": {"x": {"base_url": "http://h:1/v1", "model": "m"}},
                              "ollama": {"base_url": "http://h:11434"}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"llm\.ollama\.model: Field required"):
        OllamaProvider(config=config)
    with pytest.raises(ConfigError, match=r"llm\.multi_ollama: missing"):
        MultiOllamaProvider(config=config)


def test_local_llm(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    llm = LocalLLM(
        provider="vllm_openai", config=write(tmp_path, {"provider": "vllm_openai", **vllm_section(servers, "a")})
    )
    assert llm.generate("hi") == "from a" and "".join(llm.stream_generate("hi")) == "from a"

    async def both() -> tuple[str, str]:
        return await llm.agenerate("hi"), "".join([p async for p in llm.astream_generate("hi")])

    assert asyncio.run(both()) == ("from a", "from a")


def test_framework_switch_follows_the_provider(
    tmp_path: Path, servers: dict[str, FaultServer], ollamas: list[Any]
) -> None:
    from langchain_ollama import ChatOllama
    from llama_index.llms.ollama import Ollama

    from anorag_integrations import ChatVLLMRouted, VLLMRouted

    ollama = {"base_url": ollamas[0].root_url, "model": "llama3.2", "options": {"num_ctx": 4096}}
    vllm = write(tmp_path, {"provider": "vllm_openai", **vllm_section(servers, "a"), "ollama": ollama})
    chat_model, llm = create_chat_model(vllm), create_llm(vllm)
    assert isinstance(chat_model, ChatVLLMRouted) and chat_model.invoke("hi").content == "from a"
    assert isinstance(llm, VLLMRouted) and llm.complete("hi").text == "from a"
    (tmp_path / "o").mkdir()
    switched = write(tmp_path / "o", {"provider": "ollama", **vllm_section(servers, "a"), "ollama": ollama})
    chat_model, llm = create_chat_model(switched), create_llm(switched)
    assert isinstance(chat_model, ChatOllama) and chat_model.invoke("hi").content == "ollama one"
    assert isinstance(llm, Ollama) and llm.metadata.context_window == 4096
    assert llm.complete("hi").text == "ollama one"
    assert ollamas[0].requests[-1]["options"]["num_ctx"] == 4096


def test_embeddings_switch_follows_the_provider(
    tmp_path: Path, servers: dict[str, FaultServer], ollamas: list[Any]
) -> None:
    from langchain_ollama import OllamaEmbeddings
    from llama_index.embeddings.ollama import OllamaEmbedding

    from anorag_integrations.langchain import VLLMRoutedEmbeddings
    from anorag_integrations.llama_index import VLLMRoutedEmbedding

    ollama = {"base_url": ollamas[0].root_url, "model": "llama3.2", "embedding_model": "llama3.2"}
    routes = {"e": {"base_url": servers["a"].base_url, "model": MODEL, "kind": "embedding"}}
    vllm = write(tmp_path, {"provider": "vllm_openai", "routes": routes, "ollama": ollama})
    embeddings, embed_model = create_embeddings(vllm), create_embed_model(vllm)
    assert isinstance(embeddings, VLLMRoutedEmbeddings) and isinstance(embed_model, VLLMRoutedEmbedding)
    for vector in (embeddings.embed_query("doc"), embed_model.get_text_embedding("doc")):
        assert vector == pytest.approx(fake_vector("doc"), abs=1e-6)
    (tmp_path / "o").mkdir()
    switched = write(tmp_path / "o", {"provider": "ollama", "routes": routes, "ollama": ollama})
    embeddings, embed_model = create_embeddings(switched), create_embed_model(switched)
    assert isinstance(embeddings, OllamaEmbeddings) and isinstance(embed_model, OllamaEmbedding)
    for vector in (embeddings.embed_query("doc"), embed_model.get_text_embedding("doc")):
        assert vector == pytest.approx(fake_vector("doc"), abs=1e-6)
    assert [body["model"] for body in ollamas[0].requests] == ["llama3.2", "llama3.2"]
    (tmp_path / "n").mkdir()
    unnamed = write(tmp_path / "n", {"provider": "ollama", "ollama": {"model": "llama3.2"}})
    with pytest.raises(ConfigError, match=r"llm\.ollama\.embedding_model"):
        create_embed_model(unnamed)


def test_router_over_mixed_apis(servers: dict[str, FaultServer], ollamas: list[OllamaFaultServer]) -> None:
    from anorag_integrations.config import config_from_dict

    routes = {"vllm": {"base_url": servers["a"].base_url, "model": MODEL},
              "ollama": {"api": "ollama", "base_url": ollamas[1].root_url, "model": "llama3.2",
                         "aliases": [MODEL]}}  # one model group over both engines  # fmt: skip
    with Router(config_from_dict({"llm": {"routes": routes}}, env={})) as router:
        answers = {router.chat([{"role": "user", "content": "x"}]).choices[0].message.content for _ in range(2)}
        assert answers == {"from a", "ollama two"}
        assert ollamas[1].requests[-1]["model"] == "llama3.2"  # the alias is sent as the route's model
        ollama_only = router.chat([{"role": "user", "content": "x"}], model="llama3.2")
        assert ollama_only.choices[0].message.content == "ollama two"
        assert {name: row["healthy"] for name, row in router.health().items()} == {"vllm": True, "ollama": True}


OLLAMA_FAULTS = {
    "http_503": (Fault.STATUS, {"status": 503}, "HTTP 503"),
    "refused": (Fault.REFUSE, {}, "is `ollama serve` running"),
    "hang": (Fault.HANG, {}, "timed out"),
    "cut_before_content": (Fault.CUT, {"after_chunks": 0}, ""),
}


@pytest.mark.parametrize("mode", ["chat", "stream", "achat"])
@pytest.mark.parametrize("case", OLLAMA_FAULTS)
def test_ollama_route_faults_fail_over(ollamas: list[OllamaFaultServer], case: str, mode: str) -> None:
    from anorag_integrations import call_info
    from anorag_integrations.config import config_from_dict

    fault, options, says = OLLAMA_FAULTS[case]
    routes = {f"o{i}": {"api": "ollama", "base_url": o.root_url, "model": "llama3.2", "timeout": 0.5}
              for i, o in enumerate(ollamas)}  # fmt: skip
    ollamas[0].set_fault(fault, **options)
    ask = [{"role": "user", "content": "x"}]
    with Router(config_from_dict({"llm": {"routes": routes}}, env={})) as router:
        if mode == "chat":
            response = router.chat(ask)
            text, info = response.choices[0].message.content, call_info(response)
        elif mode == "achat":
            response = asyncio.run(router.achat(ask))
            text, info = response.choices[0].message.content, call_info(response)
        else:
            chunks = list(router.stream(ask))
            text, info = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), call_info(chunks[-1])
    assert text == "ollama two" and info is not None and info.route == "o1"
    assert [a.route for a in info.attempts] == ["o0"] and says in str(info.attempts[0].error)

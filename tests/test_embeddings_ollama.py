"""Embedding routes with ``api: ollama`` (``POST /api/embed``), alone and beside vLLM-shaped routes.

Ollama cannot run here: ``OllamaFaultServer`` follows its documented API and answers the same
vectors as ``FaultServer``'s ``/v1/embeddings``, so a mixed fleet can be checked vector by vector.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from anorag_integrations import ContextOverflowError, ModelNotFoundError, Router
from anorag_integrations.router.errors import InputTooLongError
from anorag_integrations.testing import Fault, FaultServer
from anorag_integrations.testing.embeddings import fake_vector
from anorag_integrations.testing.ollama_server import OllamaFaultServer

from .conftest import MODEL, make_config


@pytest.fixture
def ollama() -> Iterator[OllamaFaultServer]:
    with OllamaFaultServer(MODEL, max_model_len=12) as server:
        yield server


def ollama_router(server: OllamaFaultServer, **llm: object) -> Router:
    route = {"api": "ollama", "kind": "embedding", "base_url": server.base_url.removesuffix("/v1")}
    return Router(make_config({"o": server.base_url}, route_overrides={"o": route}, **llm))


def embed_requests(server: OllamaFaultServer) -> list[dict[str, object]]:
    return [body for body in server.requests if "input" in body]


def test_vectors_come_back_in_input_order_over_batches_sync_and_async(ollama: OllamaFaultServer) -> None:
    texts = [f"text number {i}" for i in range(7)]
    with ollama_router(ollama, embedding={"batch_size": 3}) as router:
        plain = router.embed(texts)
        async_ = asyncio.run(router.aembed(texts))
    for response in (plain, async_):
        assert [item.embedding for item in response.data] == [fake_vector(t) for t in texts]
        assert response.usage.prompt_tokens == sum(len(t.split()) + 2 for t in texts)
        assert response.model == f"{MODEL}:latest"
    sizes = [len(body["input"]) for body in embed_requests(ollama)]  # type: ignore[arg-type]
    assert sizes[:3] == [3, 3, 1]  # sync: batches in turn
    assert sorted(sizes[3:]) == [1, 3, 3]  # async: the same batches, sent at once, so in any order


def test_an_input_past_the_window_read_from_api_show_is_refused_before_sending(ollama: OllamaFaultServer) -> None:
    with ollama_router(ollama) as router, pytest.raises(InputTooLongError, match="maximum context length of 12"):
        router.embed(["short", "word " * 30])
    assert embed_requests(ollama) == []


def test_ollama_truncates_only_when_the_call_asks(ollama: OllamaFaultServer) -> None:
    with ollama_router(ollama) as router:
        router.embed(["a b"])
        cut = router.embed(["word " * 30], truncate=True)
    assert [body["truncate"] for body in embed_requests(ollama)] == [False, True]
    assert cut.usage.prompt_tokens == 12
    assert cut.data[0].embedding == fake_vector(" ".join(["word"] * 10))


def test_the_servers_own_overflow_is_a_context_error_that_spares_the_breaker(ollama: OllamaFaultServer) -> None:
    eleven_words = "w " * 11  # 11 tokens by the router's low estimate, 13 by the server's count
    with ollama_router(ollama) as router:
        with pytest.raises(ContextOverflowError, match="input length exceeds the context length"):
            router.embed([eleven_words])
        assert router.routes["o"].breaker.state == "closed"
        assert router.embed(["fine"]).data[0].embedding == fake_vector("fine")


def test_base64_is_encoded_as_vllm_sends_it(ollama: OllamaFaultServer) -> None:
    with ollama_router(ollama) as router:
        text = router.embed(["hello"], encoding_format="base64").data[0].embedding
    assert isinstance(text, str)
    decoded = struct.unpack(f"<{len(fake_vector('hello'))}f", base64.b64decode(text))
    assert decoded == pytest.approx(fake_vector("hello"), abs=1e-6)


def test_an_unpulled_model_names_ollama_pull() -> None:
    with (
        OllamaFaultServer("other") as server,
        ollama_router(server) as router,
        pytest.raises(ModelNotFoundError, match="ollama pull"),
    ):
        router.embed(["x"])


def test_a_mixed_fleet_fails_over_from_vllm_to_ollama_with_the_same_vectors(ollama: OllamaFaultServer) -> None:
    with FaultServer(MODEL) as vllm:
        routes = {
            "v": {"kind": "embedding"},
            "o": {"kind": "embedding", "api": "ollama", "base_url": ollama.base_url.removesuffix("/v1")},
        }
        config = make_config({"v": vllm, "o": ollama.base_url}, route_overrides=routes, lb_policy="round_robin")
        texts = [f"chunk {i}" for i in range(6)]
        with Router(config) as router:
            vllm.set_fault(Fault.STATUS, status=503)
            response = router.embed(texts, encoding_format="float")
        assert [item.embedding for item in response.data] == [fake_vector(t) for t in texts]
        assert router.stats()["o"]["requests"] >= 1
        assert vllm.hits >= 1  # the vLLM route was tried, failed and was stepped over


def test_a_cut_connection_fails_over_and_counts_against_the_route(ollama: OllamaFaultServer) -> None:
    with OllamaFaultServer(MODEL) as spare:
        routes = {
            name: {"kind": "embedding", "api": "ollama", "base_url": server.base_url.removesuffix("/v1")}
            for name, server in (("o", ollama), ("s", spare))
        }
        config = make_config(
            {"o": ollama.base_url, "s": spare.base_url}, route_overrides=routes, params={"max_retries": 2}
        )
        with Router(config) as router:
            ollama.set_fault(Fault.CUT)
            spare.set_fault(Fault.CUT, times=1)
            response = router.embed(["one", "two"], encoding_format="float")
            stats = router.stats()
    assert [item.embedding for item in response.data] == [fake_vector("one"), fake_vector("two")]
    assert stats["o"]["failures"] + stats["s"]["failures"] >= 2


class _SlowShow(OllamaFaultServer):
    """``/api/show`` answers only when released (a hung model registry)."""

    async def _api_show(self, request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return await super()._api_show(request)


class _HtmlEmbed(OllamaFaultServer):
    """``/api/embed`` answers a proxy's HTML page with status 200."""

    async def _api_embed(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hung_api_show_is_bounded_by_the_calls_deadline(mode: str) -> None:
    with _SlowShow(MODEL, max_model_len=12) as server:
        route = {"api": "ollama", "kind": "embedding", "base_url": server.base_url.removesuffix("/v1"), "timeout": 30}
        config = make_config({"o": server.base_url}, route_overrides={"o": route}, health={"probe_timeout": 1})
        with Router(config, start_prober=False) as router:
            started = time.monotonic()
            response = (
                router.embed(["a"], deadline=8) if mode == "sync" else asyncio.run(router.aembed(["a"], deadline=8))
            )
            took = time.monotonic() - started
            assert response.data[0].embedding == fake_vector("a")
            assert took < 8, took  # the window stays unknown; the route's 30 s timeout never applied
            assert router.routes["o"].breaker.state == "closed"


def test_an_html_answer_is_a_malformed_response_and_fails_over() -> None:
    from anorag_integrations.router.errors import MalformedResponse

    with _HtmlEmbed(MODEL) as bad, OllamaFaultServer(MODEL) as good:
        routes = {
            name: {"kind": "embedding", "api": "ollama", "base_url": server.base_url.removesuffix("/v1")}
            for name, server in (("bad", bad), ("good", good))
        }
        config = make_config(
            {"bad": bad.base_url, "good": good.base_url}, route_overrides=routes, lb_policy="round_robin",
            params={"max_retries": 1},
        )  # fmt: skip
        with Router(config, start_prober=False) as router:
            with pytest.raises(MalformedResponse, match="unusable response"):
                router.routes["bad"].embed({"model": MODEL, "input": ["x"]}, 2)
            answers = [router.embed(["x"]) for _ in range(2)]  # round robin: one starts on "bad", fails over
            stats = router.stats()
    assert [a.data[0].embedding for a in answers] == [fake_vector("x")] * 2
    assert stats["bad"]["failures"] >= 1 and set(stats["bad"]["errors"]) == {"malformed_response"}

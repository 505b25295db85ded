"""The router against real llama.cpp servers (Gemma 3 270M from PyPI), started by the test session."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from anorag_integrations import ContextOverflowError, Router, call_info

from .conftest import free_port, kill_mid_run, real_config

pytestmark = pytest.mark.live
ALIAS = "gemma3_270m"
ASK = [{"role": "user", "content": "The capital of France is"}]


def live_config(servers: list[Any], **llm: Any) -> Any:
    return real_config(servers, "llama", {"timeout": 30}, **llm)


@pytest.fixture
def router(llama_servers: list[Any]) -> Any:
    with Router(live_config(llama_servers, lb_policy="round_robin")) as router:
        yield router


def test_chat_on_a_real_server(router: Router) -> None:
    response = router.chat(ASK)
    info = call_info(response)
    assert info is not None and info.route in ("llama0", "llama1") and info.attempts == []
    assert isinstance(response.choices[0].message.content, str)
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8
    assert response.model == ALIAS


def test_round_robin_uses_both_real_servers(router: Router) -> None:
    served = [call_info(router.chat(ASK)).route for _ in range(4)]  # type: ignore[union-attr]
    assert served == ["llama0", "llama1", "llama0", "llama1"]


def test_async_chat_concurrently(router: Router) -> None:
    async def many() -> list[Any]:
        return await asyncio.gather(*(router.achat(ASK) for _ in range(4)))

    responses = asyncio.run(many())
    assert {call_info(r).route for r in responses} == {"llama0", "llama1"}  # type: ignore[union-attr]
    assert all(r.usage.completion_tokens > 0 for r in responses)


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_stream_with_usage_and_ttft(router: Router, mode: str) -> None:
    if mode == "stream":
        chunks = list(router.stream(ASK, max_tokens=12))
    else:

        async def collect() -> list[Any]:
            return [c async for c in router.astream(ASK, max_tokens=12)]

        chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    info = call_info(chunks[-1])
    assert info is not None and info.ttft_s is not None and info.ttft_s < info.latency_s  # type: ignore[operator]
    assert router.stats()[info.route]["ttft_p50_ms"] is not None  # type: ignore[index]


def test_same_answer_as_plain_openai_client(router: Router, llama_servers: list[Any]) -> None:
    import openai

    direct = openai.OpenAI(base_url=llama_servers[0].base_url, api_key="EMPTY")
    expected = direct.chat.completions.create(model=ALIAS, messages=ASK, temperature=0, max_tokens=8)
    direct.close()
    assert router.chat(ASK, route="llama0").choices[0].message.content == expected.choices[0].message.content


def test_health_of_real_servers(router: Router) -> None:
    rows = router.health()
    for row in rows.values():
        assert row["healthy"] is True and row["models"] == [ALIAS]
        assert row["max_model_len"] and row["max_model_len"] > 0  # llama.cpp's meta.n_ctx per slot


def test_real_context_overflow_is_typed(router: Router) -> None:
    prompt = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(ContextOverflowError) as info:
        router.chat(prompt)
    assert info.value.status == 400 and "context" in str(info.value)
    assert router.routes[info.value.route].breaker._failures == 0


def test_kill_one_server_mid_run_then_restart(tmp_path: Any) -> None:
    """60 requests at concurrency 4; one server SIGKILLed after 20: none may fail. Then it comes back."""
    from anorag_integrations.cli.servers import LlamaServer

    pair = [LlamaServer(free_port(), parallel=2, log_dir=tmp_path) for _ in range(2)]
    for server in pair:
        server.start(wait=False)
    try:
        for server in pair:
            server.wait_ready()
        config = live_config(
            pair,
            lb_policy="least_outstanding",
            health={"probe_interval": 0.5, "failure_threshold": 2, "cooldown": 1},
            params={"timeout": 20},
        )
        with Router(config) as router:
            killed_at = time.monotonic()

            def kill() -> None:
                nonlocal killed_at
                pair[0].kill()
                killed_at = time.monotonic()

            outcomes = kill_mid_run(router, ASK, kill, requests=60, kill_at=20)

            failed = [exc for _, _, exc in outcomes if exc is not None]
            failed_over = sum(1 for _, attempts, _ in outcomes if attempts)
            after_kill = [route for route, _, _ in outcomes[24:]]
            print(f"\nkill test: {len(outcomes)} requests, {len(failed)} failed, {failed_over} failed over invisibly")
            assert failed == []
            assert len(outcomes) == 60
            assert set(after_kill) == {"llama1"}  # the dead server left the rotation
            assert router.health()["llama0"]["healthy"] is False

            pair[0] = LlamaServer(pair[0].port, parallel=2, log_dir=tmp_path).start()
            restarted = time.monotonic()
            served_by: list[str] = []
            for _ in range(200):
                served_by.append(call_info(router.chat(ASK)).route)  # type: ignore[union-attr, arg-type]
                if served_by[-1] == "llama0":
                    break
            print(
                f"recovery: back in rotation after {len(served_by)} requests, "
                f"{time.monotonic() - restarted:.1f}s after restart (server down {restarted - killed_at:.1f}s)"
            )
            assert served_by[-1] == "llama0", "the restarted server never came back into rotation"
            assert router.health()["llama0"]["healthy"] is True
    finally:
        for server in pair:
            server.stop()

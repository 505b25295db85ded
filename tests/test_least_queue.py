"""lb_policy: least_queue — server queues read from /metrics (vLLM and llama.cpp names), with fallbacks."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import openai
import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.router.balancing.policies import LeastQueue
from anorag_integrations.router.balancing.server_load import LoadReport, parse_load
from anorag_integrations.router.endpoints.route import Route
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, make_config
from .test_health import wait_for

ASK = [{"role": "user", "content": "hi"}]


def test_parse_vllm_metrics_sums_engines() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 2\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 7\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.99\n'  # older name: ignored when the new is there
    )
    load = parse_load(text, own_in_flight=1, now=5.0)
    assert load == LoadReport(running=5, waiting=7, kv_usage=0.25, scraped_at=5.0, own_in_flight=1)


def test_parse_older_vllm_and_llama_cpp_names() -> None:
    old = parse_load('vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n', 0)
    assert old is not None and (old.running, old.waiting, old.kv_usage) == (1, 0, 0.5)
    llama = parse_load("llamacpp:requests_processing 2\nllamacpp:requests_deferred 4\n", 0)
    assert llama is not None and (llama.running, llama.waiting) == (2, 4)
    assert parse_load("process_cpu_seconds_total 12\n", 0) is None  # a /metrics page without queue metrics


@pytest.fixture
def pair() -> Iterator[list[Route]]:
    router = Router(make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in "ab"}), start_prober=False)
    yield list(router.routes.values())
    router.close()


def report(running: float, waiting: float = 0, kv: float = 0.0, at: float = 100.0, own: int = 0) -> LoadReport:
    return LoadReport(running=running, waiting=waiting, kv_usage=kv, scraped_at=at, own_in_flight=own)


def test_policy_prefers_the_shorter_queue_then_lower_kv_use(pair: list[Route]) -> None:
    a, b = pair
    policy = LeastQueue(stale_after=5.0, clock=lambda: 101.0)
    a.load, b.load = report(2, 3), report(4, 0)
    assert policy.pick(pair, lambda route: True) is b  # 4 < 5
    a.load, b.load = report(2, 2, kv=0.9), report(4, 0, kv=0.2)
    assert policy.pick(pair, lambda route: True) is b  # depth tied at 4: lower KV use wins
    b.load = report(4, 0, kv=0.95)
    assert policy.pick(pair, lambda route: True) is a


def test_requests_sent_since_the_scrape_count(pair: list[Route]) -> None:
    a, b = pair
    policy = LeastQueue(clock=lambda: 101.0)
    a.load, b.load = report(0), report(1)
    for _ in range(2):
        a.stats.started()  # two requests sent to a after its scrape showed it empty
    assert policy.pick(pair, lambda route: True) is b


def test_stale_or_missing_readings_fall_back_to_in_flight(pair: list[Route]) -> None:
    a, b = pair
    a.load, b.load = report(0, at=90.0), report(9, at=90.0)
    b.stats.started()
    a.stats.started()
    a.stats.started()
    fresh, stale = LeastQueue(stale_after=20.0, clock=lambda: 101.0), LeastQueue(stale_after=5.0, clock=lambda: 101.0)
    assert fresh.pick(pair, lambda route: True) is a  # server queue: 0 + 2 sent since < 9 + 1
    assert stale.pick(pair, lambda route: True) is b  # 11 s old: in flight 2 vs 1
    a.load = b.load = None
    assert stale.pick(pair, lambda route: True) is b


@pytest.mark.parametrize("names", ["vllm", "vllm_old", "llamacpp"])
def test_router_avoids_a_server_busy_with_other_clients(names: str) -> None:
    """Server a is full with another client's requests; only its /metrics shows it."""
    with FaultServer(MODEL, max_running=1, metrics=names) as a, FaultServer(MODEL, metrics=names) as b:
        a.set_fault(Fault.HANG)
        outside = openai.OpenAI(base_url=a.base_url, api_key="x", max_retries=0, timeout=30)
        threads = [threading.Thread(target=_ignore_errors, args=(outside,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: a.running == 1 and a.waiting == 1)
            config = make_config({"a": a, "b": b}, lb_policy="least_queue", least_queue={"interval": 0.05})
            with Router(config) as router:
                assert wait_for(lambda: all(r.load is not None for r in router.routes.values()))
                served = Counter(call_info(router.chat(ASK)).route for _ in range(6))  # type: ignore[union-attr]
                assert served == {"b": 6} and a.hits == 2  # no request of ours reached a
                assert router.routes["a"].load.waiting == 1  # type: ignore[union-attr]
        finally:
            a.stop()  # wakes both held requests (the second would take the slot and hang again)
            for thread in threads:
                thread.join(10)
            outside.close()


def test_without_metrics_endpoints_it_balances_by_in_flight() -> None:
    with FaultServer(MODEL, metrics=None) as a, FaultServer(MODEL, metrics=None) as b:
        config = make_config({"a": a, "b": b}, lb_policy="least_queue", least_queue={"interval": 0.05})
        with Router(config, start_prober=False) as router:
            assert router.routes["a"].scrape_load() is None  # 404: no reading, not an error
            served = Counter(call_info(router.chat(ASK)).route for _ in range(6))  # type: ignore[union-attr]
        assert served == {"a": 3, "b": 3}


def test_async_scraper_task() -> None:
    import asyncio

    async def main(server: FaultServer) -> LoadReport | None:
        config = make_config({"a": server}, lb_policy="least_queue", least_queue={"interval": 0.05})
        async with Router(config, start_prober=False) as router:
            await router.astart_prober()
            assert router.scraper is not None and router.scraper.running
            for _ in range(200):
                if router.routes["a"].load is not None:
                    break
                await asyncio.sleep(0.01)
            load = router.routes["a"].load
        assert not router.scraper.running
        return load

    with FaultServer(MODEL) as server:
        server.kv_usage = 0.5
        load = asyncio.run(main(server))
    assert load is not None and load.kv_usage == 0.5


def _ignore_errors(client: openai.OpenAI) -> None:
    with contextlib.suppress(openai.APIError):
        client.chat.completions.create(model=MODEL, messages=ASK)  # type: ignore[list-item]

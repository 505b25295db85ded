"""lb_policy: prefix_aware — longest cached match unless overloaded, misses to the least loaded, sessions, stats."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.router.balancing.policies import make_policy
from anorag_integrations.router.balancing.prefix_aware import PrefixAware
from anorag_integrations.router.balancing.server_load import LoadReport
from anorag_integrations.router.endpoints.route import Route
from anorag_integrations.testing import Fault, FaultServer
from anorag_integrations.testing.prompts import TextPrompt as Prompt

from .conftest import make_config

SYSTEM = "You answer from the notes. " * 40  # about 1,000 characters shared by every prompt


def rag(doc: int, question: int) -> Prompt:
    notes = " ".join(f"doc {doc} fact {n} is {n * 7 % 13}." for n in range(120))  # about 2,500 characters
    return Prompt(f"{SYSTEM}\n{notes}\nQuestion {question}?")


@pytest.fixture
def fleet() -> Iterator[list[Route]]:
    router = Router(make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in "ab"}), start_prober=False)
    yield list(router.routes.values())
    router.close()


def everyone(route: Route) -> bool:
    return True


def pick(policy: PrefixAware, fleet: list[Route], request: Any, usable: Any = everyone) -> str:
    route = policy.pick(fleet, usable, request)
    assert route is not None
    return route.name


def test_each_context_stays_where_it_went_first_and_contexts_spread(fleet: list[Route]) -> None:
    policy = PrefixAware()
    first = {doc: pick(policy, fleet, rag(doc, 0)) for doc in range(6)}
    assert set(first.values()) == {"a", "b"}  # new contexts (misses) go to the least loaded: both used
    for question in range(1, 4):
        for doc in range(6):
            assert pick(policy, fleet, rag(doc, question)) == first[doc]
    rates = policy.hit_rates()
    assert rates["a"] is not None and 0.5 < rates["a"] < 1  # 3 of 4 prompts per context were predicted hits


def test_new_contexts_split_the_caches_even_when_one_server_is_always_the_idle_one(fleet: list[Route]) -> None:
    policy = PrefixAware()
    b = fleet[1]
    b.stats.started()  # b always has one request running: a is always the least loaded
    homes = Counter(pick(policy, fleet, rag(doc, 0)) for doc in range(10))
    assert homes["b"] >= 4, homes  # by load alone all ten would go to a
    b.stats.started()
    b.stats.started()  # 3 against 0: b is overloaded, new contexts stay on a
    assert {pick(policy, fleet, rag(doc, 0)) for doc in range(10, 14)} == {"a"}


def test_a_shared_system_prompt_alone_is_not_a_hit(fleet: list[Route]) -> None:
    """The production-stack failure: a common system prompt must not pull every request to one server."""
    policy = PrefixAware()
    fleet[0].stats.started()  # a is busier
    unique = [Prompt(SYSTEM + f"\nUnrelated question {i}: " + "words " * 20) for i in range(8)]
    served = Counter(pick(policy, fleet, p) for p in unique)
    assert served["b"] >= 4  # the system prompt is under the threshold: misses follow load


def test_an_overloaded_route_loses_its_hits_to_the_least_loaded(fleet: list[Route]) -> None:
    policy = PrefixAware(balance_abs=2, balance_rel=1.5)
    home = pick(policy, fleet, rag(1, 0))
    policy.index.record(home, rag(5, 0).prefix_blocks(64))  # a second context cached there too
    route = next(r for r in fleet if r.name == home)
    for _ in range(2):
        route.stats.started()  # 2 in flight against 0: over both bounds
    assert pick(policy, fleet, rag(1, 1)) != home
    route.stats.succeeded(0.1)  # 1 against 0: under the absolute bound, affinity wins again
    assert pick(policy, fleet, rag(5, 1)) == home


def test_a_full_kv_cache_beside_one_with_room_counts_as_overloaded(fleet: list[Route]) -> None:
    policy = PrefixAware()
    home = pick(policy, fleet, rag(2, 0))
    route = next(r for r in fleet if r.name == home)
    other = next(r for r in fleet if r.name != home)
    route.load = LoadReport(running=1, waiting=0, kv_usage=0.99, scraped_at=policy._clock(), own_in_flight=0)
    other.load = LoadReport(running=1, waiting=0, kv_usage=0.3, scraped_at=policy._clock(), own_in_flight=0)
    assert pick(policy, fleet, rag(2, 1)) == other.name


def test_load_counts_other_clients_from_metrics_but_not_our_finished_requests(fleet: list[Route]) -> None:
    policy = PrefixAware()
    a, b = fleet
    now = policy._clock()
    a.load = LoadReport(running=2, waiting=0, kv_usage=0.1, scraped_at=now, own_in_flight=2)  # both ours, done since
    b.stats.started()
    b.load = LoadReport(running=1, waiting=0, kv_usage=0.1, scraped_at=now, own_in_flight=1)  # ours, still running
    assert pick(policy, fleet, None) == "a"  # a stale count of our own finished requests does not repel
    a.load = LoadReport(running=4, waiting=1, kv_usage=0.1, scraped_at=now, own_in_flight=2)  # 3 from other clients
    assert pick(policy, fleet, None) == "b"


def test_a_conversation_keeps_its_route_as_it_grows(fleet: list[Route]) -> None:
    policy = PrefixAware()
    text = SYSTEM + "user: tell me about rivers\n"
    home = pick(policy, fleet, Prompt(text))
    for turn in range(6):
        fleet[0 if home == "b" else 1].stats.started()  # keep the other route the less loaded one...
        fleet[0 if home == "b" else 1].stats.succeeded(0.1)  # ...without leaving load behind
        text += f"assistant: answer {turn} " + "more words " * 10 + f"\nuser: follow-up {turn}\n"
        assert pick(policy, fleet, Prompt(text)) == home


def test_a_route_that_went_down_attracts_nothing_and_starts_empty_when_back(fleet: list[Route]) -> None:
    policy = PrefixAware()
    home_name = pick(policy, fleet, rag(3, 0))
    home = next(r for r in fleet if r.name == home_name)
    moved = pick(policy, fleet, rag(3, 1), usable=lambda r: r is not home)  # home is down
    assert moved != home_name
    home.breaker.force_open()  # its breaker opened: its server may restart with an empty cache
    assert pick(policy, fleet, rag(3, 2), usable=lambda r: r is not home) == moved
    assert policy.index.size(home_name) > 0  # not seen since it opened: not yet forgotten
    home.breaker.probe_succeeded()  # half-open again: usable
    assert pick(policy, fleet, rag(3, 3)) == moved  # the context lives where it moved to
    assert policy.index.depth(home_name, rag(3, 0).prefix_blocks(64)) == 0  # home's old entries were dropped


def test_without_a_request_or_text_it_picks_the_least_loaded(fleet: list[Route]) -> None:
    fleet[0].stats.started()
    assert pick(PrefixAware(), fleet, None) == fleet[1].name
    assert pick(PrefixAware(), fleet, Prompt("")) == fleet[1].name
    assert PrefixAware().pick(fleet, lambda r: False, rag(0, 0)) is None


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="match_threshold"):
        make_policy("prefix_aware", match_threshold=0)
    with pytest.raises(ValueError, match="balance_rel"):
        make_policy("prefix_aware", balance_rel=0.5)


def test_router_keeps_contexts_on_one_server_and_reports_hit_rates(servers: dict[str, FaultServer]) -> None:
    config = make_config(servers, lb_policy="prefix_aware", least_queue={"interval": 0.05})
    docs = [rag(d, 0).text.rsplit("\n", 1)[0] for d in range(6)]
    with Router(config) as router:
        served: dict[int, set[str]] = {}
        for question in range(4):
            for i, doc in enumerate(docs):
                messages = [{"role": "system", "content": doc}, {"role": "user", "content": f"question {question}"}]
                info = call_info(router.chat(messages))
                assert info is not None and info.route is not None
                served.setdefault(i, set()).add(info.route)
        for route in router.routes.values():
            route.scrape_load()
        stats = router.stats()
    assert all(len(routes) == 1 for routes in served.values())
    assert len({next(iter(r)) for r in served.values()}) >= 2
    used = [row for row in stats.values() if row["successes"]]
    assert all(row["prefix_hit_rate_predicted"] > 0.5 for row in used)
    assert all(row["prefix_hit_rate_measured"] is not None for row in used)  # the fault server's counters


def test_session_id_pins_a_conversation_while_its_route_is_usable(servers: dict[str, FaultServer]) -> None:
    config = make_config(servers, lb_policy="round_robin")
    with Router(config) as router:
        routes = {call_info(router.chat([{"role": "user", "content": "hi"}], session_id="s1")).route for _ in range(6)}  # type: ignore[union-attr]
        assert len(routes) == 1
        home = routes.pop()
        assert servers[home].requests[-1].get("session_id") is None  # a router keyword, never sent
        unpinned = {call_info(router.chat([{"role": "user", "content": "hi"}])).route for _ in range(6)}  # type: ignore[union-attr]
        assert len(unpinned) > 1
        servers[home].set_fault(Fault.STATUS, status=503)
        info = call_info(router.chat([{"role": "user", "content": "hi"}], session_id="s1"))
        assert info is not None and info.route != home  # its route failed: the conversation moved on
        assert call_info(router.chat([{"role": "user", "content": "again"}], session_id="s1")).route == info.route  # type: ignore[union-attr]


def test_session_id_must_be_text() -> None:
    from anorag_integrations.router.errors import InvalidRequestError

    config = make_config({"a": "http://127.0.0.1:1/v1"})
    with Router(config, start_prober=False) as router, pytest.raises(InvalidRequestError, match="session_id"):
        router.chat([{"role": "user", "content": "hi"}], session_id=["x"])


@pytest.mark.parametrize("session", [True, "", 1.5])
def test_session_id_must_be_non_empty_text_or_a_whole_number(session: object) -> None:
    from anorag_integrations.router.errors import InvalidRequestError

    config = make_config({"a": "http://127.0.0.1:1/v1"})
    with Router(config, start_prober=False) as router, pytest.raises(InvalidRequestError, match="session_id"):
        router.chat([{"role": "user", "content": "hi"}], session_id=session)


def test_a_long_session_id_is_kept_as_a_digest(servers: dict[str, FaultServer]) -> None:
    with Router(make_config(servers, lb_policy="prefix_aware"), start_prober=False) as router:
        for session in ("x" * 1_000_000, 10**5000, "short"):
            router.chat([{"role": "user", "content": "hi"}], session_id=session)
        kept = [key for pool in router.pools.values() for key in pool.sessions._routes]
    assert sorted(len(key) for key in kept) == [5, 71, 71]  # "short", and two "sha256:" digests


@pytest.mark.parametrize("policy", ["prefix_aware", "prefix_affinity"])
def test_content_parts_whose_text_is_not_text_neither_raise_nor_hold_a_trial(
    servers: dict[str, FaultServer], policy: str
) -> None:
    """A part with ``"text": None`` reaches the server as with any policy; a half-open trial slot is never kept."""
    config = make_config(servers, lb_policy=policy, health={"failure_threshold": 1, "cooldown": 0.05})
    odd = [{"role": "user", "content": [{"type": "text", "text": None}, {"type": "text", "text": 5}]}]
    with Router(config, start_prober=False) as router:
        router.chat([{"role": "user", "content": "pin"}], session_id="s")
        home = router.pools["chat"].sessions.get("s")
        assert home is not None
        router.routes[home].breaker.force_open()
        deadline = time.monotonic() + 5
        while router.routes[home].breaker.state != "half_open" and time.monotonic() < deadline:
            time.sleep(0.01)  # the cool-down is 50 ms
        assert router.chat(odd, session_id="s").choices
        breaker = router.routes[home].breaker
        assert not breaker.trial_in_flight and router.routes[home].stats.in_flight == 0


@pytest.mark.parametrize(
    ("hits", "queries", "rate"),
    [(5, 10, 0.5), (0, 0, None), (50, 10, None), (-3, 5, None), (float("nan"), 5, None), (5, float("inf"), None)],
)
def test_the_measured_hit_rate_is_a_rate_or_unknown(hits: float, queries: float, rate: float | None) -> None:
    report = LoadReport(0, 0, 0, 0, 0, prefix_hits=hits, prefix_queries=queries)
    assert report.prefix_hit_rate == rate


def test_new_contexts_split_the_caches_by_weight() -> None:
    """A route of weight 3 is taken to hold three times the cache: misses follow the weights."""
    config = make_config(
        {n: f"http://127.0.0.1:1/{n}/v1" for n in "ab"}, route_overrides={"a": {"weight": 3}, "b": {"weight": 1}}
    )
    with Router(config, start_prober=False) as router:
        policy, routes = PrefixAware(), list(router.routes.values())
        placed = Counter(pick(policy, routes, Prompt(f"unique prompt {i} " * 20)) for i in range(80))
    assert 55 <= placed["a"] <= 65 and placed["a"] + placed["b"] == 80, placed

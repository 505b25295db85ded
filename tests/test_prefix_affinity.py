"""lb_policy: prefix_affinity — consistent hashing on the prompt's prefix, bounded load, remapping."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.router.balancing.policies import PrefixAffinity, make_policy
from anorag_integrations.router.endpoints.route import Route
from anorag_integrations.testing import FaultServer

from .conftest import make_config
from .test_live import live_config


class Key:
    """A request whose prefix hash is given (the policy sees nothing else of it)."""

    def __init__(self, key: int) -> None:
        self.key = key

    def prefix_key(self, chars: int) -> int:
        return self.key


@pytest.fixture
def fleet() -> Iterator[list[Route]]:
    router = Router(make_config({n: f"http://127.0.0.1:1/{n}/v1" for n in "abcd"}), start_prober=False)
    yield list(router.routes.values())
    router.close()


KEYS = [Key(k * 0x9E3779B97F4A7C15 % 2**64) for k in range(400)]


def owners(policy: PrefixAffinity, routes: list[Route], usable: Any = lambda route: True) -> list[str]:
    return [policy.pick(routes, usable, key).name for key in KEYS]  # type: ignore[union-attr]


def test_same_prefix_same_route_and_keys_spread(fleet: list[Route]) -> None:
    policy = PrefixAffinity()
    first = owners(policy, fleet)
    assert owners(policy, fleet) == first  # deterministic
    shares = Counter(first)
    assert set(shares) == set("abcd") and min(shares.values()) > 400 / 4 * 0.5


def test_a_route_going_down_moves_only_its_keys_and_they_come_back(fleet: list[Route]) -> None:
    policy = PrefixAffinity()
    before = owners(policy, fleet)
    during = owners(policy, fleet, usable=lambda route: route.name != "b")
    moved = [i for i, (x, y) in enumerate(zip(before, during, strict=True)) if x != y]
    assert moved and all(before[i] == "b" for i in moved)  # only b's keys moved
    assert "b" not in during and Counter(during[i] for i in moved).keys() <= set("acd")
    assert owners(policy, fleet) == before  # b is back: the same keys return to it


def test_bounded_load_spills_a_hot_prefix(fleet: list[Route]) -> None:
    policy = PrefixAffinity(load_factor=1.25)
    hot = KEYS[0]
    home = policy.pick(fleet, lambda route: True, hot)
    assert home is not None
    # 8 requests in flight spread evenly elsewhere, and home already holds its fair share (2) + more.
    for route in fleet:
        for _ in range(4 if route is home else 2):
            route.stats.started()
    # budget = 1.25 * (10 + 1) / 4 = 3.4375 -> at most 4 in flight: home (4) is full, the key spills.
    spilled = policy.pick(fleet, lambda route: True, hot)
    assert spilled is not None and spilled is not home
    home.stats.succeeded(0.1)  # home back to 3 in flight, under its bound again
    assert policy.pick(fleet, lambda route: True, hot) is home


def test_without_a_request_it_spreads_by_load(fleet: list[Route]) -> None:
    for route in fleet[:3]:
        route.stats.started()
    assert PrefixAffinity().pick(fleet, lambda route: True) is fleet[3]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="load_factor >= 1"):
        make_policy("prefix_affinity", load_factor=0.5)


def test_router_sends_each_prefix_to_one_server(servers: dict[str, FaultServer]) -> None:
    config = make_config(servers, lb_policy="prefix_affinity", prefix_affinity={"prefix_chars": 64})
    docs = [f"Document {i}: " + "lorem ipsum " * 20 for i in range(6)]
    with Router(config) as router:
        served: dict[int, set[str]] = {}
        for question in range(5):
            for i, doc in enumerate(docs):
                messages = [{"role": "system", "content": doc}, {"role": "user", "content": f"question {question}"}]
                info = call_info(router.chat(messages))
                assert info is not None and info.route is not None
                served.setdefault(i, set()).add(info.route)
    assert all(len(routes) == 1 for routes in served.values())  # every prefix stayed on one route
    assert len({next(iter(r)) for r in served.values()}) >= 2  # and the prefixes did not all pile on one


def test_prefix_hash_is_stable_and_bounded(servers: dict[str, FaultServer]) -> None:
    config = make_config(servers, lb_policy="prefix_affinity", prefix_affinity={"prefix_chars": 20})
    with Router(config) as router:
        policy = router.policy
        assert isinstance(policy, PrefixAffinity) and policy.prefix_chars == 20
        a = [{"role": "system", "content": "same twenty chars!!! then A"}]
        b = [{"role": "system", "content": "same twenty chars!!! then B"}]
        c = [{"role": "system", "content": [{"type": "text", "text": "other text entirely"}]}]
        served = [call_info(router.chat(m)).route for m in (a, b, a, b)]  # type: ignore[union-attr]
        assert len(set(served)) == 1  # differs only after the first 20 characters: one key
        assert call_info(router.chat(c)) is not None  # list-of-parts content is hashed too


@pytest.mark.live
def test_real_servers_reuse_the_cached_prefix(llama_servers: list[Any]) -> None:
    """Two llama.cpp servers: a repeated long prefix lands where it is cached and is not read again."""
    # Three prefixes over two servers: round robin would send a prefix's second question elsewhere.
    topics = ["the history of the river trade", "the anatomy of migrating birds", "the chemistry of glass"]
    docs = [f"Notes on {t}. " + " ".join(f"Fact {n} about {t} is recorded here." for n in range(60)) for t in topics]
    config = live_config(llama_servers, lb_policy="prefix_affinity", params={"max_tokens": 2})
    with Router(config) as router:
        routes: dict[int, list[str]] = {i: [] for i in range(len(docs))}
        cached: list[tuple[int, int]] = []  # (cached tokens, prompt tokens) of each repeated prefix
        for question in ("Summarise.", "List one fact."):
            for i, doc in enumerate(docs):
                response = router.chat([{"role": "system", "content": doc}, {"role": "user", "content": question}])
                routes[i].append(call_info(response).route)  # type: ignore[union-attr]
                usage = response.usage
                assert usage is not None
                if question != "Summarise.":
                    details = usage.prompt_tokens_details
                    cached.append(((details.cached_tokens or 0) if details else 0, usage.prompt_tokens))
    assert all(len(set(r)) == 1 for r in routes.values()), routes
    assert all(hit > 0.8 * prompt for hit, prompt in cached), cached  # the second question re-read almost nothing

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


# --- multimodal prompts, and a prompt far past the hashing cap ---


def _vision(i: int, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    import base64

    pixels = base64.b64encode(bytes((i * 31 + n * 7) % 256 for n in range(24_000))).decode()
    url = f"data:image/png;base64,iVBORw0KGgo{pixels}"  # one PNG header, distinct pixels: 32 K characters each
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def _audio(i: int) -> list[dict[str, Any]]:
    import base64

    data = base64.b64encode(bytes((i * 17 + n * 3) % 256 for n in range(12_000))).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "Transcribe this."}]}]


def test_distinct_images_and_audio_spread_and_equal_ones_keep_their_route(servers: dict[str, FaultServer]) -> None:
    """Issue 25 item 7: only text was hashed, so 20 distinct vision (or audio) prompts all went to one route."""
    config = make_config({n: servers[n] for n in "ab"}, lb_policy="prefix_aware")
    with Router(config, start_prober=False) as router:
        for ask in (_vision, _audio):
            homes = {}
            for i in range(20):
                info = call_info(router.chat(ask(i)))
                assert info is not None and info.route is not None
                homes[i] = info.route
            spread = Counter(homes.values())
            assert spread["a"] >= 8 and spread["b"] >= 8, (ask.__name__, spread)  # least_outstanding: 10/10
            for i in range(20):  # the same picture or recording again: where it is cached
                assert call_info(router.chat(ask(i))).route == homes[i]  # type: ignore[union-attr]


def test_every_content_part_a_server_caches_is_hashed() -> None:
    from anorag_integrations.router.balancing.prefix_index import chain_blocks, conversation_blocks

    def blocks(*parts: Any) -> tuple[int, ...]:
        return conversation_blocks([{"role": "user", "content": list(parts)}])

    text = {"type": "text", "text": "Describe it."}
    big = "data:image/jpeg;base64," + "A" * 300_000

    def image(url: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": url}}

    assert blocks(image("http://img/1.png"), text) != blocks(image("http://img/2.png"), text)
    assert blocks(image("http://img/1.png"), text) == blocks(image("http://img/1.png"), text)
    assert blocks(image(big + "B"), text) != blocks(image(big + "C"), text)  # differ only in the tail
    assert blocks(image(big + "B"), text) != blocks(image(big + "BB"), text)  # or only in the length
    assert blocks(image(big), text) == blocks(image("".join([big])), text)
    assert len(blocks(image(big), text)) < 100  # a 300 K payload is sampled: the text after it still counts
    audio = [{"type": "input_audio", "input_audio": {"data": d, "format": "wav"}} for d in ("UklGRg1", "UklGRg2")]
    assert blocks(audio[0], text) != blocks(audio[1], text) and blocks(audio[0]) == blocks(dict(audio[0]))
    video = [{"type": "video_url", "video_url": {"url": u}} for u in ("http://v/1.mp4", "http://v/2.mp4")]
    assert blocks(video[0]) != blocks(video[1])
    assert blocks({"type": "video_url", "video_url": {"url": "u"}, "x": 1}) == blocks(
        {"x": 1, "video_url": {"url": "u"}, "type": "video_url"}  # canonical: key order does not matter
    )
    # text-only prompts hash as before: a string and its text parts alike
    assert blocks(text) == conversation_blocks([{"role": "user", "content": "Describe it."}])
    assert blocks(text) == chain_blocks("user\x1fDescribe it.\x1e")
    assert blocks(text, image("http://img/1.png")) != blocks(image("http://img/1.png"), text)  # order counts


class _Tripwire(str):
    """A huge string that counts the characters read of it by slicing and raises if used whole."""

    def __new__(cls, text: str) -> _Tripwire:
        made = super().__new__(cls, text)
        made.read = 0
        return made

    def __getitem__(self, key: Any) -> str:
        piece = str.__getitem__(self, key)
        self.read += len(piece)
        return piece

    def _whole(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole prompt was read")

    __iter__ = __format__ = __str__ = __add__ = __radd__ = __mod__ = encode = join = split = _whole  # type: ignore[assignment]


class _LazyParts(list):  # type: ignore[type-arg]
    """A million content parts, made as they are read: counts how many were."""

    def __init__(self, part: dict[str, Any], count: int) -> None:
        super().__init__()
        self.part, self.count, self.pulled = part, count, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.count):
            self.pulled += 1
            yield self.part

    def __len__(self) -> int:
        return self.count


def test_the_hashing_work_is_bounded_before_the_prompt_is_copied() -> None:
    """Issue 25 item 16: a 50 MB prompt was joined whole before the cap applied. What is read is counted, not timed."""
    from anorag_integrations.router.balancing.prefix_index import BLOCK_CHARS, MAX_HASHED_BLOCKS
    from anorag_integrations.router.call import Call

    cap = BLOCK_CHARS * MAX_HASHED_BLOCKS
    config = make_config({"a": "http://127.0.0.1:1/a/v1", "b": "http://127.0.0.1:1/b/v1"}, lb_policy="prefix_aware")
    with Router(config, start_prober=False) as router:
        policy, routes = PrefixAware(), list(router.routes.values())
        huge = _Tripwire("x" * 50_000_000)
        call = Call(
            router, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": huge}], {}, stream=False
        )
        assert len(call.prefix_blocks(BLOCK_CHARS)) == MAX_HASHED_BLOCKS
        assert 0 < huge.read <= cap  # of 50 M characters, no more than the cap was read
        assert policy.pick(routes, everyone, call) is not None
        assert huge.read <= cap  # computed once per call

        image = _Tripwire("data:image/png;base64," + "Q" * 20_000_000)
        call = Call(
            router,
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
            {},
            stream=False,
        )
        assert call.prefix_blocks(BLOCK_CHARS)
        assert 0 < image.read <= 2 * 2_048 + 64  # a payload is sampled: its head and tail

        parts = _LazyParts({"type": "text", "text": "a"}, 1_000_000)
        call = Call(router, [{"role": "user", "content": parts}], {}, stream=False)
        assert policy.pick(routes, everyone, call) is not None
        assert parts.pulled <= 4 * MAX_HASHED_BLOCKS  # not a million: at most PIECES_PER_BLOCK (4) pieces per block

        other = _LazyParts({"type": "thing", "thing": [0] * 10}, 1_000_000)  # an unknown part type, serialised
        call = Call(router, [{"role": "user", "content": other}], {}, stream=False)
        assert call.prefix_blocks(BLOCK_CHARS) and other.pulled <= 4 * MAX_HASHED_BLOCKS


def test_embedding_batches_are_hashed_by_their_inputs(servers: dict[str, FaultServer]) -> None:
    """An embed() batch has no messages: prefix_aware reads its inputs, within the same cap."""
    from anorag_integrations.router.balancing.prefix_index import BLOCK_CHARS, MAX_HASHED_BLOCKS, text_blocks

    overrides = {n: {"kind": "embedding"} for n in "bc"}
    config = make_config(servers, lb_policy="prefix_aware", route_overrides=overrides)
    with Router(config, start_prober=False) as router:
        docs = [f"document {i} " * 40 for i in range(6)]
        first = [call_info(router.embed([doc])).route for doc in docs]  # type: ignore[union-attr]
        assert set(first) == {"b", "c"}
        assert [call_info(router.embed([doc])).route for doc in docs] == first  # type: ignore[union-attr]
    huge = _Tripwire("y" * 20_000_000)
    assert len(text_blocks([huge, "more"])) == MAX_HASHED_BLOCKS and huge.read <= BLOCK_CHARS * MAX_HASHED_BLOCKS
    assert text_blocks(["ab", "cd"], 3) == text_blocks(["abcd"], 3)

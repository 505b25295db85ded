"""Many models, one fleet: a call's ``model=`` picks the routes serving it, with aliases, names servers list,
404s that leave a group without opening a breaker, model fallbacks and context-window fallbacks.

The fleet: ``big_a`` and ``big_b`` serve ``big``, ``small`` serves ``small`` (each a fault server that
answers only its own model, 404 for any other, as vLLM does).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from anorag_integrations import (
    AllRoutesFailed,
    CallInfo,
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
    Router,
    StreamInterruptedError,
    call_info,
)
from anorag_integrations.config import config_from_dict
from anorag_integrations.router.endpoints.health import BreakerState
from anorag_integrations.router.errors import UnknownModelError
from anorag_integrations.router.models import LOOKUP_EVERY_S
from anorag_integrations.testing import Fault, FaultServer

from .conftest import USER

MODES = ["chat", "achat", "stream", "astream"]
POLICIES = ["round_robin", "least_latency", "least_outstanding", "prefix_affinity", "prefix_aware", "least_queue"]


@pytest.fixture
def fleet() -> Iterator[dict[str, FaultServer]]:
    with (
        FaultServer("big", reply="from big_a") as big_a,
        FaultServer("big", reply="from big_b") as big_b,
        FaultServer("small", reply="from small") as small,
    ):
        yield {"big_a": big_a, "big_b": big_b, "small": small}


def fleet_config(servers: dict[str, FaultServer], **llm: Any) -> dict[str, Any]:
    routes = {
        name: {"base_url": server.base_url, "model": server.model, "timeout": 2.0} for name, server in servers.items()
    }
    for name, overrides in llm.pop("route_overrides", {}).items():
        routes[name].update(overrides)
    health = {"failure_threshold": 3, "cooldown": 60, **llm.pop("health", {})}
    params = {"max_retries": 0, **llm.pop("params", {})}
    return {"llm": {"routes": routes, "health": health, "params": params, **llm}}


@pytest.fixture
def build(fleet: dict[str, FaultServer]) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def make(**llm: Any) -> Router:
        router = Router(config_from_dict(fleet_config(fleet, **llm), env={}), start_prober=False)
        made.append(router)
        return router

    yield make
    for router in made:
        router.close()


def run(router: Router, mode: str, **params: Any) -> tuple[str, CallInfo]:
    """One request in ``mode``; the answer text and how the router served it."""
    if mode in ("chat", "achat"):
        call = router.chat(USER, **params) if mode == "chat" else asyncio.run(router.achat(USER, **params))
        return call.choices[0].message.content or "", call_info(call)  # type: ignore[return-value]
    if mode == "stream":
        chunks = list(router.stream(USER, **params))
    else:

        async def collect() -> list[Any]:
            return [chunk async for chunk in router.astream(USER, **params)]

        chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, call_info(chunks[-1])  # type: ignore[return-value]


def serve_as(server: FaultServer, name: str) -> None:
    """The server serves (and lists) ``name`` from now on, and nothing else: as after a restart with another
    ``--served-model-name``."""
    server.model = name
    server.served_names = [name]


def sent_models(server: FaultServer) -> list[str]:
    return [body["model"] for body in server.requests]


# --- groups: a model picks its routes -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_model_goes_only_to_the_routes_serving_it(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build()
    for _ in range(5):
        text, info = run(router, mode, model="small")
        assert (text, info.route, info.model, info.requested_model) == ("from small", "small", "small", "small")
    assert fleet["big_a"].hits == fleet["big_b"].hits == 0
    routes = {run(router, mode)[1].route for _ in range(4)}  # no model: the default route's (big_a's) model
    assert routes == {"big_a", "big_b"} and fleet["small"].hits == 5


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_picks_within_the_group(build: Callable[..., Router], policy: str) -> None:
    router = build(lb_policy=policy)
    for model, expected in [("small", {"small"}), ("big", {"big_a", "big_b"})] * 3:
        assert run(router, "chat", model=model)[1].route in expected


def test_an_alias_is_sent_as_the_routes_model(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build(route_overrides={"small": {"aliases": ["tiny", "fast"]}})
    for alias in ("tiny", "fast"):
        text, info = run(router, "chat", model=alias)
        assert (text, info.model, info.requested_model) == ("from small", "small", alias)
    assert sent_models(fleet["small"]) == ["small", "small"]


def test_names_a_server_lists_join_the_group(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build()
    serve_as(fleet["small"], "small-v2")  # the server now serves (and lists) another name
    with pytest.raises(UnknownModelError):  # a probe-less router has not seen it: looked up, then found
        router.chat(USER, model="nonexistent")
    text, info = run(router, "chat", model="small-v2")  # listed at the lookup above: in the group, sent as is
    assert (text, info.route, info.model) == ("from small", "small", "small-v2")
    assert "small-v2" in router.health(probe=False)["small"]["serves"]


# --- unknown models: refused before sending ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_unknown_model_is_refused_before_anything_is_sent(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build()
    with pytest.raises(UnknownModelError) as raised:
        run(router, mode, model="smal")
    error = raised.value
    assert isinstance(error, ModelNotFoundError) and isinstance(error, InvalidRequestError)
    assert error.served == ["big", "small"] and error.closest == "small"
    assert "did you mean 'small'" in str(error) and "'big'" in str(error)
    assert sum(server.hits for server in fleet.values()) == 0
    assert all(router.routes[name].breaker.state is BreakerState.CLOSED for name in fleet)
    assert ("", "", "invalid") in router.outcomes.snapshot()  # counted, with no model label from the caller


def test_a_typo_repeated_asks_each_server_once_per_interval(
    build: Callable[..., Router], monkeypatch: pytest.MonkeyPatch
) -> None:
    router = build()
    asked: list[str] = []
    for route in router.routes.values():

        async def listing(timeout: float, route: Any = route, read: Any = route.alist_models) -> None:
            asked.append(route.name)
            await read(timeout)

        monkeypatch.setattr(route, "alist_models", listing)
    for i in range(20):
        with pytest.raises(UnknownModelError):
            router.chat(USER, model="typo") if i % 2 else asyncio.run(router.achat(USER, model="typo"))
    assert sorted(asked) == ["big_a", "big_b", "small"]  # once each, not 20 times: LOOKUP_EVERY_S apart
    assert LOOKUP_EVERY_S >= 1


# --- a 404 takes the route out of the group, never opens its breaker ---------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_404_leaves_the_group_and_fails_over_without_opening_the_breaker(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build(health={"failure_threshold": 1})
    serve_as(fleet["big_a"], "retired")  # big_a's server no longer serves big: 404 for it
    for _ in range(8):
        assert run(router, mode, model="big")[0] == "from big_b"
    assert fleet["big_a"].hits == 1  # asked once, then out of big's group
    route = router.routes["big_a"]
    assert route.breaker.state is BreakerState.CLOSED and route.breaker._failures == 0
    assert "big" in route.dropped and "big" not in route.served_names()
    serve_as(fleet["big_a"], "big")  # served again: its /v1/models lists it, and it is back
    router.health()
    assert "big" in route.served_names()
    assert {run(router, mode, model="big")[1].route for _ in range(4)} == {"big_a", "big_b"}


def test_404_on_every_route_of_the_model_is_model_not_found(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(route_overrides={"big_b": {"aliases": ["b"]}})
    serve_as(fleet["big_a"], "retired")
    serve_as(fleet["big_b"], "retired")
    with pytest.raises(ModelNotFoundError) as raised:
        router.chat(USER, model="big")
    assert not isinstance(raised.value, UnknownModelError)  # the servers said so: their 404s
    assert fleet["big_a"].hits == fleet["big_b"].hits == 1
    for name in ("big", "b"):  # now known to nobody (the alias went with big_b's model): refused before sending
        with pytest.raises(UnknownModelError):
            router.chat(USER, model=name)
    assert fleet["big_a"].hits == fleet["big_b"].hits == 1
    assert all(route.breaker._failures == 0 for route in router.routes.values())


# --- fallbacks across models --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fallbacks_go_on_to_the_next_model_when_every_route_failed(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build(fallbacks={"big": ["small"]}, params={"max_retries": 1})
    for name in ("big_a", "big_b"):
        fleet[name].set_fault(Fault.STATUS, status=503)
    text, info = run(router, mode, model="big")
    assert (text, info.route, info.model) == ("from small", "small", "small")
    assert (info.requested_model, info.models_tried, info.fallback_reason) == ("big", ["big"], "fallbacks")
    assert sorted(a.route for a in info.attempts) == ["big_a", "big_a", "big_b", "big_b"]  # big's 2 rounds first
    assert sent_models(fleet["small"]) == ["small"]


def test_without_fallbacks_a_failed_model_stays_failed(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build()
    for name in ("big_a", "big_b"):
        fleet[name].set_fault(Fault.STATUS, status=503)
    with pytest.raises(AllRoutesFailed):
        router.chat(USER, model="big")
    assert fleet["small"].hits == 0


def test_fallback_chain_follows_each_models_own_list(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(
        route_overrides={"big_b": {"model": "mid"}},
        fallbacks={"big": ["mid"], "mid": ["small"]},
    )
    serve_as(fleet["big_b"], "mid")
    fleet["big_a"].set_fault(Fault.STATUS, status=503)
    fleet["big_b"].set_fault(Fault.REFUSE)
    text, info = run(router, "chat", model="big")
    assert (text, info.models_tried, info.model) == ("from small", ["big", "mid"], "small")


@pytest.mark.parametrize("mode", MODES)
def test_context_overflow_goes_to_a_model_with_a_larger_window(
    fleet: dict[str, FaultServer], build: Callable[..., Router], mode: str
) -> None:
    router = build(context_window_fallbacks={"small": ["big"]})
    fleet["small"].set_fault(
        Fault.STATUS, status=400, message="This model's maximum context length is 2048 tokens. However, ..."
    )
    text, info = run(router, mode, model="small")
    assert text in ("from big_a", "from big_b")
    assert (info.model, info.models_tried, info.fallback_reason) == ("big", ["small"], "context_window")
    assert router.routes["small"].breaker._failures == 0


def test_overflow_predicted_from_max_model_len_sends_nothing_to_the_small_model(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(route_overrides={"small": {"max_model_len": 64}}, context_window_fallbacks={"small": ["big"]})
    long_prompt = [{"role": "user", "content": "word " * 400}]
    response = router.chat(long_prompt, model="small", max_tokens=8)
    info = call_info(response)
    assert info is not None and info.model == "big" and info.fallback_reason == "context_window"
    assert fleet["small"].hits == 0
    assert call_info(router.chat(USER, model="small")).route == "small"  # type: ignore[union-attr]


def test_overflow_without_a_window_fallback_is_the_servers_400(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(route_overrides={"small": {"max_model_len": 64}})
    fleet["small"].set_fault(Fault.STATUS, status=400, message="maximum context length is 64 tokens")
    with pytest.raises(ContextOverflowError):
        router.chat([{"role": "user", "content": "word " * 400}], model="small")
    assert fleet["small"].hits == 1 and fleet["big_a"].hits == 0


def test_fallback_route_still_serves_the_default_model(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(fallback_route="small")  # a different model, as anorag configs use it
    for name in ("big_a", "big_b"):
        fleet[name].set_fault(Fault.REFUSE)
    text, info = run(router, "chat")
    assert (text, info.route, info.model) == ("from small", "small", "small")  # sent its own model


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"fallbacks": {"big": ["smal"]}}, "fallbacks.big: 'smal' is not a configured model or alias (did you mean"),
        ({"fallbacks": {"bgi": ["small"]}}, "did you mean 'big'"),
        ({"fallbacks": {"big": ["small"], "small": ["big"]}}, "cycle: big -> small -> big"),
        ({"context_window_fallbacks": {"small": ["small"]}}, "cannot fall back to itself"),
        ({"route_overrides": {"small": {"aliases": ["small"]}}}, "is the route's model itself"),
        ({"route_overrides": {"small": {"kind": "embedding"}}, "fallbacks": {"big": ["small"]}}, "embedding model"),
        (
            {
                "route_overrides": {"small": {"kind": "embedding"}, "big_b": {"kind": "embedding"}},
                "fallbacks": {"small": ["big"]},
            },
            "never fall back",
        ),
    ],
)
def test_bad_fallbacks_are_config_errors(fleet: dict[str, FaultServer], llm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(fleet_config(fleet, **llm), source="fleet.yaml", env={})
    assert "fleet.yaml" in str(raised.value) and message in str(raised.value)


# --- per model in stats, metrics and health ----------------------------------------------------------


def test_stats_metrics_and_health_name_models(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    router = build(route_overrides={"small": {"aliases": ["tiny"]}})
    run(router, "chat", model="tiny")
    run(router, "chat", model="big")
    with pytest.raises(UnknownModelError):
        run(router, "chat", model="caller-free-text")
    stats = router.stats()
    assert stats["small"]["models"] == {"tiny": {"success": 1}}
    assert stats["small"]["serves"] == ["small", "tiny"]
    registry = CollectorRegistry()
    router.register_metrics(registry)
    labels = [s.labels for m in registry.collect() if m.name == "anorag_requests" for s in m.samples]
    assert {label["model"] for label in labels} == {"tiny", "big", ""}
    served = {
        (s.labels["route"], s.labels["model"])
        for m in registry.collect()
        if m.name == "anorag_route_serves"
        for s in m.samples
    }
    assert ("small", "tiny") in served and ("big_a", "big") in served
    health = router.health(probe=False)["small"]
    assert (health["kind"], health["serves"], health["aliases"]) == ("chat", ["small", "tiny"], ["tiny"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from(["big", "small", "smal", "gpt-4", "", "big "]), min_size=1, max_size=6))
def test_labels_are_only_served_names_and_nothing_stays_in_flight(
    build: Callable[..., Router], names: list[str]
) -> None:
    router = build()
    for name in names:
        with contextlib.suppress(UnknownModelError, InvalidRequestError):
            run(router, "chat", model=name)
    assert {model for _, model, _ in router.outcomes.snapshot()} <= {"big", "small", ""}
    assert all(route.stats.in_flight == 0 for route in router.routes.values())
    assert all(route.breaker.state is BreakerState.CLOSED for route in router.routes.values())


@pytest.mark.parametrize("policy", ["round_robin", "least_outstanding", "least_queue"])
def test_each_group_takes_turns_on_its_own(policy: str) -> None:
    """Calls cycling over 4 models, 4 routes each: every route of every group gets its share (one counter
    shared by the groups would step 4 at a time and always land on the same route of each)."""
    from anorag_integrations.router.call import Call
    from anorag_integrations.router.rounds import claim

    routes = {f"r{i}": {"base_url": f"http://127.0.0.1:{20000 + i}/v1", "model": f"m{i % 4}"} for i in range(16)}
    router = Router(config_from_dict({"llm": {"routes": routes, "lb_policy": policy}}, env={}), start_prober=False)
    try:
        picks: dict[str, int] = {}
        for i in range(4 * 4 * 10):
            call = Call(router, [{"role": "user", "content": "hello"}], {"model": f"m{i % 4}"}, stream=False)
            lease = claim(router, call, set(), set())
            assert lease is not None and lease.route.model == f"m{i % 4}"
            picks[lease.route.name] = picks.get(lease.route.name, 0) + 1
            lease.abandoned()
        assert picks == {name: 10 for name in routes}
    finally:
        router.close()


# --- adapters, embeddings and the CLI use the same groups --------------------------------------------


def test_adapters_name_the_model_and_report_what_served(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    from llama_index.core.llms import ChatMessage

    from anorag_integrations import ChatVLLMRouted, VLLMRouted

    router = build(route_overrides={"small": {"aliases": ["tiny"]}}, fallbacks={"big": ["small"]})
    message = ChatVLLMRouted(router=router, model="tiny").invoke("hi")
    assert message.content == "from small"
    meta = message.response_metadata
    assert (meta["route"], meta["requested_model"], meta["served_model"]) == ("small", "tiny", "small")
    for name in ("big_a", "big_b"):
        fleet[name].set_fault(Fault.STATUS, status=503)
    answer = VLLMRouted(router=router, model="big").chat([ChatMessage(role="user", content="hi")])
    assert answer.message.content == "from small"
    extra = answer.additional_kwargs
    assert (extra["served_model"], extra["model_fallback"], extra["models_tried"]) == ("small", "fallbacks", ["big"])
    with pytest.raises(UnknownModelError):
        ChatVLLMRouted(router=router, model="huge").invoke("hi")


def test_llama_index_context_window_is_its_models(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    from anorag_integrations import VLLMRouted

    fleet["small"].max_model_len, fleet["big_a"].max_model_len, fleet["big_b"].max_model_len = 1024, 8192, 16384
    router = build()
    assert VLLMRouted(router=router, model="small").metadata.context_window == 1024
    assert VLLMRouted(router=router, model="big").metadata.context_window == 8192  # the smaller of big's two
    assert VLLMRouted(router=router).metadata.context_window == 8192  # no model: the default route's, big


def test_embedding_routes_form_groups_too() -> None:
    with (
        FaultServer("minilm", reply="") as minilm,
        FaultServer("bge", reply="") as bge,
        FaultServer("chat", reply="from chat") as chat,
    ):
        bge.embedding_dimensions = 8
        routes = {
            "minilm": {"base_url": minilm.base_url, "model": "minilm", "kind": "embedding"},
            "bge": {"base_url": bge.base_url, "model": "bge", "kind": "embedding", "aliases": ["large"]},
            "chat": {"base_url": chat.base_url, "model": "chat"},
        }
        with Router(config_from_dict({"llm": {"routes": routes}}, env={}), start_prober=False) as router:
            default = router.embed(["a", "b"])
            assert call_info(default).route == "minilm" and default.model == "minilm"  # type: ignore[union-attr]
            large = router.embed(["a", "b"], model="large")
            assert call_info(large).route == "bge" and len(large.data[0].embedding) == 8  # type: ignore[union-attr]
            assert sent_models(bge) == ["bge"]
            with pytest.raises(UnknownModelError) as raised:
                router.embed(["a"], model="chat")  # a chat model is no embedding model
            assert raised.value.served == ["bge", "large", "minilm"] and chat.hits == 0


def test_healthcheck_shows_kinds_aliases_and_adapters(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from anorag_integrations.cli import main

    with FaultServer("base", served_names=["base-2"], adapters={"sql": None}) as server:
        routes = {"r": {"base_url": server.base_url, "model": "base", "aliases": ["b"]}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"llm": {"routes": routes}}))
        assert main(["--config", str(path), "healthcheck"]) == 0
    out = capsys.readouterr().out
    assert "kind:    chat   model: base   aliases: b" in out
    assert "serves:  b, base, base-2, sql (LoRA of base)" in out


# --- what the hostile review of issue 26 found -------------------------------------------------------


def test_a_spurious_404_does_not_keep_a_route_out_for_good_without_probes(
    fleet: dict[str, FaultServer], build: Callable[..., Router], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anorag_integrations.router.models as models

    router = build()
    fleet["big_a"].set_fault(Fault.STATUS, status=404, message="The model `big` does not exist.", times=1)
    assert run(router, "chat", model="big")[0] == "from big_b"  # big_a's 404 (restarting?): out, failed over
    route = router.routes["big_a"]
    assert "big" not in route.served_names()
    monkeypatch.setattr(models, "LOOKUP_EVERY_S", 0.0)  # the next call re-lists dropped routes in the background
    run(router, "chat", model="big")
    back = threading.Event()
    route.models_changed = lambda: (router.models._changed(), back.set())  # type: ignore[func-returns-value]
    if "big" not in route.served_names():
        back.wait(10)
    assert "big" in route.served_names() and route.breaker.state is BreakerState.CLOSED
    assert {run(router, "chat", model="big")[1].route for _ in range(4)} == {"big_a", "big_b"}


def test_concurrent_404s_on_one_route_all_fail_over(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build()
    serve_as(fleet["big_a"], "retired")
    fleet["big_a"].latency = 0.3  # every call sent there is in flight before the first 404 comes back
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: run(router, "chat", model="big")[0], range(8)))
    assert answers == ["from big_b"] * 8 and router.routes["big_a"].breaker._failures == 0


def test_fallbacks_apply_to_aliases_and_listed_names(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    fleet["small"].served_names = ["small", "small-listed"]
    fleet["small"].max_model_len = 64  # what its /v1/models reports
    router = build(
        route_overrides={"small": {"aliases": ["tiny"]}},
        fallbacks={"small": ["big"]},
        context_window_fallbacks={"small": ["big"]},
    )
    router.health()  # lists small-listed
    long_prompt = [{"role": "user", "content": "word " * 400}]
    for name in ("tiny", "small-listed"):
        info = call_info(router.chat(long_prompt, model=name))
        assert info is not None and (info.model, info.fallback_reason) == ("big", "context_window")
    fleet["small"].set_fault(Fault.STATUS, status=503)
    for name in ("tiny", "small-listed"):
        assert run(router, "chat", model=name)[1].fallback_reason == "fallbacks"
    assert fleet["small"].hits == 2  # the long prompts were never sent to it


def test_a_fallback_model_nobody_is_known_to_serve_is_looked_up(
    fleet: dict[str, FaultServer], build: Callable[..., Router]
) -> None:
    router = build(fallbacks={"big": ["small"]})
    fleet["small"].set_fault(Fault.STATUS, status=404, message="The model `small` does not exist.", times=1)
    with pytest.raises(ModelNotFoundError):
        router.chat(USER, model="small")  # the only route of small: out, and the caller told
    for name in ("big_a", "big_b"):
        fleet[name].set_fault(Fault.STATUS, status=503)
    text, info = run(router, "chat", model="big")
    assert (text, info.model) == ("from small", "small")  # small's /v1/models listed it again on the way


def test_a_lookup_never_runs_past_the_calls_deadline(fleet: dict[str, FaultServer]) -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()  # accepts connections into its backlog, never answers
    try:
        config = fleet_config(fleet)
        config["llm"]["routes"]["hung"] = {"base_url": f"http://127.0.0.1:{hung.getsockname()[1]}/v1", "model": "h"}
        with Router(config_from_dict(config, env={}), start_prober=False) as router:
            for mode in ("chat", "achat"):
                started = time.monotonic()
                with pytest.raises(UnknownModelError):
                    run(router, mode, model="nobody", deadline=1.0)
                assert time.monotonic() - started < 2.5  # the listing that never came did not hold the call
                router.models._looked_up.clear()
    finally:
        hung.close()


@pytest.mark.parametrize("max_tokens", ["5", 5.5, True, -1, None])
def test_odd_max_tokens_never_break_the_overflow_prediction(
    fleet: dict[str, FaultServer], build: Callable[..., Router], max_tokens: Any
) -> None:
    router = build(route_overrides={"small": {"max_model_len": 4096}}, context_window_fallbacks={"small": ["big"]})
    assert run(router, "chat", model="small", max_tokens=max_tokens)[1].route == "small"


def test_a_cut_stream_is_not_continued_by_the_fallback_routes_other_model() -> None:
    with FaultServer("big", reply="one two three four five six") as big, FaultServer("small", reply="a b c d") as fb:
        routes = {
            "big_a": {"base_url": big.base_url, "model": "big", "continue_streams": True},
            "fb": {"base_url": fb.base_url, "model": "small", "continue_streams": True},
        }
        config = config_from_dict({"llm": {"routes": routes, "fallback_route": "fb"}}, env={})
        with Router(config, start_prober=False) as router:
            big.set_fault(Fault.CUT, after_chunks=2)
            with pytest.raises(StreamInterruptedError):
                "".join(c.choices[0].delta.content or "" for c in router.stream(USER) if c.choices)
    assert fb.hits == 0


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"route_overrides": {"small": {"aliases": ["tiny"]}}, "fallbacks": {"big": ["tiny"], "small": ["big"]}},
         "cycle: big -> small -> big"),
        ({"route_overrides": {"small": {"aliases": ["tiny"]}}, "fallbacks": {"tiny": ["small"]}}, "to itself"),
    ],
)  # fmt: skip
def test_fallback_checks_see_through_aliases(fleet: dict[str, FaultServer], llm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(fleet_config(fleet, **llm), env={})


def test_a_fallback_chain_of_any_length_is_checked() -> None:
    routes = {f"r{i}": {"base_url": f"http://127.0.0.1:{20000 + i}/v1", "model": f"m{i}"} for i in range(3000)}
    chain = {f"m{i}": [f"m{i + 1}"] for i in range(2999)}
    assert config_from_dict({"llm": {"routes": routes, "fallbacks": chain}}, env={}).fallbacks == chain
    with pytest.raises(ConfigError, match="cycle"):
        config_from_dict({"llm": {"routes": routes, "fallbacks": {**chain, "m2999": ["m0"]}}}, env={})


def test_a_hostile_listing_is_bounded(fleet: dict[str, FaultServer], build: Callable[..., Router]) -> None:
    from anorag_integrations.router.endpoints.probe import Listed
    from anorag_integrations.router.endpoints.route import MAX_LISTED

    router = build()
    route = router.routes["small"]
    route.listed_models([Listed("x" * 10_000), Listed(""), *(Listed(f"n{i}") for i in range(5000))], time.time())
    assert len(route.listed) == MAX_LISTED and all(len(name) <= 256 for name in route.listed)
    with pytest.raises(UnknownModelError) as raised:
        router.chat(USER, model="y" * 1_000_000)
    assert len(str(raised.value)) < 5_000

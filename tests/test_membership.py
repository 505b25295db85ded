"""Live membership: routes added, removed and reloaded while calls (plain, streamed, async) are in flight.

A removed route drains: it gets no new request, what it has in flight finishes, then it is released (clients
closed, breaker retired, policy state, outcomes and metric series gone). A bad change is refused with
``ConfigError`` and the running routes keep serving. ``SIGHUP`` reloads the CLI's long-running commands.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anorag_integrations import ConfigError, Router, call_info
from anorag_integrations.router.errors import RouterError
from anorag_integrations.testing import Fault, FaultServer

from .conftest import MODEL, USER, make_config, three_fault_servers
from .test_failover import MODES, run


def route(server: FaultServer, **extra: Any) -> dict[str, Any]:
    return {"base_url": server.base_url, "model": MODEL, "timeout": 5.0, **extra}


def write(path: Path, routes: dict[str, dict[str, Any]], **llm: Any) -> Path:
    path.write_text(yaml.safe_dump({"llm": {"routes": routes, "params": {"max_retries": 0}, **llm}}))
    return path


@pytest.mark.parametrize("mode", MODES)
def test_an_added_route_takes_calls_in_every_mode(servers: dict[str, FaultServer], mode: str) -> None:
    with Router(make_config({"a": servers["a"]})) as router:
        changes = router.add_route("b", route(servers["b"]))
        assert changes.added == ["b"] and changes.kept == ["a"]
        served = {run(router, mode)[1].route for _ in range(4)}
        assert served == {"a", "b"}
        assert router.stats()["b"]["requests"] >= 1


def test_a_bad_added_route_is_refused_and_nothing_changes(servers: dict[str, FaultServer]) -> None:
    with Router(make_config({"a": servers["a"]})) as router:
        with pytest.raises(ConfigError, match=r"llm\.routes\.x\.base_url"):
            router.add_route("x", {"base_url": "ftp://nowhere", "model": MODEL})
        with pytest.raises(ConfigError, match="exists already"):
            router.add_route("a", route(servers["b"]))
        with pytest.raises(ConfigError, match="no such route"):
            router.remove_route("zz")
        with pytest.raises(ConfigError, match="no routes defined"):
            router.remove_route("a")
        assert list(router.routes) == ["a"]
        assert call_info(router.chat(USER)).route == "a"  # type: ignore[union-attr]


def test_a_removed_route_finishes_its_stream_then_is_released(servers: dict[str, FaultServer]) -> None:
    a, b = servers["a"], servers["b"]
    with Router(make_config({"a": a, "b": b})) as router:
        old = router.routes["b"]
        b.set_fault(Fault.STALL, after_chunks=2)
        chunks = router.stream(USER, route="b")
        first = [next(chunks), next(chunks)]
        drain = router.remove_route("b")
        assert not drain.done and old.breaker.tickets_out == 1
        assert router.stats()["b"]["state"] == "draining"  # shown until released
        hits = b.hits
        for _ in range(4):  # new calls never reach it, even pinned
            assert call_info(router.chat(USER)).route == "a"  # type: ignore[union-attr]
        with pytest.raises(RouterError, match="unknown route"):
            router.chat(USER, route="b")
        assert b.hits == hits
        b.set_fault(None)  # the stalled stream sends the rest
        text = "".join(c.choices[0].delta.content or "" for c in [*first, *chunks] if c.choices)
        assert text == "from b"
        assert drain.wait(10)
        assert old.breaker.retired and old.breaker.tickets_out == 0
        assert "b" not in router.stats() and old not in router.owned and not router.draining
        assert all(key[0] != "b" for key in router.outcomes.snapshot())


def test_a_removed_route_finishes_its_async_call(servers: dict[str, FaultServer]) -> None:
    a, b = servers["a"], servers["b"]

    async def scenario() -> None:
        with Router(make_config({"a": a, "b": b})) as router:
            b.set_fault(Fault.TRICKLE, interval=0.5)  # held until cleared: the rest then comes at once
            task = asyncio.create_task(router.achat(USER, route="b"))
            while b.hits == 0:
                await asyncio.sleep(0.01)  # polls the server's own count: the request reached it
            drain = router.remove_route("b")
            assert not drain.done
            b.set_fault(None)
            response = await task
            assert response.choices[0].message.content == "from b"
            assert await drain.async_wait(10)

    asyncio.run(scenario())


def test_reload_applies_the_difference_and_keeps_what_did_not_change(
    servers: dict[str, FaultServer], tmp_path: Path
) -> None:
    a, b, c = servers["a"], servers["b"], servers["c"]
    path = write(tmp_path / "config.yaml", {"a": route(a), "b": route(b)})
    with Router.from_config(path) as router:
        kept = router.routes["a"]
        router.chat(USER, route="a")
        router.add_route("api", route(c, aliases=["other"]))
        write(path, {"a": route(a), "c": route(c)})
        changes = router.reload()
        assert (changes.added, changes.removed, changes.kept) == (["c"], ["b"], ["a", "api"])
        assert router.routes["a"] is kept and router.stats()["a"]["requests"] == 1  # statistics kept
        assert changes.wait(10)
        write(path, {"a": route(a, timeout=9.0), "c": route(c)})
        assert router.reload().replaced == ["a"] and router.routes["a"] is not kept
        assert router.routes["a"].timeout == 9.0


def test_a_bad_reload_is_refused_and_the_running_config_keeps_serving(
    servers: dict[str, FaultServer], tmp_path: Path
) -> None:
    path = write(tmp_path / "config.yaml", {"a": route(servers["a"])})
    with Router.from_config(path) as router:
        path.write_text("llm:\n  routes:\n    a: {base_url: 'nope', model: m}\n")
        with pytest.raises(ConfigError, match=r"llm\.routes\.a\.base_url") as err:
            router.reload()
        assert str(path) in str(err.value)
        path.write_text("llm: [unclosed")
        with pytest.raises(ConfigError, match="not valid YAML"):
            router.reload()
        assert call_info(router.chat(USER)).route == "a"  # type: ignore[union-attr]


def test_sections_that_shape_the_router_need_a_restart(
    servers: dict[str, FaultServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "config.yaml", {"a": route(servers["a"])})
    with Router.from_config(path) as router:
        policy = router.policy
        write(path, {"a": route(servers["a"])}, lb_policy="least_latency")
        with caplog.at_level(logging.WARNING, "anorag_integrations.router"):
            changes = router.reload()
        assert changes.restart_needed == ["lb_policy"] and changes.kept == ["a"]
        assert router.policy is policy and router.config.lb_policy == "round_robin"
        assert "lb_policy changed" in caplog.text


def test_a_replaced_route_forgets_what_the_policy_knew(servers: dict[str, FaultServer]) -> None:
    a, b = servers["a"], servers["b"]
    config = make_config({"a": a, "b": b}, lb_policy="prefix_aware")
    with Router(config) as router:
        router.chat(USER, route="b")
        router.chat(USER)
        index = router.policy.index  # type: ignore[attr-defined]
        assert index.size("b") > 0 or index.size("a") > 0
        router.remove_route("b").wait(10)
        assert index.size("b") == 0 and "b" not in router.policy.hit_rates()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, FaultServer]]:
    with three_fault_servers() as started:
        yield started


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(["add b", "add c", "remove b", "remove c", "reload"]), min_size=1, max_size=8))
def test_any_membership_churn_under_load_loses_no_call_and_leaves_no_ticket(
    fleet: dict[str, FaultServer], steps: list[str]
) -> None:
    """Whatever sequence of changes runs beside sync, async and streamed calls: every call ends with an answer,
    and once every drain is done no route holds a ticket or an in-flight count, and only live routes are owned."""
    config = make_config({"a": fleet["a"]}, params={"max_retries": 2})
    failures: list[BaseException] = []
    drains = []
    with Router(config) as router:
        stop = threading.Event()

        def load(mode: str) -> None:
            while not stop.is_set():
                try:
                    text, _ = run(router, mode)
                    assert text.startswith("from ")
                except BaseException as exc:  # every one is a failure of the test
                    failures.append(exc)

        workers = [threading.Thread(target=load, args=(mode,)) for mode in MODES]
        for worker in workers:
            worker.start()
        for step in steps:
            verb, _, name = step.partition(" ")
            if verb == "add" and name not in router.routes:
                drains.extend(router.add_route(name, route(fleet[name])).drains.values())
            elif verb == "remove" and name in router.routes:
                drains.append(router.remove_route(name))
            elif verb == "reload":
                drains.extend(router.reload(router.config).drains.values())
        stop.set()
        for worker in workers:
            worker.join(30)
        assert not failures, failures[:3]
        assert all(drain.wait(10) for drain in drains)
        assert router.owned == set(router.routes.values()) and not router.draining
        for live in router.routes.values():
            assert live.breaker.tickets_out == 0 and live.stats.in_flight == 0


def test_a_dropped_router_with_membership_is_collected(servers: dict[str, FaultServer]) -> None:
    router = Router(make_config({"a": servers["a"]}))
    router.add_route("b", route(servers["b"]))
    router.remove_route("b").wait(10)
    ref = weakref.ref(router)
    del router
    gc.collect()
    assert ref() is None


def test_sighup_reloads_the_running_command(servers: dict[str, FaultServer], tmp_path: Path) -> None:
    """``anorag-llm healthcheck --watch`` reloads on SIGHUP and says what changed; a broken file is refused."""
    path = write(tmp_path / "config.yaml", {"a": route(servers["a"])})
    cmd = [sys.executable, "-m", "anorag_integrations.cli", "healthcheck", "--config", str(path), "--watch", "0.2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        seen = _read_until(proc, "1/1 routes healthy")
        write(path, {"a": route(servers["a"]), "b": route(servers["b"])})
        proc.send_signal(signal.SIGHUP)
        seen += _read_until(proc, "2/2 routes healthy")
        assert "added ['b']" in seen
        path.write_text("llm: {routes: {a: {base_url: nope, model: m}}}")
        proc.send_signal(signal.SIGHUP)
        seen = _read_until(proc, "reload refused")
        seen += _read_until(proc, "2/2 routes healthy")
        assert "llm.routes.a.base_url" in seen
    finally:
        proc.terminate()
        proc.wait(10)


def _read_until(proc: subprocess.Popen[str], text: str) -> str:
    """The command's output up to the first line holding ``text`` (the test's timeout bounds the wait)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the command ended without printing {text!r}:\n{''.join(seen)}")


def test_models_built_per_key_and_dropped_leave_no_thread_behind(
    servers: dict[str, FaultServer], tmp_path: Path
) -> None:
    """80 per-user-key models (each its own shared router, prober every 30 s), each dropped after a call: every
    router's prober and loop threads end when it is dropped, without waiting for the next probe."""
    from anorag_integrations import ChatVLLMRouted

    path = write(tmp_path / "config.yaml", {"a": route(servers["a"])}, health={"probe_interval": 30})
    ChatVLLMRouted(config_path=str(path), api_key="warm-up").invoke("hi")  # the process-wide watchdog starts once
    before = {t.ident for t in threading.enumerate()}
    for i in range(80):
        llm = ChatVLLMRouted(config_path=str(path), api_key=f"user-key-{i}")
        llm.invoke("hi")
        del llm
    deadline = time.monotonic() + 10  # far below the 30 s probe interval
    while (extra := [t.name for t in threading.enumerate() if t.ident not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)  # polls the threads themselves: the condition, not a guess at a duration
    assert extra == []


def test_bad_names_and_keys_in_garbage_are_refused_without_echoing_the_key(servers: dict[str, FaultServer]) -> None:
    key = "sk-SECRET-abcdef123456"
    with Router(make_config({"a": servers["a"]})) as router:
        for name in ("", "x\ny", "n" * 201):
            with pytest.raises(ConfigError, match="printable characters"):
                router.add_route(name, route(servers["b"]))
        for garbage in (f'{{"base_url": "http://x/v1", "api_key": "{key}"}}', ("api_key", key)):
            with pytest.raises(ConfigError) as err:
                router.add_route("b", garbage)  # type: ignore[arg-type]
            assert key not in str(err.value)
        with pytest.raises(ConfigError, match="no such route"):
            router.remove_route(["a"])  # type: ignore[arg-type]
        assert list(router.routes) == ["a"]


def test_reload_of_a_dict_keeps_the_file_for_the_next_reload(servers: dict[str, FaultServer], tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", {"a": route(servers["a"])})
    with Router.from_config(path) as router:
        router.reload({"llm": {"routes": {"a": route(servers["a"]), "b": route(servers["b"])}}})
        assert router.config.source == str(path)
        assert router.reload().removed == ["b"]
        path.write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(ConfigError, match="not UTF-8"):
            router.reload()


def test_close_ends_every_drain_even_with_a_stream_held_unread(servers: dict[str, FaultServer]) -> None:
    servers["b"].set_fault(Fault.STALL, after_chunks=1)
    router = Router(make_config({"a": servers["a"], "b": servers["b"]}))
    held = router.stream(USER, route="b")
    next(held)
    changes = router.add_route("c", route(servers["c"]))
    drain = router.remove_route("b")
    router.close()
    assert drain.wait(5) and changes.wait(5) and not router.draining

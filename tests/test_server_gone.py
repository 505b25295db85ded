"""A server that stops listening while requests are in flight (vLLM on SIGTERM: the port closes at once, requests
in flight are never answered and their connections stay open): as soon as a probe or another request finds the
port refusing, the router cuts those attempts, so their calls fail over (streams continue) instead of waiting out
the route's timeout."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from anorag_integrations import Router, call_info
from anorag_integrations.testing import Fault, FaultServer

from .conftest import USER, make_config

TIMEOUT = 60.0
"""The routes' per-attempt timeout: a call that waited it out would end the test by pytest's timeout first."""


def held_then_gone(server: FaultServer, fault: Fault, **options: Any) -> Callable[[], None]:
    """Hold the next request on ``server``; the returned function closes its port, keeping that request held."""
    server.set_fault(fault, **options)

    def gone() -> None:
        server.set_fault(Fault.REFUSE, release=False)

    return gone


def wait_for_hits(server: FaultServer, hits: int) -> None:
    """Until the server has received ``hits`` requests (its own count; the test's timeout bounds the wait)."""
    event = threading.Event()
    while server.hits < hits:
        event.wait(0.01)


def router(servers: dict[str, FaultServer], **route: Any) -> Router:
    overrides = {name: {"timeout": TIMEOUT, **route} for name in ("a", "b")}
    return Router(make_config({"a": servers["a"], "b": servers["b"]}, route_overrides=overrides), start_prober=False)


@pytest.mark.parametrize("trigger", ["probe", "request"])
def test_a_plain_call_held_by_a_server_that_stopped_fails_over_at_once(
    servers: dict[str, FaultServer], trigger: str
) -> None:
    a = servers["a"]
    with router(servers) as r:
        gone = held_then_gone(a, Fault.HANG)
        result: list[Any] = []
        caller = threading.Thread(target=lambda: result.append(r.chat(USER)))
        caller.start()
        wait_for_hits(a, 1)
        gone()
        if trigger == "probe":
            r.health()  # the probe finds the port refusing
        else:
            assert call_info(r.chat(USER, route="b")).route == "b"  # type: ignore[union-attr]
            with pytest.raises(Exception, match="cannot connect"):
                r.chat(USER, route="a")  # refused: its other attempts in flight are cut
        caller.join(TIMEOUT / 2)
        assert result, "the held call was not cut"
        info = call_info(result[0])
        assert info is not None and info.route == "b"
        assert info.attempts[0].route == "a" and info.attempts[0].error.error_class == "server_gone"


def test_a_stream_held_mid_answer_continues_elsewhere(servers: dict[str, FaultServer]) -> None:
    a = servers["a"]
    a.reply = servers["b"].reply = "one two three four five six"
    with router(servers, continue_streams=True) as r:
        gone = held_then_gone(a, Fault.STALL, after_chunks=2)
        stream = r.stream(USER)
        received = []
        while sum(1 for c in received if c.choices and c.choices[0].delta.content) < 2:
            received.append(next(stream))
        gone()
        r.health()
        received += list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == a.reply
        info = call_info(received[-1])
        assert info is not None and info.continued >= 1
        assert info.attempts[0].route == "a" and info.attempts[0].error.error_class == "server_gone"


def test_an_async_call_held_by_a_server_that_stopped_fails_over_at_once(servers: dict[str, FaultServer]) -> None:
    a = servers["a"]

    async def scenario() -> None:
        with router(servers) as r:
            gone = held_then_gone(a, Fault.HANG)
            task = asyncio.create_task(r.achat(USER))
            while a.hits < 1:
                await asyncio.sleep(0.01)  # polls the server's own count
            gone()
            await r.ahealth()
            response = await asyncio.wait_for(task, TIMEOUT / 2)
            info = call_info(response)
            assert info is not None and info.route == "b" and info.attempts[0].error.error_class == "server_gone"

    asyncio.run(scenario())

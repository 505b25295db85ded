"""FaultServer's capacity model: slots, a queue, and a client that disconnects aborts its request (as vLLM does).

Every wait below polls the server's own counters with a bound; none sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from anorag_integrations.testing import Fault, FaultServer

MODEL = "m"
SERVICE_S = 0.3
BOUND_S = 5.0


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


async def until(condition: Callable[[], bool], what: str, bound: float = BOUND_S) -> None:
    """Poll ``condition`` (state the server's thread changes) until it holds; AssertionError after ``bound``."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what}")
        await asyncio.sleep(0.005)


async def leaving_client(server: FaultServer, **extra: Any) -> asyncio.StreamWriter:
    """Send a chat request on a raw connection and return it unread: closing it is the client leaving."""
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    data = json.dumps(body(**extra)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    return writer


async def leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def timed_answer(client: httpx.AsyncClient, server: FaultServer, **extra: Any) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.post(f"{server.base_url}/chat/completions", json=body(**extra))
    return response.status_code, time.monotonic() - started


def test_a_running_request_whose_client_leaves_frees_its_slot() -> None:
    async def scenario(server: FaultServer) -> float:
        server.set_fault(Fault.HANG, times=1)  # the first request would hold the only slot for ever
        first = await leaving_client(server)
        await until(lambda: server.running == 1, "the first request runs")
        await leave(first)
        await until(lambda: server.running == 0 and server.waiting == 0, "the aborted request freed its slot")
        async with httpx.AsyncClient(timeout=BOUND_S) as client:
            status, seconds = await timed_answer(client, server)
        assert status == 200
        return seconds

    with FaultServer(MODEL, max_running=1) as server:
        server.latency = SERVICE_S
        seconds = asyncio.run(scenario(server))
        assert seconds < 2 * SERVICE_S, f"the next request took {seconds:.2f} s: it waited for the aborted one"
        assert server.hits == 2 and server.most_running == 1


def test_a_waiting_request_whose_client_leaves_drops_out_of_the_queue() -> None:
    async def scenario(server: FaultServer) -> float:
        server.set_fault(Fault.HANG, times=1)
        holder = await leaving_client(server)
        await until(lambda: server.running == 1, "the first request holds the slot")
        queued = await leaving_client(server)
        await until(lambda: server.waiting == 1, "the second request waits")
        await leave(queued)
        await until(lambda: server.waiting == 0, "the aborted waiter left the queue")
        assert server.running == 1
        await leave(holder)
        await until(lambda: server.running == 0, "the holder's abort freed the slot")
        async with httpx.AsyncClient(timeout=BOUND_S) as client:  # the slot is not handed to the gone waiter
            status, seconds = await timed_answer(client, server)
        assert status == 200
        return seconds

    with FaultServer(MODEL, max_running=1) as server:
        server.latency = SERVICE_S
        seconds = asyncio.run(scenario(server))
        assert seconds < 2 * SERVICE_S
        assert (server.running, server.waiting) == (0, 0)


def test_metrics_report_the_queue_of_a_full_server() -> None:
    async def scenario(server: FaultServer) -> str:
        server.set_fault(Fault.HANG, times=1)
        holder = await leaving_client(server)
        await until(lambda: server.running == 1, "the first request holds the slot")
        queued = [await leaving_client(server) for _ in range(2)]
        await until(lambda: server.waiting == 2, "two requests wait")
        async with httpx.AsyncClient(timeout=BOUND_S) as client:
            text = (await client.get(f"{server.root_url}/metrics")).text
        for writer in [holder, *queued]:
            await leave(writer)
        await until(lambda: (server.running, server.waiting) == (0, 0), "every aborted request left")
        return text

    with FaultServer(MODEL, max_running=1) as server:
        text = asyncio.run(scenario(server))
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 1\n' in text
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 2\n' in text


def test_priority_scheduling_lets_the_lower_priority_value_in_first() -> None:
    async def scenario(server: FaultServer) -> list[int]:
        server.set_fault(Fault.HANG, times=1)
        holder = await leaving_client(server)
        await until(lambda: server.running == 1, "the first request holds the slot")
        finished: list[int] = []
        async with httpx.AsyncClient(timeout=BOUND_S) as client:

            async def call(priority: int) -> None:
                status, _ = await timed_answer(client, server, priority=priority)
                assert status == 200
                finished.append(priority)

            batch = asyncio.ensure_future(call(5))
            await until(lambda: server.waiting == 1, "the batch request waits")
            interactive = asyncio.ensure_future(call(-1))
            await until(lambda: server.waiting == 2, "the interactive request waits behind it")
            await leave(holder)
            await asyncio.gather(batch, interactive)
        return finished

    with FaultServer(MODEL, max_running=1, scheduling="priority") as server:
        server.latency = SERVICE_S
        assert asyncio.run(scenario(server)) == [-1, 5]


def test_fcfs_server_refuses_a_priority_as_vllm_does() -> None:
    async def scenario(server: FaultServer) -> tuple[httpx.Response, int]:
        async with httpx.AsyncClient(timeout=BOUND_S) as client:
            refused = await client.post(f"{server.base_url}/chat/completions", json=body(priority=1))
            plain = await client.post(f"{server.base_url}/chat/completions", json=body(priority=0))
        return refused, plain.status_code

    with FaultServer(MODEL, max_running=2) as server:
        refused, plain = asyncio.run(scenario(server))
    assert plain == 200
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"] == "Got priority 1 but Priority scheduling is not enabled."
    assert error["type"] == "BadRequestError" and error["code"] == 400


def test_unknown_scheduling_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduling"):
        FaultServer(MODEL, scheduling="lifo")  # type: ignore[arg-type]

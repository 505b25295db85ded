"""Apps as gunicorn ``--preload`` runs them: the router is built and warmed up at import, in the master.

``GET /ask?q=TEXT`` answers ``<worker pid> <the model's answer>``; the upstream is an echo server at
``$PRELOAD_UPSTREAM``, so the test sees whose prompt each answer belongs to. ``app`` is the WSGI app
(sync and threaded workers, on ``Router.chat``); ``asgi`` the ASGI one (uvicorn's worker, on
``Router.achat`` in the worker's event loop).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict

route = {"base_url": os.environ["PRELOAD_UPSTREAM"], "model": "m", "timeout": 10}
ROUTER = Router(config_from_dict({"llm": {"routes": {"echo": route}, "params": {"max_retries": 0}}}, env={}))
WARM_UP = [{"role": "user", "content": "warm-up at import"}]
ROUTER.chat(WARM_UP)  # a pooled connection, made in the master
asyncio.run(ROUTER.achat(WARM_UP))  # and an async client, on a loop that is gone when the workers start


def _asked(query: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": parse_qs(query).get("q", [""])[0]}]


def _reply(answer: str | None) -> bytes:
    return f"{os.getpid()} {answer}".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    response = ROUTER.chat(_asked(environ.get("QUERY_STRING", "")))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [_reply(response.choices[0].message.content)]


async def asgi(
    scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    if scope["type"] == "lifespan":  # nothing to set up or tear down: the router was built at import
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    response = await ROUTER.achat(_asked(scope["query_string"].decode()))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": _reply(response.choices[0].message.content)})

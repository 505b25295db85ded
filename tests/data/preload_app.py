"""A WSGI app as gunicorn ``--preload`` runs it: the router is built and warmed up at import, in the master.

``GET /ask?q=TEXT`` answers ``<worker pid> <the model's answer>``; the upstream is an echo server at
``$PRELOAD_UPSTREAM``, so the test sees whose prompt each answer belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict

route = {"base_url": os.environ["PRELOAD_UPSTREAM"], "model": "m", "timeout": 10}
ROUTER = Router(config_from_dict({"llm": {"routes": {"echo": route}, "params": {"max_retries": 0}}}, env={}))
ROUTER.chat([{"role": "user", "content": "warm-up at import"}])  # a pooled connection, made in the master


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    asked = parse_qs(environ.get("QUERY_STRING", "")).get("q", [""])[0]
    answer = ROUTER.chat([{"role": "user", "content": asked}]).choices[0].message.content
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()} {answer}".encode()]

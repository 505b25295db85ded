"""What a FaultServer is set to and what it counts: its settings, the fault in force, the requests it got.

``ServerControl`` is the part tests touch from their own thread (``set_fault``, ``models_fault``,
the attributes below, the counters); the request handlers build on it (``replies.py``,
``streams.py``, ``fault_server.py``) and read the fault each request takes (``_received``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from aiohttp import web

from . import embeddings
from .faults import HELD, Fault, FaultState
from .loop_server import LoopServer
from .malformed import MODELS_FAULTS
from .served import Adapter
from .wire import header_value, usage

PROMPTS_KEPT = 10_000
"""How many distinct prompts the prefix-cache counters remember."""
SCHEDULING = ("fcfs", "priority")
"""vLLM's ``--scheduling-policy``: first come first served (its default), or by each request's ``priority``."""


def priority_refused(priority: int) -> str:
    """vLLM's 400 when a request sets a non-zero ``priority`` and the server does not schedule by it."""
    return f"Got priority {priority} but Priority scheduling is not enabled."


class Slots:
    """vLLM's ``--max-num-seqs``: at most ``size`` requests run at once, the rest wait their turn.

    Waiters are served by (priority, arrival): lower ``priority`` first, as vLLM's ``--scheduling-policy
    priority`` does (every request has priority 0 under ``fcfs``, so arrival alone decides). A freed slot
    goes straight to the next waiter, so a newcomer never overtakes one. A waiter cancelled (its client
    left) drops out of the queue, and one cancelled just as a slot reached it passes the slot on.
    """

    def __init__(self, size: int) -> None:
        self.free = size
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self.free > 0:  # a free slot means nobody waits: release hands slots to waiters first
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._arrivals), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # the slot came just as the client left: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._queue:
            _, _, turn = heapq.heappop(self._queue)
            if not turn.done():  # waiters whose client left are skipped
                turn.set_result(None)
                return
        self.free += 1


class ServerControl(LoopServer):
    """Settings (vLLM's flags, as attributes), counters, kept requests and the fault switch."""

    def __init__(
        self,
        model: str = "fake-model",
        *,
        reply: str = "The quick brown fox jumps over the lazy dog.",
        max_model_len: int | None = 4096,
        host: str = "127.0.0.1",
        port: int = 0,
        health_endpoint: bool = True,
        auto_tool_choice: bool = True,
        keep_requests: int = 1000,
        max_running: int | None = None,
        scheduling: Literal["fcfs", "priority"] = "fcfs",
        metrics: str | None = "vllm",
        served_names: Sequence[str] = (),
        adapters: Mapping[str, str | None] | None = None,
        runtime_lora: bool = False,
    ) -> None:
        super().__init__(f"fault-server-{model}", host, port)
        self._lock = threading.Lock()
        self.model = model
        """The name the server answers as; first of ``served_names``."""
        self.served_names = [model, *(name for name in dict.fromkeys(served_names) if name != model)]
        """Every name the model answers to, ``model`` first (vLLM's ``--served-model-name model alias...``):
        a request naming any of them is served, and answered as ``model``."""
        self.model_root = model
        """What ``/v1/models`` gives as ``root`` of each served name (vLLM: the model's folder)."""
        self._adapters: dict[str, Adapter] = {}
        for name, parent in (adapters or {}).items():
            self.add_adapter(name, parent)
        self.runtime_lora = runtime_lora
        """As vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``POST /v1/load_lora_adapter`` and
        ``/v1/unload_lora_adapter`` answer (without it, FastAPI's 404 ``{"detail": "Not Found"}``)."""
        self.reply = reply
        self.max_model_len = max_model_len
        self.reported_max_model_len: Any = None
        """What ``/v1/models`` reports as ``max_model_len`` in place of ``max_model_len`` (None: that): any JSON
        value a misconfigured or hostile server sends (-1, 0, 10**30, "4096", True, inf); requests still go by
        ``max_model_len``."""
        self.health_endpoint = health_endpoint
        self.auto_tool_choice = auto_tool_choice
        """As vLLM's --enable-auto-tool-choice: without it, tool_choice="auto" gets a 400."""
        self.reasoning: str | None = None
        """Reasoning text sent before the answer (vLLM's reasoning parser), in ``reasoning_field``."""
        self.reasoning_field = "reasoning"
        self.tool_arguments: Any = {}
        """Arguments of the tool call the server makes when the request offers tools (any JSON value:
        a small model can write ``[1, 2]`` where the schema wants an object)."""
        self.tool_calls = 1
        """How many calls an answer that calls tools makes at once (a model calling in parallel)."""
        self.max_running = max_running
        """As vLLM's --max-num-seqs: requests beyond it wait (``num_requests_waiting``); None: no limit. As
        vLLM does, a request whose client disconnects is aborted, waiting or running, and frees its place."""
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}, not {scheduling!r}")
        self.scheduling = scheduling
        """As vLLM's --scheduling-policy: "fcfs" (the default) refuses a non-zero ``priority`` with vLLM's 400;
        "priority" lets waiting requests in by their ``priority`` (lower first), then by arrival."""
        self.metrics = metrics
        """Metric names ``/metrics`` uses: "vllm", "vllm_old" (gpu_cache_usage_perc), "llamacpp"; None: 404."""
        self.kv_usage = 0.0
        """What ``/metrics`` reports as KV-cache use (0-1)."""
        self.echo = False
        """Answer "echo: <the last message's text>" instead of ``reply``, so a test can tell whose answer it got."""
        self.latency = 0.0
        """Seconds every answer takes (a healthy server's service time), before any fault's delay."""
        self._models_fault: str | None = None
        self.hits = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._prompts: set[int] = set()
        self.structured_outputs = True
        """As vLLM's grammar backend: answers follow ``structured_outputs.json`` (False: ignored, as a server
        without one would)."""
        self.running = 0
        self.most_running = 0
        """The most requests this server has had running at once (``max_running`` bounds it)."""
        self.waiting = 0
        self.embedding_dimensions = embeddings.DIMENSIONS
        """Length of the vectors ``/v1/embeddings`` answers (see ``embeddings.fake_vector``)."""
        self._slots: Slots | None = None
        self.requests: list[dict[str, Any]] = []
        self.request_models: list[str | None] = []
        """The ``model`` each kept request named (None: none), in step with ``requests``."""
        self.last_authorization: str | None = None
        self.traceparents: list[str | None] = []
        self._keep = keep_requests
        self._state = FaultState()

    # --- control, from any thread ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def models_fault(self) -> str | None:
        """How ``GET /v1/models`` is malformed (None: it answers normally); chat requests don't change it.

        All HTTP 200: "html" (a ``text/html`` page), "null" (``null``), "invalid" (not JSON), "string"
        (``"x"``), "no_data" (``{"object": "list"}``, no ``data``).
        """
        return self._models_fault

    @models_fault.setter
    def models_fault(self, kind: str | None) -> None:
        if kind is not None and kind not in MODELS_FAULTS:
            raise ValueError(f"models_fault must be None or one of {', '.join(MODELS_FAULTS)}, not {kind!r}")
        self._models_fault = kind

    @property
    def adapters(self) -> dict[str, str]:
        """The LoRA adapters the server holds now: name -> the served name it was loaded on (its ``parent``)."""
        with self._lock:
            return {name: adapter.parent for name, adapter in self._adapters.items()}

    def add_adapter(self, name: str, parent: str | None = None, *, root: str | None = None) -> None:
        """Hold a LoRA adapter named ``name`` from now on, as ``--lora-modules`` or a runtime load would.

        ``parent`` is the served name it was loaded on (None: ``model``; vLLM's ``--lora-modules`` JSON form
        can name another); ``root`` is its folder in ``/v1/models`` (None: ``/adapters/<name>``). An adapter of
        that name is replaced. ValueError for a served name or a parent the server does not serve.
        """
        parent = self.model if parent is None else parent
        if name in self.served_names:
            raise ValueError(f"the adapter {name!r} conflicts with a served name ({', '.join(self.served_names)})")
        if parent not in self.served_names:
            raise ValueError(
                f"the parent {parent!r} of adapter {name!r} is not served ({', '.join(self.served_names)})"
            )
        with self._lock:
            self._adapters[name] = Adapter(parent, root or f"/adapters/{name}")

    def remove_adapter(self, name: str) -> bool:
        """Stop holding the adapter ``name``; whether it was held. Requests naming it get vLLM's 404 from now on."""
        with self._lock:
            return self._adapters.pop(name, None) is not None

    def serves(self, name: object) -> bool:
        """Whether a request naming ``name`` is served (vLLM: no name, or an empty one, means the model)."""
        if name is None or name == "":
            return True
        return isinstance(name, str) and (name in self.served_names or name in self.adapters)

    def answered_as(self, body: Mapping[str, Any]) -> str:
        """The ``model`` of the answer to ``body``: an adapter's own name, else ``model`` (for every served name)."""
        name = body.get("model")
        return name if isinstance(name, str) and name in self.adapters else self.model

    def set_fault(
        self, fault: Fault | str | None, *, times: int | None = None, release: bool = True, **options: Any
    ) -> None:
        """Switch the fault for the next ``times`` chat requests (all when None); None clears it.

        ``every=N`` among the options applies it to every Nth chat request only (an occasional fault).
        ``release=False`` leaves requests held by HANG, TRICKLE or STALL held (until the server stops): with
        REFUSE, what vLLM does on SIGTERM (the port closes, requests in flight are never answered).
        """
        fault = Fault(fault or Fault.NONE)
        if fault is Fault.STATUS and options.get("retry_after") is not None:
            header_value(options["retry_after"])  # fail here, not as a dropped connection later
        previous = self._state.fault
        with self._lock:
            self._state = FaultState(fault, times, options)
        if previous in HELD and fault is not previous and release:
            self._call(self._wake_hung())  # hung requests answer, trickling ones send the rest at once
        if fault is Fault.REFUSE and previous is not Fault.REFUSE:
            self._call(self._stop_listening(drop=release))
        elif previous is Fault.REFUSE and fault is not Fault.REFUSE:
            self._call(self._listen())

    # --- on the server's loop ----------------------------------------------------------------------

    def _starting(self) -> None:
        if self.max_running is not None:
            self._slots = Slots(self.max_running)

    def _received(self, request: web.Request, body: dict[str, Any]) -> FaultState:
        """Count and keep a chat request; the fault that applies to it."""
        self.hits += 1
        if "messages" in body:
            self._count_prefix(body)
        self.last_authorization = request.headers.get("Authorization")
        self.requests.append(body)
        del self.requests[: -self._keep]
        self.request_models.append(model if isinstance(model := body.get("model"), str) else None)
        del self.request_models[: -self._keep]
        self.traceparents.append(request.headers.get("traceparent"))
        del self.traceparents[: -self._keep]
        return self._take_fault()

    def _count_prefix(self, body: Mapping[str, Any]) -> None:
        """vLLM's prefix-cache counters, roughly: a prompt seen before is all hits."""
        tokens = usage(body, 0)["prompt_tokens"]
        key = hash(json.dumps(body.get("messages"), sort_keys=True, default=str))
        self.prefix_queries += tokens
        if key in self._prompts:
            self.prefix_hits += tokens
        elif len(self._prompts) < PROMPTS_KEPT:
            self._prompts.add(key)

    def _take_fault(self) -> FaultState:
        with self._lock:
            state = self._state
            every = int(state.options.get("every", 1))
            if every > 1 and self.hits % every:
                return FaultState()
            if state.remaining is None:
                return state
            if state.remaining <= 0:
                return FaultState()
            state.remaining -= 1
            return FaultState(state.fault, None, state.options)

"""Test helpers users can reuse: a vLLM-shaped fault-injection server (needs the ``testing`` extra), the
corpus of faults soak and property runs inject (``corpus.py``), and a real ``redis-server`` for shared state
(``redis_server.py``)."""

from __future__ import annotations

from .corpus import FAULT_CORPUS, MODELS_FAULT_CORPUS, TRANSIENT_FAULTS, FaultCase
from .fault_server import Fault, FaultServer
from .redis_server import RedisServer

__all__ = [
    "FAULT_CORPUS",
    "MODELS_FAULT_CORPUS",
    "TRANSIENT_FAULTS",
    "Fault",
    "FaultCase",
    "FaultServer",
    "RedisServer",
]

"""Test helpers users can reuse: a vLLM-shaped fault-injection server (needs the ``testing`` extra), and a real
``redis-server`` for shared state (``redis_server.py``)."""

from __future__ import annotations

from .fault_server import Fault, FaultServer
from .redis_server import RedisServer

__all__ = ["Fault", "FaultServer", "RedisServer"]

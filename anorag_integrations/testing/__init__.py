"""Test helpers users can reuse: a vLLM-shaped fault-injection server (needs the ``testing`` extra)."""

from __future__ import annotations

from .fault_server import Fault, FaultServer

__all__ = ["Fault", "FaultServer"]

"""Framework-free routing engine: routes, policies, health, failover, statistics."""

from __future__ import annotations

from .balancing.policies import POLICIES, Policy, register
from .core import CallInfo, Router, call_info
from .errors import (
    AllRoutesFailed,
    Attempt,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ContextOverflowError,
    FleetSaturatedError,
    InputTooLongError,
    InvalidRequestError,
    MalformedResponse,
    MixedEmbeddingsError,
    ModelNotFoundError,
    NoRouteOfKindError,
    PermanentRouteError,
    RouteError,
    RouterClosed,
    RouterError,
    StreamCut,
    StreamInterruptedError,
    TransientRouteError,
    UnprocessableEntityError,
)

__all__ = [
    "POLICIES",
    "AllRoutesFailed",
    "FleetSaturatedError",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "ConfigError",
    "ContextOverflowError",
    "InputTooLongError",
    "MixedEmbeddingsError",
    "InvalidRequestError",
    "MalformedResponse",
    "ModelNotFoundError",
    "NoRouteOfKindError",
    "PermanentRouteError",
    "Policy",
    "RouteError",
    "Router",
    "RouterClosed",
    "RouterError",
    "StreamCut",
    "StreamInterruptedError",
    "TransientRouteError",
    "UnprocessableEntityError",
    "call_info",
    "register",
]

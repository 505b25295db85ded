"""The custom callback event that makes a failover visible in LangChain traces."""

from __future__ import annotations

import contextlib
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.callbacks.manager import adispatch_custom_event, ahandle_event, dispatch_custom_event, handle_event

from ..router import CallInfo
from ._convert import failover_data

FAILOVER_EVENT = "anorag_route_failover"
"""Name of the custom callback event dispatched when a request failed on a route and moved on."""


def report(run_manager: CallbackManagerForLLMRun | None, info: CallInfo) -> None:
    """Dispatch the failover as a custom event, so LangSmith and console traces show it.

    ``BaseChatModel.stream`` calls ``_stream`` without its run manager; then the event goes to the
    enclosing run (a chain) when there is one, and otherwise only ``response_metadata`` tells.
    """
    if run_manager is None:
        with contextlib.suppress(RuntimeError):  # no enclosing run
            dispatch_custom_event(FAILOVER_EVENT, failover_data(info))
    else:
        handle_event(run_manager.handlers, *event(info), **event_context(run_manager))


async def areport(run_manager: AsyncCallbackManagerForLLMRun | None, info: CallInfo) -> None:
    if run_manager is None:
        with contextlib.suppress(RuntimeError):
            await adispatch_custom_event(FAILOVER_EVENT, failover_data(info))
    else:
        await ahandle_event(run_manager.handlers, *event(info), **event_context(run_manager))


def event(info: CallInfo) -> tuple[str, str, str, dict[str, Any]]:
    return "on_custom_event", "ignore_custom_event", FAILOVER_EVENT, failover_data(info)


def event_context(run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun) -> dict[str, Any]:
    return {"run_id": run_manager.run_id, "tags": run_manager.tags, "metadata": run_manager.metadata}

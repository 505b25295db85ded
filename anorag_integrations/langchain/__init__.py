"""LangChain adapter: ``ChatVLLMRouted``, a chat model, and ``VLLMRoutedEmbeddings``, over the shared router.

Only conversions live here (messages and chunks to and from the openai SDK types, errors to
``langchain_core.exceptions``); routing, failover, retries and statistics belong to the router.
"""

from __future__ import annotations

try:
    from ._callbacks import FAILOVER_EVENT
    from .chat_model import ChatVLLMRouted
    from .embeddings import VLLMRoutedEmbeddings
except ModuleNotFoundError as missing:  # langchain-core comes with the [langchain] extra: say so
    from .._adapters import framework_missing

    if (error := framework_missing(missing, __name__)) is None:
        raise
    raise error from missing

__all__ = ["FAILOVER_EVENT", "ChatVLLMRouted", "VLLMRoutedEmbeddings"]

"""The public names other code relies on (architecture.md), and the router's independence."""

from __future__ import annotations

import subprocess
import sys

import anorag_integrations


def test_public_names() -> None:
    expected = {"Router", "load_config", "ChatVLLMRouted", "VLLMRouted", "call_info", "ConfigError", "AllRoutesFailed"}
    expected |= {"VLLMRoutedEmbeddings", "VLLMRoutedEmbedding", "InputTooLongError", "NoRouteOfKindError"}
    assert expected <= set(anorag_integrations.__all__)
    for name in anorag_integrations.__all__:
        assert getattr(anorag_integrations, name) is not None
    from anorag_integrations.langchain import ChatVLLMRouted, VLLMRoutedEmbeddings
    from anorag_integrations.llama_index import VLLMRouted, VLLMRoutedEmbedding

    assert anorag_integrations.ChatVLLMRouted is ChatVLLMRouted
    assert anorag_integrations.VLLMRouted is VLLMRouted
    assert anorag_integrations.VLLMRoutedEmbeddings is VLLMRoutedEmbeddings
    assert anorag_integrations.VLLMRoutedEmbedding is VLLMRoutedEmbedding


def test_router_imports_no_framework() -> None:
    code = (
        "import sys, anorag_integrations.router, anorag_integrations.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'llama_index')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_and_a_fault_server_import_nothing_they_do_not_use() -> None:
    """Names are imported on first use: a fault server's process (the benchmarks start dozens) skips the openai SDK."""
    code = (
        "import sys, anorag_integrations, anorag_integrations.testing.fault_server; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'openai', 'langchain_core', 'llama_index'})); "
        "from anorag_integrations import Router, ConfigError, load_config; print(Router.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "anorag_integrations.router.core"]


def test_adapters_convert_in_private_modules_and_stay_small() -> None:
    """LlamaIndex's conversions live in ``_llama_convert.py``, as LangChain's in ``langchain/_convert.py``; the
    adapter classes stay short enough to read (style: an adapter under ~300 lines)."""
    from pathlib import Path

    from anorag_integrations import _llama_convert, llama_index

    assert {"to_dicts", "chat_response", "StreamState", "completion", "tool_calls"} <= set(vars(_llama_convert))
    assert not {"_to_dicts", "_chat_response", "_StreamState"} & set(vars(llama_index))
    package = Path(anorag_integrations.__file__).parent
    for adapter in ("llama_index.py", "langchain/chat_model.py", "langchain/embeddings.py"):
        assert len((package / adapter).read_text().splitlines()) <= 350, adapter

"""The process-wide routers the adapters share, one per config (or per ``base_url``), held weakly.

A router lives as long as some adapter or provider holds it: the registry keeps no strong reference,
so per-key routers (one per distinct ``api_key``, say) cannot pile up with their prober threads, and
a router nobody uses any more is finalised (see ``Router.__init__``). A closed router is replaced on
the next request for its key.
"""

from __future__ import annotations

import hashlib
import weakref
from os import PathLike
from typing import TYPE_CHECKING

from . import forks

if TYPE_CHECKING:
    from .core import Router

_SHARED: weakref.WeakValueDictionary[tuple[object, ...], Router] = weakref.WeakValueDictionary()
_LOCK = forks.lock()


def _fingerprint(secret: str | None) -> str | None:
    """A key's digest, so the registry's keys hold no secret."""
    return None if secret is None else hashlib.blake2b(secret.encode(), digest_size=16).hexdigest()


def shared_router(
    cls: type[Router],
    config_path: str | PathLike[str] | None,
    *,
    base_url: str | None,
    model: str | None,
    api_key: str | None,
    kind: str = "chat",
) -> Router:
    """See :meth:`Router.shared`."""
    from ..config import config_file, config_from_dict, load_config

    if base_url is not None:
        key: tuple[object, ...] = ("url", base_url, model, _fingerprint(api_key), kind)
    else:
        file = config_file(config_path)
        key = ("file", str(file.resolve()) if file.is_file() else "", _fingerprint(api_key))  # "": environment
    with _LOCK:
        router = _SHARED.get(key)
        if router is None or router.closed:
            if base_url is not None:
                if not model:
                    raise ValueError("base_url needs model= (the server's --served-model-name)")
                route = {
                    "base_url": base_url,
                    "model": model,
                    "kind": kind,
                    **({"api_key": api_key} if api_key else {}),
                }
                config = config_from_dict({"llm": {"routes": {"default": route}}}, source="arguments", env={})
            else:
                config = load_config(config_path)
                if api_key is not None:
                    config = config.with_api_key(api_key)
            router = cls(config)
            router.is_shared = True
            _SHARED[key] = router
        return router


def live_shared() -> int:
    """How many shared routers are alive (for tests and diagnostics)."""
    with _LOCK:
        return len(_SHARED)

"""Reading what ``Router.from_config`` and ``Router.reload`` are given: a path, a parsed document or a ``Config``."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config

MAX_PATH_CHARS = 4096
"""Longer text given to ``from_config`` is no file name (Linux's PATH_MAX)."""


def load(config: str | PathLike[str] | Mapping[str, Any] | Config | None) -> Config:
    """A ``Config`` from a file's path (None: ``$ANORAG_CONFIG``, else ``./config.yaml``), a document or a Config.

    A mapping is the document a file holds, ``llm:`` key and all, read as ``config_from_dict`` reads it
    (``VLLM_*`` overrides apply); a problem raises ``ConfigError``.
    """
    # config imports router.errors: keep the cycle out of import time
    from ..config import Config, config_from_dict, load_config

    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config))
    if isinstance(config, str) and ("\n" in config or len(config) > MAX_PATH_CHARS):
        problem = "this text is no file name (YAML text? pass yaml.safe_load(text), a dict, instead)"
        raise ConfigError("Router.from_config", [("", problem)])  # never echoed: it may hold a key
    if config is not None and not isinstance(config, str | PathLike):
        problem = f"expected a config file's path, a dict or a Config, got {type(config).__name__}"
        raise ConfigError("Router.from_config", [("", problem)])
    return load_config(config)

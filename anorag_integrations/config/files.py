"""Finding and reading the config file, YAML aliases bounded, so any failure is one ``ConfigError``.

The path is the argument, else ``$ANORAG_CONFIG``, else ``./config.yaml``. PyYAML puts no limit on
alias expansion, so ``_BoundedLoader`` adds one (``MAX_ALIAS_EXPANSION``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..router.errors import ConfigError

DEFAULT_CONFIG_PATH = "config.yaml"
ENV_CONFIG_PATH = "ANORAG_CONFIG"
ENV_ONLY_ROUTE = "default"
"""Name of the single route built from ``VLLM_BASE_URL`` when there is no config file."""
MAX_ALIAS_EXPANSION = 100_000
"""Nodes YAML aliases may add to a config file; a "billion laughs" file of 500 bytes adds billions."""


def config_file(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Path:
    """The file a config is read from: ``path``, else ``$ANORAG_CONFIG``, else ``./config.yaml``."""
    env = os.environ if env is None else env
    return Path(path if path is not None else env.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)


def read_document(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> tuple[Any, str]:
    """The parsed config file and its name; with no file, a one-route document from ``VLLM_BASE_URL``."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get(ENV_CONFIG_PATH))
    file = config_file(path, env=env)
    if not file.is_file():
        if not explicit and env.get("VLLM_BASE_URL"):
            return {"llm": {"routes": {ENV_ONLY_ROUTE: {}}}}, "environment"
        how = "" if explicit else f"; pass a path, set ${ENV_CONFIG_PATH}, or set VLLM_BASE_URL and VLLM_MODEL"
        raise ConfigError(str(file), [("", f"config file not found{how}")])
    try:
        return _load_yaml(file.read_text(encoding="utf-8")), str(file)
    except _AliasBomb:
        raise ConfigError(
            str(file),
            [("", f"YAML aliases expand past {MAX_ALIAS_EXPANSION:,} extra values (or contain themselves)")],
        ) from None
    except RecursionError:
        raise ConfigError(str(file), [("", "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(str(file), [("", f"{where}not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    except OSError as exc:
        raise ConfigError(str(file), [("", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(file), [("", f"not UTF-8 text (byte {exc.start}): is it the config file?")]) from None


class _AliasBomb(yaml.YAMLError):
    """The document's aliases expand past ``MAX_ALIAS_EXPANSION`` nodes (or refer to themselves)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand too far (PyYAML has no such limit)."""

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            sizes: dict[int, int] = {}
            if _expanded_size(node, sizes) > len(sizes) + MAX_ALIAS_EXPANSION:
                raise _AliasBomb()
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes under ``node`` with every alias written out; each distinct node is measured once."""
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:  # met again while being measured: the node contains itself
            raise _AliasBomb()
        return known
    sizes[id(node)] = -1
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    sizes[id(node)] = total
    return total


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded by ``MAX_ALIAS_EXPANSION``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()

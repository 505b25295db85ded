"""What may be shown of a user's input: URLs without credentials, secrets masked, echoes capped.

Errors, logs, ``stats()``, ``health()`` and reprs show ``redact_url(url)``; only the HTTP clients
get the credentials (``split_credentials``). Config errors echo input through ``preview`` and ``clip``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
PREVIEW_CHARS = 200
"""Longest echo of a user's value in an error message."""
SECRET_WORDS = ("apikey", "password", "passwd", "secret", "authorization", "cookie", "credential")
"""A mapping key containing one of these (case and separators ignored) holds a secret, never shown."""
SECRET_SEGMENTS = frozenset({"key", "token", "auth", "pwd"})
"""...as does one with one of these between separators (``access_token``, not ``max_tokens``)."""

_USERINFO = re.compile(r"(^|//)[^/\s]*@")
"""``user:password@`` after ``//`` (or at the start of a scheme-less ``user:pass@host``)."""
_SECRET_QUERY = re.compile(
    r"([?&;](?:password|passwd|pwd|pass|secret|api[-_]?key|access[-_]?token|token|auth)=)[^&#\s'\"]*", re.IGNORECASE
)
"""A secret in a query string (``redis://host/0?password=...``, ``...?api_key=...``)."""


def redact_url(text: str) -> str:
    """``text`` with every URL's ``user:password@`` replaced by ``***@`` and secret query values by ``***``."""
    return _SECRET_QUERY.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text))


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its userinfo, and the (user, password) it held; the client sends them as basic auth."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a secret (``api_key``, ``password``, ``Authorization``, ...)."""
    lowered = str(key).lower()
    squashed = re.sub(r"[^a-z0-9]", "", lowered)
    return (
        any(word in squashed for word in SECRET_WORDS)
        or squashed.endswith("token")  # accessToken
        or not SECRET_SEGMENTS.isdisjoint(re.split(r"[^a-z0-9]+", lowered))
    )


def preview(value: object, limit: int = PREVIEW_CHARS) -> str:
    """``repr(value)`` with secrets masked and URL credentials hidden, cut to ``limit`` characters.

    Work stops once ``limit`` characters are written, so a huge (or alias-shared) structure costs
    no more than a small one.
    """
    out = _Preview(limit + 1)
    out.write(value)
    return clip("".join(out.parts), limit)


def clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, ending in an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact_repr_args(args: Iterable[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """Pydantic ``__repr_args__`` with the credentials in a ``base_url`` field masked."""
    return [(key, redact_url(value) if key == "base_url" and isinstance(value, str) else value) for key, value in args]


class _Preview:
    """Writes a bounded, secret-free repr piece by piece until ``budget`` characters are spent."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.parts: list[str] = []

    def emit(self, text: str) -> None:
        self.parts.append(text[: self.budget])
        self.budget -= len(text)

    def write(self, value: object) -> None:
        if self.budget <= 0:
            return
        if isinstance(value, Mapping):
            self.emit("{")
            for i, (key, item) in enumerate(value.items()):
                if self.budget <= 0:
                    return
                self.emit(", " if i else "")
                self.write(key)
                self.emit(": ")
                if is_secret_key(key):
                    self.emit(repr(MASK))
                else:
                    self.write(item)
            self.emit("}")
        elif isinstance(value, list | tuple | set | frozenset):
            opening, closing = (
                ("[", "]") if isinstance(value, list) else ("(", ")") if isinstance(value, tuple) else ("{", "}")
            )
            self.emit(opening)
            for i, item in enumerate(value):
                if self.budget <= 0:
                    return
                self.emit(", " if i else "")
                self.write(item)
            self.emit(closing)
        elif isinstance(value, str):
            self.emit(repr(redact_url(value)[: self.budget]))
        else:
            self.emit(redact_url(repr(value))[: self.budget])

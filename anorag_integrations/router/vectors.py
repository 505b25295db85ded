"""The vector length of each embedding group, learned from answers: callers never get vectors of two lengths.

A group is what the embedding routes are asked for in one form: one model name, ``encoding_format``,
``dimensions`` and ``embed_dtype``. Its routes must answer vectors of one length; a route that answers
another serves another model behind the same name (or another size of it), and its answer is a
:class:`~.errors.MalformedResponse`: counted against that route, the batch fails over, the vectors are
never returned. This holds for single calls too, which no merge of batches compares.

Nothing states a group's length, so it is learned: the first answer sets it, and it holds until more
routes answer another length than answer it (each route counted once, by its last answer). When the
first answer came from the odd route, the first agreeing pair of the others outvotes it: the second
route is refused once (a tie keeps the length held), the third settles it, and a warning says the
length changed. With two routes that disagree nothing can outvote the first, so it wins; pin a route
(``route=...``) or give each model its own name to choose.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import forks
from .endpoints.answers import vector_shape
from .errors import MalformedResponse

if TYPE_CHECKING:
    from openai.types import CreateEmbeddingResponse

    from .endpoints.route import Route

log = logging.getLogger("anorag_integrations.router")

Shape = tuple[str, int]
"""A vector's encoding and length (``answers.vector_shape``)."""


@dataclass(slots=True)
class _Group:
    """One group's length (None until an answer) and the length of each route's last answer."""

    length: int | None = None
    answered: dict[str, int] = field(default_factory=dict)


class VectorLengths:
    """The groups of one router's embedding routes; :meth:`check` takes or refuses each answer."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._lock = forks.lock()

    def check(
        self, route: Route, body: Mapping[str, Any], response: CreateEmbeddingResponse
    ) -> CreateEmbeddingResponse:
        """``response`` when its vectors have the group's length; else raise MalformedResponse (the route's failure)."""
        if not response.data:
            return response
        encoding, length = vector_shape(response.data[0].embedding)  # one shape per answer: checked_embeddings
        extra = body.get("extra_body") or {}
        model = str(body.get("model"))
        key = (model, encoding, repr(body.get("dimensions")), repr(extra.get("embed_dtype")))
        with self._lock:
            group = self._groups.setdefault(key, _Group())
            group.answered[route.name] = length
            held = group.length
            if held is None or held == length:
                group.length = length
                return response
            votes = Counter(group.answered.values())
            agree, before = _routes(group, length), _routes(group, held)
            outvoted = votes[length] > votes[held]
            if outvoted:
                group.length = length
        if not outvoted:
            raise _refused(route, model, (encoding, length), (encoding, held), before)
        log.warning(
            "embedding routes of model %r: vectors now have %s (routes %s agree), not %s (routes %s): answers of "
            "that length came from a route serving another model",
            model,
            _what((encoding, length)),
            ", ".join(agree),
            _what((encoding, held)),
            ", ".join(before) or "none now",
        )
        return response


def _routes(group: _Group, length: int) -> list[str]:
    return sorted(name for name, answered in group.answered.items() if answered == length)


def _what(shape: Shape) -> str:
    encoding, length = shape
    return f"{length} values" if encoding == "float" else f"{length} base64 characters"


def _refused(route: Route, model: str, got: Shape, held: Shape, agree: list[str]) -> MalformedResponse:
    return MalformedResponse(
        f"vectors of {_what(got)}, but model {model!r} answers vectors of {_what(held)} on routes "
        f"{', '.join(agree)}: this route serves another model (or another size of it); its answer is not used",
        route=route.name,
        url=route.base_url,
        hint="serve one model under one name: give each embedding model its own `model` name on its routes "
        "(the server's --served-model-name)",
    )

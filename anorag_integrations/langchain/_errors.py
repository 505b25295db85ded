"""Router errors re-classed so they are also ``langchain_core.exceptions`` types."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from langchain_core import exceptions as lc_errors

from .. import router as r
from ..router.errors import EndpointNotFoundError


def both(ours: type[BaseException], theirs: type[BaseException]) -> type[BaseException]:
    """A class that is both the router's error and LangChain's, so either ``except`` catches it."""
    return type(ours.__name__, (ours, theirs), {"__module__": __name__})


LC_ERRORS: Mapping[type[BaseException], type[BaseException]] = {
    r.InputTooLongError: both(r.InputTooLongError, lc_errors.ContextOverflowError),
    r.NoRouteOfKindError: both(r.NoRouteOfKindError, lc_errors.ModelInvalidRequestError),
    r.ContextOverflowError: both(r.ContextOverflowError, lc_errors.ContextOverflowError),
    r.BadRequestError: both(r.BadRequestError, lc_errors.ModelInvalidRequestError),
    r.UnprocessableEntityError: both(r.UnprocessableEntityError, lc_errors.ModelInvalidRequestError),
    r.InvalidRequestError: both(r.InvalidRequestError, lc_errors.ModelInvalidRequestError),
    r.AuthenticationError: both(r.AuthenticationError, lc_errors.ModelAuthenticationError),
    r.ModelNotFoundError: both(r.ModelNotFoundError, lc_errors.ModelNotFoundError),
    # LangChain keys its classes to the status (404), and a wrong base_url is not worth retrying either
    EndpointNotFoundError: both(EndpointNotFoundError, lc_errors.ModelNotFoundError),
    r.AllRoutesFailed: both(r.AllRoutesFailed, lc_errors.ModelAPIError),
    r.StreamInterruptedError: both(r.StreamInterruptedError, lc_errors.ModelConnectionError),
}


@contextlib.contextmanager
def langchain_errors() -> Iterator[None]:
    """Re-class router errors as their LangChain twins; message, route and attempts are kept."""
    try:
        yield
    except r.RouterError as exc:
        if (twin := LC_ERRORS.get(type(exc))) is not None:
            exc.__class__ = twin  # type: ignore[assignment]  # twin subclasses type(exc)
        raise

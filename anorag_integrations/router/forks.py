"""One owner for process identity: after ``fork()`` the child renews what it must not share with its parent.

A child of ``fork()`` (gunicorn ``--preload``, multiprocessing's "fork" start method) has the parent's
memory but only the thread that forked. Left alone, a pooled connection would be read by both
processes (one user's answer reaching another), a lock some other thread held would stay held, and
the threads the router relies on (its event loop, the prober) would be gone. So: ``fork()`` waits for
any client being built (:func:`building`); locks, events and conditions made here start free in the
child; and each holder registered with :func:`renew_in_child` has ``renew_after_fork()`` called there,
in the order the holders registered.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from typing import Any, Protocol, TypeVar

log = logging.getLogger("anorag_integrations.router")


class Renewable(Protocol):
    def renew_after_fork(self) -> None:
        """Called in a forked child: drop what is the parent's, start what the child needs."""


_T = TypeVar("_T")

_SYNC: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every lock, event and condition made here that is still alive."""
_HOLDERS: weakref.WeakValueDictionary[int, Renewable] = weakref.WeakValueDictionary()
"""Registered holders by registration number (a dict keeps that order)."""
_numbers = itertools.count()


def _tracked(made: _T) -> _T:
    _SYNC.add(made)
    return made


def lock() -> threading.Lock:
    """A ``threading.Lock`` that a forked child gets unlocked, whoever held it at the fork."""
    return _tracked(threading.Lock())


def rlock() -> threading.RLock:
    return _tracked(threading.RLock())


def event() -> threading.Event:
    """A ``threading.Event`` whose waiters' lock a forked child gets free (the flag is kept)."""
    return _tracked(threading.Event())


def condition() -> threading.Condition:
    return _tracked(threading.Condition())


_BUILDING = threading.Lock()
"""Held while a client is built: ``fork()`` waits for the build to end, so no child inherits a half-built
client, or a module the first build was importing half-imported (seen: httpcore2 in the SDK's transport)."""


def building() -> threading.Lock:
    """The lock to hold while building something a child must never see half-made (see ``_BUILDING``)."""
    return _BUILDING


def renew_in_child(holder: Renewable) -> None:
    """Have ``holder.renew_after_fork()`` run in every forked child while the holder lives."""
    _HOLDERS[next(_numbers)] = holder


def _in_child() -> None:
    _BUILDING.release()  # taken before the fork by the forking thread (the hook below)
    for made in list(_SYNC):
        made._at_fork_reinit()  # the standard library's own reset (threading, logging use it)
    for holder in list(_HOLDERS.values()):
        try:
            holder.renew_after_fork()
        except Exception:  # one holder's surprise must not leave the others the parent's
            log.exception("renewing %r in a forked child failed", holder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_BUILDING.acquire, after_in_parent=_BUILDING.release, after_in_child=_in_child)

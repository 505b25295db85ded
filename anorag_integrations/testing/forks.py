"""A fork check users can run on their own router: do parent and child ever read each other's answers?

A router built before ``fork()`` (gunicorn ``--preload``, multiprocessing's ``fork`` start method)
must not share its pooled connections with the child, or one user's completion can reach another.
:func:`check_fork` warms the router up, forks, and has both processes ask questions whose answers
name the asker; it needs routes that echo the prompt (:class:`FaultServer` with ``echo = True``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..router import Router


class ChildHung(RuntimeError):
    """The forked child sent no report in time (it was killed): something it waited on was the parent's."""


def in_child(work: Callable[[], dict[str, Any]], limit_s: float = 60.0) -> Callable[[], dict[str, Any]]:
    """Fork; the child runs ``work`` and writes its JSON result (or ``{"error": repr}``) to a pipe, then ``_exit``s.

    Returns a function that waits up to ``limit_s`` for the report; a child silent that long is
    killed and :class:`ChildHung` raised. The child never runs the parent's cleanup.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            try:
                result = work()
            except BaseException as exc:
                result = {"error": repr(exc)}
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)

    def report() -> dict[str, Any]:
        chunks: list[bytes] = []
        deadline = time.monotonic() + limit_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([read], [], [], left)
                if not ready:
                    break
                chunk = os.read(read, 65536)
                if not chunk:
                    os.waitpid(pid, 0)
                    return dict(json.loads(b"".join(chunks) or b'{"error": "the child died without a report"}'))
                chunks.append(chunk)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ChildHung(f"the forked child (pid {pid}) did not report within {limit_s:g} s: it hangs")
        finally:
            os.close(read)

    return report


def crossed(router: Router, who: str, calls: int, concurrency: int = 4) -> list[str]:
    """``calls`` chats asking ``who-i`` (``concurrency`` at a time): each answer that was not its own echo,
    and each call that failed (a connection read by two processes also garbles or cuts answers)."""

    def one(i: int) -> str | None:
        asked = f"{who}-{i}"
        try:
            answer = router.chat([{"role": "user", "content": asked}]).choices[0].message.content
        except Exception as exc:
            return f"asked {asked!r}: {type(exc).__name__}: {exc}"
        return None if answer == f"echo: {asked}" else f"asked {asked!r}, got {answer!r}"

    with ThreadPoolExecutor(concurrency) as pool:
        return [wrong for wrong in pool.map(one, range(calls)) if wrong is not None]


@dataclass(frozen=True)
class ForkCheck:
    """What :func:`check_fork` saw: answers each process got that were not its own (both empty when safe)."""

    parent: list[str]
    child: list[str]

    @property
    def safe(self) -> bool:
        return not self.parent and not self.child


def check_fork(router: Router, calls: int = 1000, limit_s: float = 120.0) -> ForkCheck:
    """Warm ``router`` up (pooled connections), fork, and run ``calls`` echo chats in parent and child at once."""
    crossed(router, "warm-up", 4)
    report = in_child(lambda: {"crossed": crossed(router, "child", calls)}, limit_s)
    ours = crossed(router, "parent", calls)
    theirs = report()
    if "error" in theirs:
        raise RuntimeError(f"the forked child failed: {theirs['error']}")
    return ForkCheck(parent=ours, child=list(theirs["crossed"]))

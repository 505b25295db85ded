"""A name's A and AAAA records, looked up now and again: the addresses a headless Service's pods answer on.

:func:`resolve` asks once (both record types; a resolver of its own for given nameservers, the system's
otherwise). A name that does not exist, or has no address, is an answer: no addresses (a Service scaled to
zero). A lookup nobody answers well (timeout, SERVFAIL, REFUSED) is a failure: :class:`LookupFailed`.
:class:`DnsWatcher` repeats the lookup every ``interval`` in a daemon thread and hands each changed set to
its ``apply``; a failed lookup keeps the last good set, said once per streak of failures.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable

try:
    import dns.exception
    import dns.name
    import dns.rdatatype
    import dns.resolver
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("discovery: dns needs dnspython: pip install 'anorag-integrations[dns]'") from exc

from .. import forks

log = logging.getLogger("anorag_integrations.router")

SYSTEM_RESOLVER = "the system resolver"
"""How a lookup through the system's configured resolver names its nameservers in messages."""


class LookupFailed(Exception):
    """A lookup that got no usable answer (timeout, SERVFAIL, REFUSED, ...): unlike NXDOMAIN, not an answer."""

    def __init__(self, name: str, nameservers: str, reason: str) -> None:
        super().__init__(f"DNS lookup of {name} via {nameservers} failed: {reason}")
        self.name = name
        """The name looked up."""
        self.nameservers = nameservers
        """The nameservers asked, as text ("the system resolver" when none were given)."""
        self.reason = reason
        """Why no answer counts (e.g. "timeout after 2.0 s", "SERVFAIL")."""


def describe_nameservers(nameservers: list[str] | None, port: int) -> str:
    """The nameservers of a lookup as messages name them: ``host:port`` each, or the system resolver."""
    if not nameservers:
        return SYSTEM_RESOLVER
    return ", ".join(f"[{ns}]:{port}" if ":" in ns else f"{ns}:{port}" for ns in nameservers)


def resolve(name: str, *, nameservers: list[str] | None, port: int = 53, timeout: float = 2.0) -> frozenset[str]:
    """Every A and AAAA address of ``name`` (none for NXDOMAIN or no records); LookupFailed when unanswered.

    ``timeout`` bounds the whole lookup, both queries together; the name is absolute (no search domains).
    """
    where = describe_nameservers(nameservers, port)
    try:
        resolver = _resolver(nameservers, port, timeout)
        qname = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise LookupFailed(name, where, _reason(exc, timeout)) from exc
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        lifetime = max(deadline - time.monotonic(), 0.001)
        try:
            answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            return frozenset()  # the name does not exist: no AAAA either
        except (dns.exception.DNSException, OSError) as exc:
            raise LookupFailed(name, where, _reason(exc, timeout)) from exc
        for rdata in answer.rrset or ():
            found.add(str(ipaddress.ip_address(rdata.address)))
    return frozenset(found)


def _resolver(nameservers: list[str] | None, port: int, timeout: float) -> dns.resolver.Resolver:
    """A resolver without cache: the system's configuration, or only ``nameservers`` on ``port``."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a lookup failed, in a few words: a timeout, the rcodes or errors nameservers gave, else the error."""
    if isinstance(exc, dns.exception.Timeout):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        said = [err[3] if isinstance(err[3], str) else _error_text(err[3]) for err in errors]
        return ", ".join(dict.fromkeys(said)) or "no nameserver answered"
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return "no nameservers configured"
    return _error_text(exc)


def _error_text(exc: object) -> str:
    """An error as ``Type: message`` (the type alone when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DnsWatcher:
    """Looks ``name`` up every ``interval`` seconds and calls ``apply`` with each changed address set.

    It holds nothing but ``apply`` (which callers make weak when it leads to something that must be collected).
    """

    def __init__(
        self,
        name: str,
        apply: Callable[[frozenset[str]], None],
        *,
        interval: float,
        nameservers: list[str] | None,
        port: int = 53,
        timeout: float = 2.0,
    ) -> None:
        self.name = name
        self.interval = interval
        self.nameservers = list(nameservers) if nameservers else None
        self.port = port
        self.timeout = timeout
        self._apply = apply
        self._addresses: frozenset[str] = frozenset()
        self._applied: frozenset[str] | None = None
        """The set ``apply`` last took (None: none yet, or it raised: the next lookup applies its set again)."""
        self._failing = False
        """Whether the last lookup failed (one warning per streak of failures)."""
        self._lock = forks.lock()
        """Serialises the compare-and-apply of results (the thread's and a direct ``resolve_now``): so a caller
        of ``resolve_now`` must not hold, while the thread runs, a lock that ``apply`` takes."""
        self._stop = forks.event()
        self._thread: threading.Thread | None = None

    @property
    def addresses(self) -> frozenset[str]:
        """The last good address set (empty before the first successful lookup)."""
        return self._addresses

    @property
    def running(self) -> bool:
        """Whether the watcher's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def resolve_now(self) -> frozenset[str] | None:
        """Look up once and apply a set unlike the last applied; None when the lookup failed (last good set kept).

        The first success always applies; so does the one after an ``apply`` that raised (logged, not raised).
        """
        try:
            found = resolve(self.name, nameservers=self.nameservers, port=self.port, timeout=self.timeout)
        except LookupFailed as exc:
            with self._lock:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "DNS lookup of %s failed (%s, asking %s): keeping the %d routes found before",
                        self.name,
                        exc.reason,
                        exc.nameservers,
                        len(self._addresses),
                    )
            return None
        with self._lock:
            if self._failing:
                self._failing = False
                log.info("DNS lookup of %s succeeds again: %d addresses", self.name, len(found))
            self._addresses = found
            if found != self._applied:
                try:
                    self._apply(found)
                except Exception:  # the watcher keeps watching; the next lookup applies its set again
                    self._applied = None
                    log.exception("applying the addresses of %s failed", self.name)
                else:
                    self._applied = found
        return found

    def start(self) -> None:
        """Start the thread, whose first lookup is one interval from now (no-op when already running)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"anorag-dns-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.resolve_now()
            except Exception:  # a surprise in one round must not end the watching
                log.exception("watching the DNS name %s failed", self.name)

    def halt(self) -> None:
        """Ask the thread to stop without waiting for it (safe from a finaliser)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the thread and wait for it (at most one lookup's timeout and a second)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeout + 1)

    def renew_after_fork(self) -> None:
        """In a forked child: a watcher whose thread ran in the parent runs a thread of its own again."""
        ran = self._thread is not None and not self._stop.is_set()
        self._thread = None
        if ran:
            self.start()

    def __repr__(self) -> str:
        return f"DnsWatcher({self.name!r}, addresses={sorted(self._addresses)}, interval={self.interval})"

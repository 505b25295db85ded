"""A real DNS server on a free loopback port (UDP and TCP), for tests of DNS discovery; needs ``dnslib``.

It answers A and AAAA queries from records a test sets, and fails on demand (the ``dev`` extra installs it)::

    with DnsServer() as server:
        server.set("api.svc", ["10.0.0.1", "fd00::1"])   # A and AAAA records
        server.address                                     # "127.0.0.1:<port>"
        server.fail("servfail")                            # or "refused", "drop" (no reply), None (answer)
        server.remove("api.svc")                           # NXDOMAIN from now on
        server.queries("api.svc")                          # how many queries for it came
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError
from dnslib.server import DNSLogger
from dnslib.server import DNSServer as _DNSServer

FAIL_MODES = (None, "servfail", "refused", "drop")
"""What :meth:`DnsServer.fail` accepts: None answers normally."""

BIND_ATTEMPTS = 20
"""How many free UDP ports to try before giving up on one whose TCP twin is free too."""


def _key(name: str) -> str:
    """A DNS name as the server files it: lower case, without the root's trailing dot."""
    return name.rstrip(".").lower()


class _Zone:
    """The records and failure mode the server answers from, and the queries counted (behind one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, tuple[list[str], list[str], int]] = {}
        """Per name: its IPv4 addresses, its IPv6 addresses and their TTL."""
        self.mode: str | None = None
        self.counts: Counter[str] = Counter()

    def resolve(self, request: Any, handler: Any) -> Any:
        """dnslib's resolver hook: the reply to ``request`` (DNSError: no reply at all, in ``drop`` mode)."""
        qname = request.q.qname
        key = _key(str(qname))
        with self.lock:
            self.counts[key] += 1
            mode = self.mode
            record = self.records.get(key)
        if mode == "drop":
            raise DNSError("dropped on purpose")  # the handler logs it (quietly here) and sends nothing
        reply = request.reply()
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
        elif mode == "refused":
            reply.header.rcode = RCODE.REFUSED
        elif record is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            v4, v6, ttl = record
            if request.q.qtype == QTYPE.A:
                for address in v4:
                    reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=ttl))
            elif request.q.qtype == QTYPE.AAAA:
                for address in v6:
                    reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(address), ttl=ttl))
        return reply


class DnsServer:
    """dnslib's server on 127.0.0.1, UDP and TCP on one free port, answering from records tests set."""

    def __init__(self) -> None:
        self._zone = _Zone()
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []
        self.port = 0
        """The port both servers listen on (0 until started)."""

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as a nameserver address."""
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: Iterable[str], ttl: int = 1) -> None:
        """Make ``addresses`` the A (IPv4) and AAAA (IPv6) records of ``name``, replacing those it had."""
        v4: list[str] = []
        v6: list[str] = []
        for text in addresses:
            address = ipaddress.ip_address(text)
            (v4 if address.version == 4 else v6).append(str(address))
        with self._zone.lock:
            self._zone.records[_key(name)] = (v4, v6, ttl)

    def remove(self, name: str) -> None:
        """Forget ``name``: its queries get NXDOMAIN from now on."""
        with self._zone.lock:
            self._zone.records.pop(_key(name), None)

    def fail(self, mode: str | None) -> None:
        """Fail every query from now on: "servfail", "refused", "drop" (no reply); None answers again."""
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown failure mode {mode!r}: one of {FAIL_MODES}")
        with self._zone.lock:
            self._zone.mode = mode

    def queries(self, name: str) -> int:
        """How many queries for ``name`` (any type, UDP or TCP) the server answered or dropped."""
        with self._zone.lock:
            return self._zone.counts[_key(name)]

    def start(self) -> DnsServer:
        """Listen (UDP and TCP, one free port) and serve in daemon threads; no-op when already started."""
        if self._servers:
            return self
        logger = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False)
        for _ in range(BIND_ATTEMPTS):
            udp = _DNSServer(self._zone, address="127.0.0.1", port=0, logger=logger)
            port = int(udp.server.server_address[1])
            try:
                tcp = _DNSServer(self._zone, address="127.0.0.1", port=port, tcp=True, logger=logger)
            except OSError:  # the UDP port's TCP twin is taken: another port
                udp.server.server_close()
                continue
            break
        else:
            raise RuntimeError(f"no loopback port free for both UDP and TCP after {BIND_ATTEMPTS} tries")
        self.port = port
        self._servers = [udp, tcp]
        for server, kind in ((udp, "udp"), (tcp, "tcp")):
            thread = threading.Thread(target=server.server.serve_forever, name=f"dns-server-{kind}-{port}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close both sockets (the port is free again)."""
        servers, self._servers = self._servers, []
        threads, self._threads = self._threads, []
        for server in servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DnsServer({self.address if self._servers else 'stopped'})"


__all__ = ["FAIL_MODES", "DnsServer"]

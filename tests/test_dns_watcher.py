"""``members/dns.py`` against a real DNS server (dnslib, UDP and TCP on loopback): lookups, failures, the watcher."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from anorag_integrations.router.members.dns import DnsWatcher, LookupFailed, resolve
from anorag_integrations.testing.dns_server import DnsServer

pytestmark = pytest.mark.timeout(60)

LOGGER = "anorag_integrations.router"
WAIT_S = 10.0
"""How long a test waits for something the watcher's thread does (generous: it takes milliseconds)."""


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer() as started:
        yield started


@pytest.fixture
def dns(server: DnsServer) -> Iterator[DnsServer]:
    """The module's server, answering normally again after each test."""
    server.fail(None)
    yield server
    server.fail(None)


class Applied:
    """An ``apply`` that records each set it is given and signals when one equal to ``awaited`` arrives."""

    def __init__(self) -> None:
        self.sets: list[frozenset[str]] = []
        self.awaited: frozenset[str] | None = None
        self.arrived = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, addresses: frozenset[str]) -> None:
        with self.lock:
            self.sets.append(addresses)
        if addresses == self.awaited:
            self.arrived.set()

    def expect(self, addresses: set[str]) -> None:
        self.arrived.clear()
        self.awaited = frozenset(addresses)


def watcher(dns: DnsServer, name: str, apply: Applied, interval: float = 0.05, timeout: float = 2.0) -> DnsWatcher:
    return DnsWatcher(name, apply, interval=interval, nameservers=["127.0.0.1"], port=dns.port, timeout=timeout)


def dns_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"anorag-dns-{name}"]


def test_resolve_gives_ipv4_and_ipv6_addresses(dns: DnsServer) -> None:
    dns.set("both.test", ["10.0.0.1", "fd00::1", "10.0.0.2"])
    found = resolve("both.test", nameservers=["127.0.0.1"], port=dns.port)
    assert found == {"10.0.0.1", "10.0.0.2", "fd00::1"}
    assert dns.queries("both.test") == 2  # one A, one AAAA


def test_resolve_of_a_name_with_one_family_gives_that_family(dns: DnsServer) -> None:
    dns.set("v6only.test", ["fd00::7"])
    assert resolve("v6only.test", nameservers=["127.0.0.1"], port=dns.port) == {"fd00::7"}


def test_nxdomain_is_no_addresses_not_a_failure(dns: DnsServer) -> None:
    dns.set("gone.test", ["10.0.0.9"])
    dns.remove("gone.test")
    assert resolve("gone.test", nameservers=["127.0.0.1"], port=dns.port) == frozenset()
    assert resolve("never.test", nameservers=["127.0.0.1"], port=dns.port) == frozenset()


def test_a_name_without_records_is_no_addresses(dns: DnsServer) -> None:
    dns.set("empty.test", [])
    assert resolve("empty.test", nameservers=["127.0.0.1"], port=dns.port) == frozenset()


@pytest.mark.parametrize(("mode", "reason"), [("servfail", "SERVFAIL"), ("refused", "REFUSED"), ("drop", "timeout")])
def test_unanswered_lookups_fail_naming_name_and_nameserver(dns: DnsServer, mode: str, reason: str) -> None:
    dns.set("failing.test", ["10.0.0.1"])
    dns.fail(mode)
    started = time.monotonic()
    with pytest.raises(LookupFailed) as failed:
        resolve("failing.test", nameservers=["127.0.0.1"], port=dns.port, timeout=0.3)
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert "failing.test" in message
    assert dns.address in message
    assert reason in failed.value.reason
    assert dns.queries("failing.test") >= 1  # the server saw it: a failure of the server, not of the client


def test_watcher_applies_a_changed_set_at_its_next_interval(dns: DnsServer) -> None:
    dns.set("change.test", ["10.0.1.1"])
    applied = Applied()
    watching = watcher(dns, "change.test", applied)
    assert watching.resolve_now() == frozenset({"10.0.1.1"})
    assert applied.sets == [{"10.0.1.1"}]
    applied.expect({"10.0.1.1", "10.0.1.2"})
    watching.start()
    try:
        dns.set("change.test", ["10.0.1.1", "10.0.1.2"])
        assert applied.arrived.wait(WAIT_S)
        assert watching.addresses == {"10.0.1.1", "10.0.1.2"}
    finally:
        watching.stop()
    assert applied.sets == [{"10.0.1.1"}, {"10.0.1.1", "10.0.1.2"}]


def test_first_success_applies_even_no_addresses(dns: DnsServer) -> None:
    applied = Applied()
    watching = watcher(dns, "nothing.test", applied)
    assert watching.addresses == frozenset()
    assert watching.resolve_now() == frozenset()
    assert applied.sets == [frozenset()]


def test_an_unchanged_set_is_not_applied_again(dns: DnsServer) -> None:
    dns.set("same.test", ["10.0.2.1", "fd00::2"])
    applied = Applied()
    watching = watcher(dns, "same.test", applied)
    for _ in range(3):
        assert watching.resolve_now() == frozenset({"10.0.2.1", "fd00::2"})
    dns.set("same.test", ["fd00::2", "10.0.2.1"])  # the same set, in another order
    assert watching.resolve_now() == frozenset({"10.0.2.1", "fd00::2"})
    assert applied.sets == [{"10.0.2.1", "fd00::2"}]


def test_a_failure_streak_keeps_the_last_set_and_warns_once(dns: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dns.set("streak.test", ["10.0.3.1", "10.0.3.2"])
    applied = Applied()
    watching = watcher(dns, "streak.test", applied)
    assert watching.resolve_now() == frozenset({"10.0.3.1", "10.0.3.2"})
    dns.fail("servfail")
    for _ in range(4):
        assert watching.resolve_now() is None
    assert watching.addresses == {"10.0.3.1", "10.0.3.2"}
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "streak.test" in warnings[0].getMessage()
    assert "SERVFAIL" in warnings[0].getMessage()
    assert "keeping the 2 routes" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]

    dns.fail(None)
    assert watching.resolve_now() == frozenset({"10.0.3.1", "10.0.3.2"})
    assert watching.resolve_now() == frozenset({"10.0.3.1", "10.0.3.2"})
    infos = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "streak.test" in infos[0].getMessage()
    assert applied.sets == [{"10.0.3.1", "10.0.3.2"}]  # the failures changed nothing

    dns.fail("refused")  # a new streak: warned about again
    assert watching.resolve_now() is None
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "REFUSED" in warnings[1].getMessage()


def test_an_apply_that_raises_does_not_stop_the_watcher(dns: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dns.set("raising.test", ["10.0.4.1"])
    applied = Applied()
    raised = threading.Event()

    def apply(addresses: frozenset[str]) -> None:
        if not raised.is_set():
            raised.set()
            raise RuntimeError("the router is busy")
        applied(addresses)

    watching = DnsWatcher("raising.test", apply, interval=0.05, nameservers=["127.0.0.1"], port=dns.port)
    assert watching.resolve_now() == frozenset({"10.0.4.1"})  # apply raised: logged, not raised
    assert raised.is_set()
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    applied.expect({"10.0.4.1", "10.0.4.2"})
    watching.start()
    try:
        dns.set("raising.test", ["10.0.4.1", "10.0.4.2"])
        assert applied.arrived.wait(WAIT_S)
    finally:
        watching.stop()
    assert applied.sets[-1] == {"10.0.4.1", "10.0.4.2"}


def test_a_set_whose_apply_raised_is_applied_again(dns: DnsServer) -> None:
    dns.set("retry.test", ["10.0.5.1"])
    calls: list[frozenset[str]] = []

    def apply(addresses: frozenset[str]) -> None:
        calls.append(addresses)
        if len(calls) == 1:
            raise RuntimeError("not now")

    watching = DnsWatcher("retry.test", apply, interval=3600, nameservers=["127.0.0.1"], port=dns.port)
    watching.resolve_now()
    watching.resolve_now()
    watching.resolve_now()
    assert calls == [{"10.0.5.1"}, {"10.0.5.1"}]


def test_stop_ends_the_thread_promptly_despite_a_long_interval(dns: DnsServer) -> None:
    applied = Applied()
    watching = watcher(dns, "stop.test", applied, interval=3600, timeout=5.0)
    watching.start()
    watching.start()  # idempotent: still one thread
    threads = dns_threads("stop.test")
    assert len(threads) == 1
    assert threads[0].is_alive()
    assert threads[0].daemon
    started = time.monotonic()
    watching.stop()
    assert not threads[0].is_alive()
    assert time.monotonic() - started < 2  # not the join's bound of timeout + 1 s
    assert applied.sets == []  # the first lookup is one interval after start


def test_halt_ends_the_thread_without_waiting(dns: DnsServer) -> None:
    watching = watcher(dns, "halt.test", Applied(), interval=3600)
    watching.start()
    (thread,) = dns_threads("halt.test")
    watching.halt()
    thread.join(WAIT_S)
    assert not thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_watches_in_a_thread_of_its_own(dns: DnsServer) -> None:
    dns.set("fork.test", ["10.0.6.1"])
    applied = Applied()
    watching = watcher(dns, "fork.test", applied)
    watching.resolve_now()
    watching.start()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: only this thread survived; report whether renewing starts another that works
            code = 1
            try:
                os.close(read_end)
                applied.expect({"10.0.6.1", "10.0.6.2"})
                watching.renew_after_fork()
                alive = [thread.is_alive() for thread in dns_threads("fork.test")]
                os.write(write_end, b"thread " if alive == [True] else b"no-thread ")
                os.write(write_end, b"applied" if applied.arrived.wait(WAIT_S) else b"not-applied")
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        dns.set("fork.test", ["10.0.6.1", "10.0.6.2"])  # the parent's server: the child's thread must see it
        report = b""
        deadline = time.monotonic() + 2 * WAIT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(read_end, 64)
            if not chunk:
                break
            report += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read_end)
        watching.stop()
    assert report == b"thread applied"
    assert os.waitstatus_to_exitcode(status) == 0

"""``discovery:`` against a real DNS server (dnslib, started by the test) and real HTTP servers on three loopback
addresses: the routes follow the name's records, a failed lookup keeps the last good set."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from anorag_integrations import ConfigError, Router, call_info
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import FaultServer
from anorag_integrations.testing.dns_server import DnsServer

from .conftest import MODEL, USER

pytestmark = pytest.mark.allow_hosts(["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "::1"])

NAME = "vllm.fleet.test"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def free_port() -> int:
    """A port free on every test address (bound and released on each in turn)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
            port = int(probe.getsockname()[1])
        try:
            for host in HOSTS:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every test address")


@pytest.fixture(scope="module")
def pods() -> Iterator[tuple[int, dict[str, FaultServer]]]:
    """One server per test address, all on one port, each answering 'from <address>'."""
    port = free_port()
    servers = {host: FaultServer(MODEL, reply=f"from {host}", host=host, port=port) for host in HOSTS}
    for server in servers.values():
        server.start()
    try:
        yield port, servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def config(dns: DnsServer, port: int, **extra: Any) -> Any:
    entry = {"dns": NAME, "port": port, "model": MODEL, "interval": 0.05, "timeout": 0.5, "nameserver": dns.address}
    llm = {"discovery": {**entry, **extra.pop("entry", {})}, "params": {"max_retries": 1}, **extra}
    return config_from_dict({"llm": llm}, env={})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` (the router's own state) until it holds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def names(port: int, *hosts: str) -> set[str]:
    return {f"{NAME}@{host}:{port}" for host in hosts}


def test_the_router_starts_with_the_addresses_found_and_follows_them(
    pods: tuple[int, dict[str, FaultServer]], dns: DnsServer
) -> None:
    port, _ = pods
    dns.set(NAME, HOSTS[:2])
    with Router(config(dns, port), start_prober=False) as router:
        assert set(router.routes) == names(port, *HOSTS[:2])  # before the first request
        answers = {router.chat(USER).choices[0].message.content for _ in range(4)}
        assert answers == {f"from {host}" for host in HOSTS[:2]}
        dns.set(NAME, HOSTS[1:])
        wait_for(lambda: set(router.routes) == names(port, *HOSTS[1:]), "the new record set")
        served = {call_info(router.chat(USER)).route for _ in range(4)}  # type: ignore[union-attr]
        assert served == names(port, *HOSTS[1:])
        assert router.origins[f"{NAME}@{HOSTS[2]}:{port}"] == "discovery:0"


def test_a_failed_lookup_keeps_the_last_good_set_and_says_so_once(
    pods: tuple[int, dict[str, FaultServer]], dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = pods
    dns.set(NAME, HOSTS[:2])
    with caplog.at_level(logging.INFO, "anorag_integrations.router"), Router(config(dns, port)) as router:
        dns.fail("servfail")
        seen = dns.queries(NAME)
        wait_for(lambda: dns.queries(NAME) >= seen + 6, "several failed lookups")
        assert set(router.routes) == names(port, *HOSTS[:2])
        assert router.chat(USER).choices[0].message.content
        dns.fail(None)
        dns.set(NAME, HOSTS[:1])
        wait_for(lambda: set(router.routes) == names(port, HOSTS[0]), "the set after recovery")
    failures = [r for r in caplog.records if r.levelno == logging.WARNING and NAME in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]


def test_a_name_with_no_records_drains_its_routes_and_static_routes_keep_serving(
    pods: tuple[int, dict[str, FaultServer]], dns: DnsServer
) -> None:
    port, servers = pods
    dns.set(NAME, HOSTS[:1])
    static = {"fixed": {"base_url": servers[HOSTS[2]].base_url, "model": MODEL}}
    with Router(config(dns, port, routes=static), start_prober=False) as router:
        assert set(router.routes) == {"fixed", *names(port, HOSTS[0])}
        dns.remove(NAME)  # NXDOMAIN: the Service has no pods
        wait_for(lambda: set(router.routes) == {"fixed"}, "the routes of the vanished name to leave")
        answers = {router.chat(USER).choices[0].message.content for _ in range(3)}
        assert answers == {f"from {HOSTS[2]}"}


def test_a_router_whose_first_lookup_fails_starts_and_finds_its_routes_later(
    pods: tuple[int, dict[str, FaultServer]], dns: DnsServer
) -> None:
    port, _ = pods
    dns.fail("drop")
    with Router(config(dns, port, entry={"timeout": 0.2}), start_prober=False) as router:
        assert router.routes == {}
        dns.fail(None)
        dns.set(NAME, HOSTS[:1])
        wait_for(lambda: set(router.routes) == names(port, HOSTS[0]), "the first good lookup")
        assert router.chat(USER).choices[0].message.content == f"from {HOSTS[0]}"


def test_the_route_template_applies_to_every_route_found(
    pods: tuple[int, dict[str, FaultServer]], dns: DnsServer
) -> None:
    port, _ = pods
    dns.set(NAME, HOSTS[:2])
    entry = {"name": "pod", "route": {"timeout": 7, "continue_streams": True, "aliases": ["small"]}}
    with Router(config(dns, port, entry=entry), start_prober=False) as router:
        assert set(router.routes) == {f"pod@{host}:{port}" for host in HOSTS[:2]}
        assert all(r.timeout == 7 and r.continue_streams for r in router.routes.values())
        assert router.chat(USER, model="small").choices[0].message.content


@pytest.mark.parametrize(
    ("entry", "key", "message"),
    [
        ({"route": {"base_url": "http://x/v1"}}, "llm.discovery.0.route", "set by discovery"),
        ({"nameserver": "not-an-ip"}, "llm.discovery.0", "nameserver"),
        ({"port": 0}, "llm.discovery.0.port", "greater than or equal to 1"),
        ({"route": {"timeout": -1}}, "llm.discovery.0", "timeout"),
    ],
)
def test_a_bad_discovery_entry_names_its_key(entry: dict[str, Any], key: str, message: str) -> None:
    base = {"dns": NAME, "port": 8000, "model": MODEL}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"llm": {"discovery": {**base, **entry}}}, env={})
    assert key in str(err.value) and message in str(err.value)

"""``discovery:``: routes found in DNS (every A/AAAA record of a name, e.g. a Kubernetes headless Service).

One route per address, named ``<name>@<address>:<port>``, each made from ``route:`` (any route key but
``base_url`` and ``model``); ``router/members/discovery.py`` keeps them in step with the name's records.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..router.secrets import preview
from .sections import RouteConfig, _Section

PLACEHOLDER_URL = "http://192.0.2.1:1/v1"
"""The address a ``route:`` template is checked with (TEST-NET-1: never a server)."""


class DiscoveryConfig(_Section):
    """Find the routes serving ``model`` at ``port`` on every address ``dns`` resolves to, every ``interval`` s."""

    dns: str = Field(min_length=1, max_length=253, description="the name to resolve (all its A and AAAA records)")
    port: int = Field(ge=1, le=65535, description="the port the servers listen on")
    model: str = Field(min_length=1, description="the model the servers serve (the routes' model)")
    interval: float = Field(default=10.0, gt=0, allow_inf_nan=False, description="seconds between lookups")
    timeout: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False, description="seconds one lookup may take")
    nameserver: str | None = Field(
        default=None, description="host, host:port or [v6]:port of the DNS server; default: the system resolver"
    )
    scheme: Literal["http", "https"] = "http"
    path: str = Field(default="/v1", description="the API's path on each server")
    name: str | None = Field(default=None, min_length=1, description="what route names start with; default: dns")
    route: dict[str, Any] = Field(
        default_factory=dict,
        description="the other keys of every route found (kind, api_key, timeout, weight, continue_streams, ...)",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/' (got {preview(value)})")
        return value.rstrip("/")

    @field_validator("route")
    @classmethod
    def _check_template(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("base_url", "model"):
            if key in value:
                raise ValueError(f"route.{key}: set by discovery (the address found, and discovery's model)")
        return value

    @model_validator(mode="after")
    def _check_route(self) -> DiscoveryConfig:
        self.route_config(PLACEHOLDER_URL)  # the template's problems are reported with the config's
        self.nameservers()
        return self

    @property
    def prefix(self) -> str:
        """What the names of this entry's routes start with."""
        return self.name or self.dns

    def route_config(self, base_url: str) -> RouteConfig:
        """The route for one address found: the template with that ``base_url`` and this entry's model."""
        return RouteConfig.model_validate({**self.route, "base_url": base_url, "model": self.model})

    def nameservers(self) -> tuple[list[str] | None, int]:
        """(the nameserver's address, or None for the system resolver; its port)."""
        if self.nameserver is None:
            return None, 53
        host, port = self.nameserver.strip(), "53"
        if host.startswith("["):
            host, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else port
        elif host.count(":") == 1:
            host, port = host.split(":")
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            raise ValueError(
                f"nameserver: expected an IP address, ip:port or [v6]:port (got {preview(self.nameserver)})"
            ) from None
        if not 1 <= number <= 65535:
            raise ValueError(f"nameserver: bad port {number}")
        return [host], number


def route_name(prefix: str, address: str, port: int) -> str:
    """The route name of one address found: ``prefix@10.0.0.5:8000`` or ``prefix@[fd00::5]:8000``."""
    return f"{prefix}@{_host(address)}:{port}"


def base_url(entry: DiscoveryConfig, address: str) -> str:
    """The ``base_url`` of the server at ``address``."""
    return f"{entry.scheme}://{_host(address)}:{entry.port}{entry.path}"


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def discovery_list(value: Any) -> Any:
    """``discovery:`` as one mapping or a list of them: always a list."""
    if value is None:
        return []
    return [value] if isinstance(value, dict) else value

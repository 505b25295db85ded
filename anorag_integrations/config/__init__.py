"""Typed configuration: ``config.yaml`` (either layout the anorag docs use) plus env overrides.

Layouts accepted::

    llm:                          llm:
      provider: vllm_openai         provider: vllm_openai
      routes: {a: {...}}            vllm_openai:
      lb_policy: round_robin          routes: {a: {...}}
                                      lb_policy: round_robin

Environment: ``ANORAG_CONFIG`` (path), and ``VLLM_BASE_URL`` / ``VLLM_MODEL`` / ``VLLM_API_KEY``,
which override the default route (or define a single route when there is no file). Every problem is
reported in one ``ConfigError`` naming the file and the key path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ..router.balancing.policies import POLICIES
from ..router.errors import ConfigError
from ..router.secrets import clip, is_secret_key, preview, redact_repr_args, redact_url

DEFAULT_CONFIG_PATH = "config.yaml"
ENV_CONFIG_PATH = "ANORAG_CONFIG"
ENV_ROUTE_OVERRIDES = {"VLLM_BASE_URL": "base_url", "VLLM_MODEL": "model", "VLLM_API_KEY": "api_key"}
ENV_ONLY_ROUTE = "default"
"""Name of the single route built from ``VLLM_BASE_URL`` when there is no config file."""
OTHER_PROVIDER_SECTIONS = frozenset({"ollama", "multi_ollama", "openai"})
"""Sibling sections under ``llm:`` that belong to other providers; the router leaves them alone."""
ROUTER_KEYS = frozenset(
    {
        "routes",
        "default_route",
        "fallback_route",
        "default_embedding_route",
        "fallback_embedding_route",
        "embedding",
        "lb_policy",
        "params",
        "health",
        "fallback_to_ollama",
        "prefix_affinity",
        "prefix_aware",
        "least_queue",
        "hedge",
        "observability",
        "state",
    }
)
OLLAMA_FALLBACK_ROUTE = "ollama"
"""Name of the route ``fallback_to_ollama: true`` builds from the ``llm.ollama`` section."""
RouteKind = Literal["chat", "embedding"]
ROUTE_KINDS: tuple[RouteKind, ...] = ("chat", "embedding")
"""What a route serves: chat completions, or embeddings (``/v1/embeddings``, a vLLM ``--runner pooling``
server). A call only ever goes to routes of its own kind."""
MAX_ALIAS_EXPANSION = 100_000
"""Nodes YAML aliases may add to a config file; a "billion laughs" file of 500 bytes adds billions."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteConfig(_Section):
    """One endpoint serving one model: OpenAI-compatible (vLLM, llama.cpp, OpenAI) or Ollama's native API."""

    api: Literal["openai", "ollama"] = "openai"
    kind: RouteKind = Field(
        default="chat", description="what the route serves: chat completions or embeddings; calls use their own kind"
    )
    base_url: str
    model: str = Field(min_length=1)
    timeout: float | None = Field(default=None, gt=0, description="per-attempt seconds; default params.timeout")
    api_key: SecretStr = SecretStr("EMPTY")
    weight: float = Field(default=1.0, gt=0)
    max_model_len: int | None = Field(default=None, gt=0, description="context window when the server does not say")
    options: dict[str, Any] = Field(default_factory=dict, description="api: ollama — default options (num_ctx, ...)")
    keep_alive: str | float | None = Field(default=None, description="api: ollama — how long the model stays loaded")
    continue_streams: bool = Field(
        default=False,
        description="a stream cut on another route may continue here (vLLM's continue_final_message)",
    )

    def __repr_args__(self) -> Any:
        """Fields for repr: credentials in ``base_url`` are masked (the key is a ``SecretStr`` already)."""
        return redact_repr_args(super().__repr_args__())

    @model_validator(mode="after")
    def _ollama_only(self) -> RouteConfig:
        if self.api != "ollama" and (self.options or self.keep_alive is not None):
            raise ValueError("options and keep_alive apply to api: ollama routes only (vLLM extras go in extra_body)")
        if self.kind == "embedding" and self.continue_streams:
            raise ValueError("continue_streams applies to chat routes only (embeddings are not streamed)")
        return self

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {preview(value)} (expected e.g. http://127.0.0.1:8000/v1)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"bad port in URL {preview(value)}") from None
        return value.strip().rstrip("/")


class Params(_Section):
    """Request defaults and retry bounds."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    timeout: float = Field(default=60.0, gt=0, description="seconds per attempt (for streams: between chunks)")
    max_retries: int = Field(default=2, ge=0, description="extra full rounds over the routes after the first")
    deadline: float | None = Field(default=None, gt=0, description="total seconds for one request, all attempts")
    max_retry_after: float = Field(
        default=60.0, ge=0, allow_inf_nan=False, description="longest Retry-After honoured (the openai SDK's cap)"
    )


class HealthConfig(_Section):
    """Breaker thresholds and the active prober."""

    probe_interval: float = Field(default=0.0, ge=0, description="seconds between probes; 0 turns probing off")
    probe_timeout: float = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1, description="consecutive failures that open the breaker")
    cooldown: float = Field(default=10.0, ge=0, description="seconds an open breaker waits before a trial")


class PrefixAffinityConfig(_Section):
    """``lb_policy: prefix_affinity``: which prefix is hashed, how much imbalance is allowed."""

    prefix_chars: int = Field(default=2000, ge=1, description="leading characters of the conversation hashed")
    load_factor: float = Field(default=1.25, ge=1, description="no route above this times the average in flight")


class PrefixAwareConfig(_Section):
    """``lb_policy: prefix_aware``: what counts as a cached match, when load wins over it, the index's size."""

    match_threshold: float = Field(default=0.5, gt=0, le=1, description="share of the prompt a hit must match")
    balance_abs: float = Field(default=2.0, ge=0, description="a hit's route this much more loaded is skipped...")
    balance_rel: float = Field(default=1.5, ge=1, description="...when it is also this many times more loaded")
    block_chars: int = Field(default=64, ge=1, description="characters per hashed block")
    max_blocks: int = Field(default=65_536, ge=1, description="block hashes kept per route (hard memory cap)")
    scrape_metrics: bool = Field(default=True, description="read each server's /metrics (queue, KV, hit rate)")


class LeastQueueConfig(_Section):
    """``lb_policy: least_queue``: how often ``/metrics`` is read and how long a reading counts."""

    interval: float = Field(default=1.0, gt=0, description="seconds between scrapes of every route's /metrics")
    stale_after: float = Field(default=5.0, gt=0, description="older readings are ignored (in-flight counts used)")


class HedgeConfig(_Section):
    """Hedged non-streaming requests: a second copy to another route when the first is slow."""

    after_ms: float | None = Field(default=None, gt=0, description="send the copy after this many milliseconds")
    after: Literal["p50", "p90", "p95", "p99"] | None = Field(
        default=None, description="...or after this percentile of the first route's recent latency"
    )
    max_rate: float = Field(default=0.05, gt=0, le=1, description="at most this share of requests is hedged")
    min_samples: int = Field(default=20, ge=1, description="latencies a route needs before a percentile is used")

    @model_validator(mode="after")
    def _one_threshold(self) -> HedgeConfig:
        if (self.after_ms is None) == (self.after is None):
            raise ValueError("set exactly one of after_ms (a number) or after (p50, p90, p95 or p99)")
        return self


class EmbeddingConfig(_Section):
    """``Router.embed``: how inputs are split into requests, and what happens to inputs past the context window."""

    batch_size: int = Field(default=64, ge=1, description="inputs per /v1/embeddings request")
    max_concurrency: int = Field(default=4, ge=1, description="requests of one embed call in flight at once")
    truncate: bool = Field(
        default=False,
        description="true: the server cuts inputs to its max_model_len (vLLM's truncate_prompt_tokens); "
        "false: an input clearly over it is refused before anything is sent (InputTooLongError)",
    )
    chars_per_token: float = Field(
        default=8.0,
        gt=0,
        allow_inf_nan=False,
        description="most characters one token is assumed to cover when an input's length is estimated "
        "before sending (twice what English text averages, so only inputs clearly too long are refused)",
    )


class ObservabilityConfig(_Section):
    """Prometheus metrics and OpenTelemetry traces of the router (``router/telemetry/``)."""

    prometheus: bool = Field(
        default=False, description="export metrics in prometheus_client's global registry (Router.register_metrics)"
    )
    tracing: bool = Field(
        default=True, description="OpenTelemetry spans of calls and attempts, when a tracer provider is configured"
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="the `router` label of the metrics; default: the config file's name without extension",
    )


REDIS_SCHEMES = ("redis", "rediss", "unix")
"""URL schemes ``state.url`` accepts (``rediss``: TLS)."""


class StateConfig(_Section):
    """Where routers keep what they learn about the fleet: this process only, or Redis shared by replicas.

    See ``router/fleet/state.py``. A change one replica makes reaches the others within
    ``refresh_interval + 4 * timeout`` seconds at worst (milliseconds when pub/sub delivers it).
    """

    backend: Literal["local", "redis"] = Field(default="local", description="local: each process on its own")
    url: SecretStr | None = Field(
        default=None, description="redis://[:password@]host:6379/0 (rediss:// for TLS); never shown"
    )
    namespace: str = Field(
        default="anorag",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of every key: one per fleet of replicas sharing a config",
    )
    refresh_interval: float = Field(
        default=0.25,
        gt=0,
        le=10,
        allow_inf_nan=False,
        description="seconds between reads of the fleet's state (each costs the replica about 0.5 ms of CPU)",
    )
    timeout: float = Field(
        default=0.25, gt=0, le=10, allow_inf_nan=False, description="socket timeout of every Redis call (seconds)"
    )
    leader_ttl: float = Field(
        default=2.0, gt=0, allow_inf_nan=False, description="a dead prober leader is replaced within this many seconds"
    )
    load_ttl: float = Field(
        default=2.0, gt=0, allow_inf_nan=False, description="a crashed replica's in-flight counts expire after this"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value().strip())
        if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.scheme == "unix"):
            shown = preview(redact_url(value.get_secret_value()))
            raise ValueError(f"not a Redis URL: {shown} (expected redis://host:6379/0, rediss:// or unix://)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"bad port in Redis URL {preview(redact_url(value.get_secret_value()))}") from None
        return SecretStr(value.get_secret_value().strip())

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateConfig:
        if self.backend == "redis" and self.url is None:
            raise ValueError("backend: redis needs url: (redis://host:6379/0)")
        for key in ("leader_ttl", "load_ttl"):
            if getattr(self, key) <= 2 * self.refresh_interval:
                raise ValueError(f"{key} must be more than twice refresh_interval (it is renewed every refresh)")
        return self

    @property
    def staleness_bound_s(self) -> float:
        """Longest a change made by one replica takes to reach another while Redis is reachable."""
        return self.refresh_interval + 4 * self.timeout


class Config(_Section):
    """The router's whole configuration."""

    provider: str = "vllm_openai"
    routes: dict[str, RouteConfig] = Field(min_length=1)
    default_route: str | None = None
    fallback_route: str | None = None
    default_embedding_route: str | None = None
    fallback_embedding_route: str | None = None
    lb_policy: str = "round_robin"
    params: Params = Params()
    health: HealthConfig = HealthConfig()
    prefix_affinity: PrefixAffinityConfig = PrefixAffinityConfig()
    prefix_aware: PrefixAwareConfig = PrefixAwareConfig()
    least_queue: LeastQueueConfig = LeastQueueConfig()
    hedge: HedgeConfig | None = None
    embedding: EmbeddingConfig = EmbeddingConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    state: StateConfig = StateConfig()
    source: str = Field(default="<dict>", exclude=True, description="where this config was read from")

    @field_validator("lb_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown lb_policy {preview(value)}; choose one of {', '.join(sorted(POLICIES))}")
        return value

    @model_validator(mode="after")
    def _known_routes(self) -> Config:
        for kind, keys in _KIND_KEYS.items():
            for key in keys:
                name = getattr(self, key)
                if name is None:
                    continue
                if name not in self.routes:
                    raise ValueError(f"{key}: {preview(name)} is not among the routes ({clip(', '.join(self.routes))})")
                if self.routes[name].kind != kind:
                    raise ValueError(f"{key}: route {preview(name)} is of kind {self.routes[name].kind}, not {kind}")
            fallback = getattr(self, keys[1])
            if fallback is not None and len(self.route_names(kind)) == 1:
                raise ValueError(f"{keys[1]}: needs at least one other {kind} route to fall back from")
        return self

    def route_names(self, kind: str) -> list[str]:
        """The routes of ``kind`` ("chat" or "embedding"), in config order."""
        return [name for name, route in self.routes.items() if route.kind == kind]

    def default_route_of(self, kind: str) -> str | None:
        """The default route of ``kind``: the configured one, else the first of that kind (None: there is none)."""
        named = getattr(self, _KIND_KEYS[kind][0])
        return named if named is not None else next(iter(self.route_names(kind)), None)

    def fallback_route_of(self, kind: str) -> str | None:
        """The route of ``kind`` tried last (``fallback_route``, ``fallback_embedding_route``)."""
        name: str | None = getattr(self, _KIND_KEYS[kind][1])
        return name

    def policy_options(self) -> dict[str, Any]:
        """Keyword arguments for the ``lb_policy`` in use (its section, when it has one)."""
        if self.lb_policy == "prefix_affinity":
            return self.prefix_affinity.model_dump()
        if self.lb_policy == "prefix_aware":
            return {**self.prefix_aware.model_dump(), "stale_after": self.least_queue.stale_after}
        if self.lb_policy == "least_queue":
            return {"stale_after": self.least_queue.stale_after}
        return {}

    @property
    def default_route_name(self) -> str:
        """The default chat route (the first route when there is no chat route at all)."""
        return self.default_route_of("chat") or next(iter(self.routes))

    def with_api_key(self, api_key: str) -> Config:
        """A copy in which every route uses ``api_key``."""
        secret = SecretStr(api_key)
        routes = {name: route.model_copy(update={"api_key": secret}) for name, route in self.routes.items()}
        return self.model_copy(update={"routes": routes})


_KIND_KEYS = {
    "chat": ("default_route", "fallback_route"),
    "embedding": ("default_embedding_route", "fallback_embedding_route"),
}
"""Each route kind's (default, fallback) keys."""


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path``, else ``$ANORAG_CONFIG``, else ``./config.yaml``; apply env overrides; validate."""
    env = os.environ if env is None else env
    data, source = read_document(path, env=env)
    return config_from_dict(data, source=source, env=env)


def config_file(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Path:
    """The file a config is read from: ``path``, else ``$ANORAG_CONFIG``, else ``./config.yaml``."""
    env = os.environ if env is None else env
    return Path(path if path is not None else env.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)


def read_document(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> tuple[Any, str]:
    """The parsed config file and its name; with no file, a one-route document from ``VLLM_BASE_URL``."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get(ENV_CONFIG_PATH))
    file = config_file(path, env=env)
    if not file.is_file():
        if not explicit and env.get("VLLM_BASE_URL"):
            return {"llm": {"routes": {ENV_ONLY_ROUTE: {}}}}, "environment"
        how = "" if explicit else f"; pass a path, set ${ENV_CONFIG_PATH}, or set VLLM_BASE_URL and VLLM_MODEL"
        raise ConfigError(str(file), [("", f"config file not found{how}")])
    try:
        return _load_yaml(file.read_text(encoding="utf-8")), str(file)
    except _AliasBomb:
        raise ConfigError(
            str(file),
            [("", f"YAML aliases expand past {MAX_ALIAS_EXPANSION:,} extra values (or contain themselves)")],
        ) from None
    except RecursionError:
        raise ConfigError(str(file), [("", "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(str(file), [("", f"{where}not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    except OSError as exc:
        raise ConfigError(str(file), [("", f"cannot read: {exc.strerror or exc}")]) from None


class _AliasBomb(yaml.YAMLError):
    """The document's aliases expand past ``MAX_ALIAS_EXPANSION`` nodes (or refer to themselves)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand too far (PyYAML has no such limit)."""

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            sizes: dict[int, int] = {}
            if _expanded_size(node, sizes) > len(sizes) + MAX_ALIAS_EXPANSION:
                raise _AliasBomb()
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes under ``node`` with every alias written out; each distinct node is measured once."""
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:  # met again while being measured: the node contains itself
            raise _AliasBomb()
        return known
    sizes[id(node)] = -1
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    sizes[id(node)] = total
    return total


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded by ``MAX_ALIAS_EXPANSION``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def config_from_dict(data: object, *, source: str = "<dict>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed config document (the whole file, with its ``llm:`` key)."""
    env = os.environ if env is None else env
    section, prefix = _router_section(data, source)
    section = dict(section)
    if section.pop("fallback_to_ollama", False):
        _add_ollama_fallback(section, data, prefix, source)
    from_env = _apply_env(section, prefix, env)
    try:
        return Config.model_validate({**section, "source": source})
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err, prefix, from_env) for err in exc.errors()]) from None


def _router_section(data: object, source: str) -> tuple[dict[str, Any], str]:
    """Find the router's keys in either layout; return them and their key-path prefix."""
    if data is None:
        raise ConfigError(source, [("llm", "missing: the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    llm = data.get("llm")
    if not isinstance(llm, dict):
        got = "missing" if llm is None else f"expected a mapping, got {type(llm).__name__}"
        raise ConfigError(source, [("llm", got)])
    problems = [
        (
            f"llm.{clip(str(key))}",
            f"unknown key; expected one of {', '.join(sorted(ROUTER_KEYS | {'provider', 'vllm_openai'}))}",
        )
        for key in llm
        if key not in ROUTER_KEYS | OTHER_PROVIDER_SECTIONS | {"provider", "vllm_openai"}
    ]
    if "vllm_openai" in llm:
        nested = llm["vllm_openai"]
        if not isinstance(nested, dict):
            problems.append(("llm.vllm_openai", f"expected a mapping, got {type(nested).__name__}"))
        problems += [
            (f"llm.{clip(str(key))}", "with the llm.vllm_openai layout this key belongs under llm.vllm_openai")
            for key in llm
            if key in ROUTER_KEYS
        ]
        if problems:
            raise ConfigError(source, problems)
        section = {k: v for k, v in nested.items()}
        if "provider" in llm:
            section.setdefault("provider", llm["provider"])
        return section, "llm.vllm_openai"
    if problems:
        raise ConfigError(source, problems)
    return {k: v for k, v in llm.items() if k not in OTHER_PROVIDER_SECTIONS}, "llm"


def _add_ollama_fallback(section: dict[str, Any], data: Any, prefix: str, source: str) -> None:
    """``fallback_to_ollama: true``: the ``llm.ollama`` host becomes the route tried when no vLLM route is."""
    ollama = data["llm"].get("ollama")
    if not isinstance(ollama, dict) or not ollama.get("model"):
        raise ConfigError(
            source, [(f"{prefix}.fallback_to_ollama", "needs an llm.ollama section with at least model:")]
        )
    route = {"api": "ollama", "base_url": ollama.get("base_url", "http://localhost:11434"), "model": ollama["model"]}
    route.update({k: ollama[k] for k in ("options", "keep_alive", "timeout") if k in ollama})
    routes = section.get("routes")
    section["routes"] = {**(routes if isinstance(routes, dict) else {}), OLLAMA_FALLBACK_ROUTE: route}
    section.setdefault("fallback_route", OLLAMA_FALLBACK_ROUTE)


def _apply_env(section: dict[str, Any], prefix: str, env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Write VLLM_* overrides into the default (chat) route; return {key path: env var} for error messages."""
    overrides = {key: env[var] for var, key in ENV_ROUTE_OVERRIDES.items() if env.get(var)}
    routes = section.get("routes")
    if not overrides or not isinstance(routes, dict) or not routes:
        return {}
    name = section.get("default_route")
    if not isinstance(name, str) or name not in routes:
        chat = [n for n, r in routes.items() if not (isinstance(r, dict) and r.get("kind") == "embedding")]
        name = next(iter(chat or routes))
    route = routes[name]
    if route is None:
        route = {}
    if not isinstance(route, dict):
        return {}
    section["routes"] = {**routes, name: {**route, **overrides}}
    by_key = {key: var for var, key in ENV_ROUTE_OVERRIDES.items()}
    return {("routes", name, key): by_key[key] for key in overrides}


def _describe(err: Any, prefix: str, from_env: dict[tuple[str, ...], str]) -> tuple[str, str]:
    """One pydantic error as (key path, message); secrets are never echoed back."""
    loc = tuple(str(part) for part in err["loc"])
    message: str = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    kind = err["type"]
    if kind == "missing":
        message = "missing (required)"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "too_short" and loc == ("routes",):
        message = "no routes defined; add at least one under routes:"
    elif not any(is_secret_key(part) for part in loc) and not kind.startswith("value_error") and "input" in err:
        message = f"{message} (got {preview(err['input'])})"
    key = ".".join((prefix, *map(clip, loc))) if loc else prefix
    if loc[:3] in from_env:
        key += f" (from ${from_env[loc[:3]]})"
    # A model-level check (default_route, fallback_route) names its own key in the message.
    if not loc and ":" in message:
        field, _, message = message.partition(": ")
        key = f"{prefix}.{field}"
    return key, message

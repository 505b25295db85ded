"""The config's sections as pydantic models (a route, params, health, ...), each checked on its own.

Every section forbids unknown keys and is frozen; ``model.py`` puts them together into ``Config``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..router.secrets import preview, redact_repr_args, redact_url

RouteKind = Literal["chat", "embedding"]
ROUTE_KINDS: tuple[RouteKind, ...] = ("chat", "embedding")
"""What a route serves: chat completions, or embeddings (``/v1/embeddings``, a vLLM ``--runner pooling``
server). A call only ever goes to routes of its own kind."""


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
    aliases: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), description="other names callers may use for this model (the route sends `model` for them)"
    )
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
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="most attempts in flight on this route at once (unset: learned from its latency under load)",
    )
    send_priority: bool = Field(
        default=False,
        description="send each call's priority on as vLLM's `priority` (the server runs --scheduling-policy priority)",
    )
    propagate: tuple[Literal["traceparent", "baggage"], ...] = Field(
        default=("traceparent",),
        description="trace headers a traced attempt sends this route: traceparent (W3C trace context, with its "
        "tracestate) and baggage (the caller's OpenTelemetry baggage); [] sends none",
    )

    def __repr_args__(self) -> Any:
        """Fields for repr: credentials in ``base_url`` are masked (the key is a ``SecretStr`` already)."""
        return redact_repr_args(super().__repr_args__())

    @model_validator(mode="after")
    def _ollama_only(self) -> RouteConfig:
        if self.api != "ollama" and (self.options or self.keep_alive is not None):
            raise ValueError("options and keep_alive apply to api: ollama routes only (vLLM extras go in extra_body)")
        if self.model in self.aliases:
            raise ValueError(f"aliases: {preview(self.model)} is the route's model itself, not an alias")
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


class AdmissionConfig(_Section):
    """Overload control (``router/admission/``): each route kept near its useful concurrency, the rest queued."""

    enabled: bool = Field(default=True, description="false: every call is sent at once, as before admission control")
    initial_limit: int = Field(default=64, ge=1, description="attempts in flight per route before any is learnt")
    max_limit: int = Field(default=1024, ge=1, description="the most a learnt limit grows to")
    tolerance: float = Field(
        default=1.5,
        gt=1,
        allow_inf_nan=False,
        description="an attempt this many times slower than the route's unloaded latency (for as many tokens) "
        "means the route is queueing: its limit is lowered",
    )
    max_queue: int = Field(default=10_000, ge=0, description="calls waiting for a route at once; more are shed")
    queue_timeout: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="longest wait for a route (unset: the call's attempt timeout); the call's deadline also bounds it",
    )
    lifo_after: float = Field(
        default=0.5,
        ge=0,
        allow_inf_nan=False,
        description="once the oldest waiter has waited this long, the newest of a priority goes first (adaptive "
        "LIFO): under sustained overload answered calls stay fast and the hopeless ones are shed early",
    )

    @model_validator(mode="after")
    def _limits(self) -> AdmissionConfig:
        if self.initial_limit > self.max_limit:
            raise ValueError(f"initial_limit ({self.initial_limit}) is above max_limit ({self.max_limit})")
        return self


class RetryBudgetConfig(_Section):
    """Retries and failovers together at most ``ratio`` of calls plus ``min_per_s`` (Envoy's and Finagle's budget)."""

    ratio: float = Field(default=0.2, ge=0, le=10, allow_inf_nan=False, description="retries allowed per call started")
    min_per_s: float = Field(
        default=3.0, ge=0, allow_inf_nan=False, description="retries allowed per second however few calls start"
    )
    window: float = Field(default=10.0, gt=0, le=600, allow_inf_nan=False, description="seconds the counts cover")


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
    namespace: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of every key: replicas under one namespace share their state. Default: `anorag-` and "
        "a hash of the routes' names, URLs and models, so replicas of one config share and other apps do not",
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

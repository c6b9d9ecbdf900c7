"""Settings: environment variables (prefix `LLM_GATEWAY_`), an optional YAML file, and the
providers' standard variables (`OPENAI_API_KEY` + `OPENAI_BASE_URL`, `ANTHROPIC_API_KEY` +
`ANTHROPIC_BASE_URL`, `GROQ_API_KEY` + `GROQ_BASE_URL`, `OLLAMA_HOST`: each adapter declares its
own, see `providers.registry`).

Precedence, highest first: explicit overrides (CLI flags) > `LLM_GATEWAY_*` environment > YAML file
> defaults. Providers from the standard variables come first, then the YAML file's providers are
added after them; a YAML provider with the same name as an environment one replaces it. Invalid
settings raise `ConfigError` with one line per problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from .domain import Capability

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _default_data_dir(environ: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/llm-gateway`, else `~/.local/share/llm-gateway`."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "llm-gateway"


class ConfigError(Exception):
    """Settings are invalid; the message lists every problem, one per line, without secrets."""


class ProviderSettings(BaseModel):
    """One provider instance.

    `kind` selects the adapter ("openai" also covers any OpenAI-compatible server via
    `base_url`). `api_key` may be given directly or read from the environment variable named by
    `api_key_env`. `passthrough`: route models absent from the catalog here (default: true for
    an OpenAI-compatible server with a custom base_url, false otherwise). `http_client`: the HTTP
    transport under the official SDK client (openai, anthropic, groq), which serves the calls off
    the hot path (model lists, token counting): "aiohttp" (the SDKs' documented
    `DefaultAioHttpClient`) or "httpx" (the SDKs' default). Chat, streamed chat and embeddings
    always go on the provider's pooled aiohttp session (`providers.direct_http`), at most
    `max_connections` connections. Ollama's SDK has only httpx.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    passthrough: bool | None = None
    max_connections: int = Field(default=200, ge=1, le=10_000)
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-63 chars of lower-case letters, digits, '-' or '_'")
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from .providers.registry import specs  # noqa: PLC0415 - the kinds are the adapters' declarations

        if value not in specs():
            raise ValueError(f"unknown provider kind {value!r}; known: {', '.join(specs())}")
        return value

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def resolved_api_key(self, environ: Mapping[str, str]) -> str | None:
        """The key from `api_key`, else from the variable named by `api_key_env`; None if neither."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return environ.get(self.api_key_env) or None
        return None


class PricingSettings(BaseModel):
    """Prices in USD per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_million_usd: float = Field(ge=0)
    output_per_million_usd: float = Field(ge=0)
    cached_input_per_million_usd: float = Field(default=0.0, ge=0)
    source: str = "configuration"


class ModelSettings(BaseModel):
    """A model entry that extends or overrides the built-in catalog (same `id` replaces it)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    provider: str
    provider_model: str | None = None
    display_name: str = ""
    capabilities: list[Capability] = Field(default_factory=lambda: [Capability.CHAT, Capability.STREAMING])
    context_window: int = Field(default=0, ge=0)
    max_output_tokens: int = Field(default=0, ge=0)
    pricing: PricingSettings | None = None
    equivalence_group: str = ""


class DeploymentSettings(BaseModel):
    """One deployment of an alias: a provider and its model, with routing weight/priority and
    optional per-deployment limits (requests and tokens per minute)."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    model: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    priority: int = Field(default=0, ge=0)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class AliasSettings(BaseModel):
    """A model name clients ask for, served by one or more deployments.

    `strategy`: how deployments are ordered; `fallback_models`: models tried after every
    deployment failed (default: the catalog's equivalents of the first deployment's model).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    deployments: list[DeploymentSettings] = Field(min_length=1)
    strategy: Literal["priority", "weighted", "least_latency", "lowest_cost", "least_busy"] = "priority"
    fallback_models: list[str] = Field(default_factory=list)


class RetrySettings(BaseModel):
    """Retries of retryable failures (429, 5xx, 529, timeouts, connection errors) per deployment:
    exponential backoff with full jitter, `retry-after` honoured up to `max_retry_after_s` (a longer
    one moves on to the next deployment), never past the caller's deadline."""

    model_config = ConfigDict(extra="forbid")

    # Attempts per deployment, the first included: 3 = two retries, as the official SDKs default to.
    max_attempts: int = Field(default=3, ge=1, le=10)
    base_delay_s: float = Field(default=0.25, ge=0, le=60)
    max_delay_s: float = Field(default=4.0, ge=0, le=300)
    max_retry_after_s: float = Field(default=20.0, ge=0, le=600)


class BreakerSettings(BaseModel):
    """Circuit breaker per deployment: opens after `consecutive_failures`, or when at least
    `min_calls` calls in the last `window_s` seconds failed at `failure_rate` or more; half-opens after
    `cooldown_s` and lets `half_open_max_calls` trial calls through; closes on a trial success."""

    model_config = ConfigDict(extra="forbid")

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    window_s: float = Field(default=60.0, gt=0)
    min_calls: int = Field(default=10, ge=1)
    cooldown_s: float = Field(default=30.0, gt=0)
    half_open_max_calls: int = Field(default=1, ge=1)


class KeyBudgetSettings(BaseModel):
    """A configured key's budget: `limit_usd` USD per `period` (UTC calendar periods, or "total"
    for a lifetime budget)."""

    model_config = ConfigDict(extra="forbid")

    limit_usd: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    period: Literal["daily", "weekly", "monthly", "total"] = "monthly"


class ApiKeySettings(BaseModel):
    """A gateway API key, stored only as the SHA-256 of the key (`llm-gateway hash-key` prints it).

    `allowed_models`: glob patterns of model names the key may use (at least one; "*": every
    model). `rpm` / `tpm` / `max_concurrent_streams`: this key's limits (default:
    `rate_limits.default_*`).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    owner: str = ""
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    allowed_models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent_streams: int | None = Field(default=None, ge=1)
    expires_at: datetime | None = None
    disabled: bool = False
    budget: KeyBudgetSettings | None = None


class AuthSettings(BaseModel):
    """Gateway authentication. With no keys the server only binds loopback unless `disabled`."""

    model_config = ConfigDict(extra="forbid")

    disabled: bool = False
    keys: list[ApiKeySettings] = Field(default_factory=list)


class RateLimitSettings(BaseModel):
    """Limits per API key (or per client address without auth), in fixed one-minute windows.

    `default_*` apply to keys without their own values and to unauthenticated clients (None: no
    limit). `output_tokens_reserve`: tokens reserved for the answer when a request sets no
    `max_output_tokens` (reconciled with real usage afterwards). `fail_open`: when the state backend
    (Redis) is unreachable, let calls through (logged and counted) instead of refusing them.
    """

    model_config = ConfigDict(extra="forbid")

    default_rpm: int | None = Field(default=None, ge=1)
    default_tpm: int | None = Field(default=None, ge=1)
    default_max_concurrent_streams: int | None = Field(default=None, ge=1)
    output_tokens_reserve: int = Field(default=1024, ge=0)
    fail_open: bool = True


class CacheSettings(BaseModel):
    """Exact-match response cache for Chat, ChatStream and Embed, scoped per key owner."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    ttl_s: int = Field(default=300, ge=1, le=30 * 24 * 3600)
    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)


class AdminSettings(BaseModel):
    """The admin API (`llm_gateway.admin.v1.AdminService`).

    `enabled`: serve it. `port`: None serves it on the gRPC port; a number serves it on its own
    port (0 picks a free one) on `host`. `key_sha256`: SHA-256 hex digests of admin credentials
    (`llm-gateway hash-key` prints one), beside `admin_key` (`LLM_GATEWAY_ADMIN_KEY`).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    port: int | None = Field(default=None, ge=0, le=65535)
    key_sha256: list[str] = Field(default_factory=list)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        for digest in value:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("each entry must be 64 lower-case hex characters (SHA-256)")
        return value


class StoreSettings(BaseModel):
    """The control plane's database (store/).

    `timeout_s`: bound on one database operation, seconds (the key cache, the ledger writer and
    admin calls never wait longer). `pool_size`: connections per process (PostgreSQL).
    """

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=2.0, gt=0, le=60)
    pool_size: int = Field(default=5, ge=1, le=100)


class KeyCacheSettings(BaseModel):
    """The in-process cache of key records (tenancy/key_cache.py).

    `ttl_s`: a cached key is re-read from the database after this long, seconds (without Redis,
    the bound on how long a revocation takes to reach every replica). `stale_s`: with the
    database unreachable, cached keys keep working this long past their TTL, seconds.
    `negative_ttl_s`: an unknown secret is remembered as unknown this long, seconds.
    `max_entries`: cached keys and unknown secrets per process.
    """

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(default=10.0, gt=0, le=3600)
    stale_s: float = Field(default=300.0, ge=0, le=86_400)
    negative_ttl_s: float = Field(default=2.0, ge=0, le=3600)
    max_entries: int = Field(default=100_000, ge=1, le=10_000_000)


class LedgerSettings(BaseModel):
    """The usage ledger's batching writer (tenancy/ledger.py).

    `flush_interval_s`: records are written at least this often, seconds. `batch_size`: and as
    soon as this many wait. `max_buffered`: records held while the database is down; more are
    dropped, counted and logged. `drain_timeout_s`: how long the drain waits for the last flush.
    """

    model_config = ConfigDict(extra="forbid")

    flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    max_buffered: int = Field(default=100_000, ge=1, le=10_000_000)
    drain_timeout_s: float = Field(default=5.0, ge=0, le=300)


class BudgetSettings(BaseModel):
    """Budgets of keys and teams.

    `unpriced_models`: a call to a model without catalog prices under a budget is allowed with
    a warning (its cost counts as 0) or refused. The output tokens reserved before a call come
    from `rate_limits.output_tokens_reserve` when the request sets no `max_output_tokens`.
    """

    model_config = ConfigDict(extra="forbid")

    unpriced_models: Literal["allow", "refuse"] = "allow"


class TlsSettings(BaseModel):
    """Transport security of the gRPC port (transport/tls.py).

    `cert_file` + `key_file`: PEM server certificate (chain, leaf first) and its unencrypted
    private key; both set turn TLS on (minimum TLS 1.2, gRPC core's floor). `client_ca_file`: PEM
    CA bundle that client certificates must chain to; set, it turns on mTLS (a client certificate
    is required). The files are re-read without a restart on SIGHUP and when their modification
    times change (checked when a connection arrives). `allow_plaintext`: serve without TLS on a
    non-loopback address (refused otherwise; loopback always may).
    """

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    allow_plaintext: bool = False


class TracingSettings(BaseModel):
    """OpenTelemetry traces (telemetry/tracing.py; the `otel` extra installs the packages): one
    SERVER span per RPC with the GenAI attributes, exported over OTLP/gRPC. Off by default.
    `otlp_endpoint`: the collector, e.g. "http://127.0.0.1:4317" (None: the exporter's default or
    `OTEL_EXPORTER_OTLP_ENDPOINT`); `service_name`: the `service.name` resource attribute."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    otlp_endpoint: str | None = None
    service_name: str = Field(default="llm-gateway", min_length=1, max_length=256)


class Settings(BaseSettings):
    """Gateway settings. Every field can be set as `LLM_GATEWAY_<FIELD>` or in the YAML file.

    Attributes:
        host: bind address (default loopback only).
        port: gRPC port (0 picks a free one).
        default_deadline_s: bound for upstream calls when the client sets no deadline, seconds.
        max_message_bytes: largest request/response message, bytes.
        grace_period_s: SIGTERM drain time before in-flight calls are cancelled, seconds.
        prestop_delay_s: after SIGTERM (health already NOT_SERVING), how long new calls are still
            accepted before the drain starts, seconds: the time load balancers and Kubernetes
            endpoints take to stop sending traffic (`LLM_GATEWAY_PRESTOP_DELAY_S`).
        max_connection_age_s / max_connection_age_grace_s: a client connection is asked to go
            away (GOAWAY) after this age, seconds, and closed after the grace; calls in flight
            continue on it meanwhile. Clients reconnect and so spread over new replicas.
        keepalive_time_s / keepalive_timeout_s: the server pings an idle connection this often and
            closes it when a ping goes unanswered this long, seconds.
        keepalive_min_time_s: clients may ping at most this often (more often: GOAWAY
            "too_many_pings"), seconds.
        reflection: serve gRPC server reflection (v1 and v1alpha); false hides the contract from
            clients that did not get it otherwise.
        log_level: debug, info, warning or error.
        log_content: include prompt/response text in logs (off by default).
        providers: provider instances (added to those from the standard variables).
        models: catalog additions/overrides.
        models_list_ttl_s: how long a provider's live model list is cached, seconds.
        aliases: model names served by several deployments (see AliasSettings).
        retry: retry policy (see RetrySettings).
        breaker: circuit breaker policy (see BreakerSettings).
        attempt_timeout_s: bound on one attempt until its answer (unary) or its first stream event,
            seconds; a slower deployment counts as failed and the next one is tried.
        stream_idle_timeout_s: longest wait between two stream events once streaming, seconds.
        stream_coalescing: merge the deltas already waiting when the next stream message is
            written (fewer gRPC messages under bursts, no added latency; transport/coalesce.py).
        fallback_to_equivalents: fall back to the catalog's equivalent models by default.
        auth, rate_limits, cache: interceptor settings (see their classes).
        redis_url: Redis for shared cache and limits (also read from `REDIS_URL`); None: in memory.
        redis_timeout_s: socket connect/read bound for Redis calls, seconds.
        metrics_port: Prometheus HTTP port (0: disabled); metrics_host: its bind address.
        log_file: also write the JSON log lines to this file.
        event_loop: "uvloop" (default when installed; cheaper per call, bench/NOTES.md) or
            "asyncio".
        tls: certificate, key and client CA files, and `allow_plaintext` (see TlsSettings).
        tracing: OpenTelemetry traces, off by default (see TracingSettings).
        database_url: the control plane's database (`LLM_GATEWAY_DATABASE_URL`):
            `postgresql://…` or `postgresql+asyncpg://…` for PostgreSQL, `sqlite:///path` for a
            SQLite file; None: SQLite at `data_dir/gateway.db`.
        data_dir: where the default SQLite database lives (created on first start).
        admin_key: the admin API credential (`LLM_GATEWAY_ADMIN_KEY`; never logged).
        admin, store, key_cache, ledger, budgets: the control plane (see their classes).
        reuse_port: bind with SO_REUSEPORT (set by `serve --workers` in each worker through
            `LLM_GATEWAY_REUSE_PORT=1`; off otherwise, so a second gateway on a busy port fails).
    """

    model_config = SettingsConfigDict(env_prefix="LLM_GATEWAY_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    default_deadline_s: float = Field(default=300.0, gt=0, le=3600)
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    grace_period_s: float = Field(default=10.0, ge=0, le=600)
    prestop_delay_s: float = Field(default=0.0, ge=0, le=300)
    max_connection_age_s: float = Field(default=600.0, gt=0, le=86_400)
    max_connection_age_grace_s: float = Field(default=300.0, ge=0, le=86_400)
    keepalive_time_s: float = Field(default=60.0, gt=0, le=86_400)
    keepalive_timeout_s: float = Field(default=20.0, gt=0, le=3600)
    keepalive_min_time_s: float = Field(default=10.0, gt=0, le=3600)
    reflection: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_content: bool = False
    providers: list[ProviderSettings] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    models_list_ttl_s: float = Field(default=300.0, ge=0)
    aliases: list[AliasSettings] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    attempt_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    stream_coalescing: bool = True
    fallback_to_equivalents: bool = True
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    redis_url: str | None = None
    redis_timeout_s: float = Field(default=0.25, gt=0, le=30)
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_file: str | None = None
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    reuse_port: bool = False
    tls: TlsSettings = Field(default_factory=TlsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    database_url: str | None = None
    data_dir: Path = Field(default_factory=lambda: _default_data_dir(os.environ))
    admin_key: SecretStr | None = None
    admin: AdminSettings = Field(default_factory=AdminSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    key_cache: KeyCacheSettings = Field(default_factory=KeyCacheSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(postgresql(\+asyncpg)?|postgres|sqlite(\+aiosqlite)?)://", value):
            raise ValueError("must be a postgresql://, postgresql+asyncpg:// or sqlite:/// URL")
        return value

    @model_validator(mode="after")
    def _unique_provider_names(self) -> Settings:
        names = [p.name for p in self.providers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"provider names must be unique; repeated: {', '.join(duplicates)}")
        return self


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        lines.append(f"{source}: {where}: {item['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Loads and validates settings.

    Args:
        config_file: optional YAML file (a mapping of Settings fields).
        environ: environment to read (default: `os.environ`).
        overrides: highest-precedence values, e.g. `{"port": 50052}` from the CLI.
    Raises:
        ConfigError: unreadable file, invalid YAML, or invalid values (one line per problem).
    """
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{config_file}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: invalid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: the top level must be a mapping of settings")
        file_values = loaded or {}

    class _Environment(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            return parse_env_vars(env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    class _FromSources(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                init_settings,
                _Environment(settings_cls),
                InitSettingsSource(settings_cls, init_kwargs=file_values),
            )

    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        loaded_settings = _FromSources(**explicit)
    except ValidationError as exc:
        raise ConfigError(_format_errors(str(config_file or "settings"), exc)) from None
    settings = Settings.model_construct(**dict(loaded_settings))
    if settings.redis_url is None and env.get("REDIS_URL"):
        settings.redis_url = env["REDIS_URL"]
    from .providers.registry import environment_providers  # noqa: PLC0415 - providers import this module

    configured = {p.name for p in settings.providers}
    discovered = [p for p in environment_providers(env) if p.name not in configured]
    settings.providers = discovered + settings.providers
    return settings

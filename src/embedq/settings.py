"""Typed settings with one precedence: CLI flag > environment (EMBEDQ_*) > database > default.

Bootstrap settings (how to reach the database, the secret key) come only from flags and the
environment: they are needed before the database can be read.

    >>> s = Settings.load(cli={"worker_concurrency": 4})
    >>> s.worker_concurrency
    4
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from embedq.errors import ConfigurationError

ENV_PREFIX = "EMBEDQ_"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

Source = Literal["cli", "env", "database", "default"]
_db_values: ContextVar[dict[str, Any] | None] = ContextVar("embedq_db_settings", default=None)


def _bootstrap(**kw: Any) -> Any:
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra["bootstrap"] = True
    return Field(json_schema_extra=extra, **kw)


def _secret(**kw: Any) -> Any:
    return Field(json_schema_extra={"secret": True}, **kw)


class _DatabaseValues(PydanticBaseSettingsSource):
    """Values from the `settings` table, ranked below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    """Every knob embedq reads, typed and documented. See docs/settings.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, populate_by_name=True
    )
    _sources: dict[str, Source] = PrivateAttr(default_factory=dict)

    # --- bootstrap: flags and environment only -------------------------------------------
    database_url: SecretStr | None = _bootstrap(
        default=None,
        validation_alias=AliasChoices("database_url", "EMBEDQ_DATABASE_URL", "DATABASE_URL"),
        description="PostgreSQL URL (also read from DATABASE_URL). Unset: an embedded "
        "PostgreSQL with pgvector runs in data_dir.",
    )
    data_dir: Path = _bootstrap(
        default_factory=lambda: Path(platformdirs.user_data_dir("embedq")),
        description="Where the embedded PostgreSQL keeps its data when no database_url is set.",
    )
    db_schema: str = _bootstrap(
        default="embedq",
        validation_alias=AliasChoices("db_schema", "EMBEDQ_SCHEMA", "EMBEDQ_DB_SCHEMA"),
        description="PostgreSQL schema that holds all of embedq's tables (env: EMBEDQ_SCHEMA).",
    )
    secret_key: SecretStr | None = _bootstrap(
        default=None,
        description="Fernet key that encrypts secret settings stored in the database. "
        "Generate one with `embedq settings gen-key`.",
    )
    app: str | None = _bootstrap(
        default=None,
        description="Import path of your App ('package.module:app') whose tasks workers run.",
    )
    connect_timeout_s: float = _bootstrap(
        default=5.0, gt=0, le=300, description="Seconds to wait for a database connection."
    )
    auto_migrate: bool = _bootstrap(
        default=True, description="Apply pending migrations when a worker starts."
    )

    # --- service (`embedq serve`): read at start -----------------------------------------
    api_host: str = _bootstrap(
        default="127.0.0.1",
        description="Address `embedq serve` listens on ('0.0.0.0' in containers).",
    )
    api_port: int = _bootstrap(default=8000, ge=1, le=65_535, description="Port of the API.")
    api_auth: bool = _bootstrap(
        default=True,
        description="Require a bearer token on every route but the health checks. Turn off "
        "only behind a proxy that authenticates.",
    )
    admin_token: SecretStr | None = _bootstrap(
        default=None,
        json_schema_extra={"secret": True},
        description="A token ('eq_' + 32 or more url-safe characters) that `embedq serve` "
        "makes sure exists with the admin scope: for automated deployments. Unset: the first "
        "start creates one and prints it once.",
    )
    api_cors_origins: list[str] | None = _bootstrap(
        default=None,
        description="Origins allowed to call the API from a browser, comma-separated; unset: "
        "CORS off (the dashboard is served from the API's own origin and needs none).",
    )

    # --- worker --------------------------------------------------------------------------
    worker_concurrency: int = Field(
        default=10, ge=1, le=10_000, description="Jobs one worker runs at once."
    )
    worker_queues: list[str] | None = Field(
        default=None, description="Queues a worker claims from, comma-separated; unset: all."
    )
    claim_batch_size: int = Field(
        default=100, ge=1, le=10_000, description="Most jobs claimed in one round trip."
    )
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=3600, description="Fallback poll when no notification arrives."
    )
    lease_s: float = Field(
        default=30.0, ge=2, le=86_400, description="How long a claim holds without a heartbeat."
    )
    heartbeat_s: float = Field(
        default=5.0, gt=0, le=3600, description="How often a worker renews its leases."
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="On SIGTERM, how long running jobs may finish before they are released.",
    )
    statement_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Server-side limit on one queue statement."
    )

    # --- retries -------------------------------------------------------------------------
    retry_max_attempts: int = Field(
        default=5, ge=1, le=1000, description="Default attempts per job (first run included)."
    )
    retry_base_s: float = Field(
        default=1.0, gt=0, le=86_400, description="First retry delay; doubles each attempt."
    )
    retry_cap_s: float = Field(
        default=600.0, gt=0, le=7 * 86_400, description="Longest delay between attempts."
    )
    job_timeout_s: float | None = Field(
        default=None, gt=0, description="Default per-job time limit; unset: none."
    )

    # --- history -------------------------------------------------------------------------
    finished_jobs: Literal["archive", "delete"] = Field(
        default="archive",
        description="Finished jobs move to the archive table, or are deleted at once.",
    )
    archive_retention_days: float = Field(
        default=7.0, ge=0, description="Archived succeeded/cancelled jobs older than this go."
    )
    dead_retention_days: float = Field(
        default=30.0, ge=0, description="Dead jobs older than this are removed by cleanup."
    )
    job_events: Literal["all", "failures"] = Field(
        default="failures",
        description="Audit log rows: 'failures' stores retries, failures, reclaims, dead and "
        "cancels (the happy path is read off each job's timestamps); 'all' also stores "
        "enqueued/started/succeeded, at about twice the write cost per job.",
    )
    event_retention_days: float = Field(
        default=30.0, ge=0, description="Job events older than this are removed by cleanup."
    )

    # --- logging -------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")

    # --- providers (used by the embedding pipeline) --------------------------------------
    embedding_provider: Literal["local", "ollama", "openai", "fake"] = Field(
        default="local",
        description="Provider of new collections when `collection create` names none: "
        "'local' (offline all-MiniLM-L6-v2), 'ollama', 'openai' (or any OpenAI-compatible "
        "server), 'fake' (hashing, for tests).",
    )
    embedding_model: str | None = Field(
        default=None,
        description="Model of new collections when none is named; unset: the provider's "
        "default (all-MiniLM-L6-v2, nomic-embed-text, text-embedding-3-small).",
    )
    ollama_url: str = Field(
        default="http://localhost:11434", description="Base URL of the Ollama server."
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        description="Base URL of the OpenAI API, or of any OpenAI-compatible server "
        "(vLLM, TEI, LM Studio, DeepSeek).",
    )
    openai_api_key: SecretStr | None = _secret(
        default=None, description="API key for the OpenAI provider (stored encrypted)."
    )
    provider_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Time limit of one embedding request."
    )
    provider_concurrency: int = Field(
        default=4, ge=1, le=256, description="Embedding requests in flight per worker process."
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Consecutive transient failures of one endpoint that open its circuit "
        "breaker (workers stop sending it work until the cool-down ends).",
    )
    breaker_cooldown_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="How long an open circuit stays open before one half-open probe.",
    )
    local_device: str = Field(
        default="cpu", description="Torch device of the local model ('cpu', 'cuda', 'mps')."
    )

    # --- embedding pipeline --------------------------------------------------------------
    embed_batch_size: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Embed jobs (documents) a worker claims and embeds together.",
    )
    embed_concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Embed batches one worker process works on at once.",
    )
    embed_max_attempts: int = Field(
        default=8, ge=1, le=1000, description="Attempts of an embed job before it is dead."
    )
    max_document_chars: int = Field(
        default=2_000_000,
        ge=1,
        le=100_000_000,
        description="Longest document text accepted, in characters; longer writes are refused.",
    )
    hnsw_m: int = Field(
        default=16,
        ge=2,
        le=100,
        description="HNSW links per node of new vector indexes (pgvector `m`).",
    )
    hnsw_ef_construction: int = Field(
        default=64,
        ge=4,
        le=1000,
        description="HNSW candidate list while building new vector indexes (pgvector "
        "`ef_construction`): lower inserts faster, higher finds neighbours better.",
    )
    search_ef: int = Field(
        default=200,
        ge=10,
        le=1000,
        description="HNSW candidate list size at query time (pgvector hnsw.ef_search): "
        "higher finds more of the true nearest chunks, slower.",
    )
    bm25_compaction_s: float = Field(
        default=5.0,
        ge=0,
        le=86_400,
        description="How often a worker merges the keyword-search postings that writes "
        "appended into sorted segments (searches read fewer postings after); 0 turns it off "
        "(search stays exact, only slower; `embedq collection compact` still runs it).",
    )

    # --- webhooks ----------------------------------------------------------------------
    webhook_max_attempts: int = Field(
        default=15,
        ge=1,
        le=1000,
        description="Attempts of a webhook delivery before it is dead; with the default "
        "retry delays, 15 ride out a receiver that is down for about half an hour to an hour.",
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Time limit of one webhook delivery (connect, send, answer).",
    )

    # --- service limits ----------------------------------------------------------------
    serve_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Workers `embedq serve` runs in its own process (0: none; scale with "
        "`embedq worker` processes instead).",
    )
    api_max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest request body the API accepts (file uploads aside); larger: 413.",
    )
    api_max_upload_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024,
        le=10 * 1024**3,
        description="Largest file upload the API accepts; larger: 413.",
    )
    api_rate_limit_per_s: float = Field(
        default=100.0,
        ge=0,
        le=1_000_000,
        description="Requests per second one token may make on average (0: no limit); "
        "over it: 429 with Retry-After.",
    )
    api_rate_burst: int = Field(
        default=200, ge=1, le=1_000_000, description="Requests one token may make at once."
    )
    api_wait_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest `?wait=true` a write may ask for (its `timeout=` is capped here).",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be at most half of lease_s "
                f"({self.lease_s:g}), or healthy workers would lose their jobs; lower "
                "EMBEDQ_HEARTBEAT_S or raise EMBEDQ_LEASE_S"
            )
        return self

    @field_validator("db_schema")
    @classmethod
    def _valid_schema(cls, v: str) -> str:
        if not _IDENTIFIER.match(v):
            raise ValueError("must be a lower-case SQL identifier such as 'embedq'")
        return v

    @field_validator("worker_queues", "api_cors_origins", mode="before")
    @classmethod
    def _split_queues(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [q.strip() for q in v.split(",") if q.strip()]
            return v or None
        return v

    @field_validator("worker_queues")
    @classmethod
    def _valid_queues(cls, v: list[str] | None) -> list[str] | None:
        for q in v or []:
            if not re.match(r"^[A-Za-z0-9_.:-]{1,100}$", q):
                raise ValueError(f"queue name {q!r} may use letters, digits, '_', '.', ':', '-'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _DatabaseValues(settings_cls, _db_values.get() or {}))

    # ---------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, cli: dict[str, Any] | None = None, database: dict[str, Any] | None = None
    ) -> Settings:
        """Build settings from flags (`cli`), the environment and stored `database` values.

        Raises ConfigurationError naming the setting when a value is invalid.
        """
        cli = {k: v for k, v in (cli or {}).items() if v is not None}
        database = {k: v for k, v in (database or {}).items() if k in cls.model_fields}
        token = _db_values.set(database)
        try:
            settings = cls(**cli)
        except ValidationError as exc:
            raise ConfigurationError(describe_validation_error(exc, cli, database)) from None
        finally:
            _db_values.reset(token)
        settings._sources = {name: _source_of(name, cli, database) for name in cls.model_fields}
        return settings

    def source(self, name: str) -> Source:
        """Where the value of setting `name` came from."""
        return self._sources.get(name, "default")


def env_names(name: str) -> list[str]:
    """The environment variables that set field `name`."""
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [a for a in alias.choices if isinstance(a, str) and a.isupper()]
    return [ENV_PREFIX + name.upper()]


def _source_of(name: str, cli: dict[str, Any], database: dict[str, Any]) -> Source:
    if name in cli:
        return "cli"
    if any(n in os.environ for n in env_names(name)):
        return "env"
    if name in database:
        return "database"
    return "default"


def is_bootstrap(name: str) -> bool:
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("bootstrap"))


def is_secret(name: str) -> bool:
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("secret"))


def describe_validation_error(
    exc: ValidationError, cli: dict[str, Any], database: dict[str, Any]
) -> str:
    """One line per invalid setting, naming where its bad value came from and how to set it."""
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings: its message names them and the fix
            lines.append(f"invalid settings: {err['msg'].removeprefix('Value error, ')}")
            continue
        name = str(err["loc"][0])
        if name not in Settings.model_fields:
            name = next((f for f in Settings.model_fields if name in (env_names(f) or [])), name)
        where = _source_of(name, cli, database) if name in Settings.model_fields else "input"
        env = env_names(name)[0] if name in Settings.model_fields else ENV_PREFIX + name.upper()
        hint = {
            "cli": "fix the command-line flag",
            "env": f"fix or unset the environment variable {env}",
            "database": f"run `embedq settings set {name} VALUE` or `embedq settings unset {name}`",
            "default": f"set {env}",
        }[where]
        lines.append(f"invalid setting {name!r} (from {where}): {err['msg']}; {hint}")
    return "\n".join(lines)

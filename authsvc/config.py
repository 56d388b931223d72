"""Settings: one frozen object read from ``AUTHSVC_*`` environment variables.

Nothing here is read at import time; the CLI builds one ``Settings`` and hands
it to the composition root. The README's settings table lists every field.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob authsvc has. Durations are in seconds."""

    model_config = SettingsConfigDict(env_prefix="AUTHSVC_", frozen=True, extra="ignore")

    # Network
    listen: str = "127.0.0.1:50051"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    reflection: bool = True
    metrics_listen: str = ""
    shutdown_grace: float = Field(default=10.0, ge=0)

    # Storage
    data_dir: Path = Path(".authsvc")
    database_url: SecretStr | None = None
    database_pool_size: int = Field(default=10, ge=1)
    database_pgbouncer: bool = False
    redis_url: SecretStr | None = None

    # Keys and tokens
    secret_key: SecretStr | None = None
    issuer: str = "authsvc"
    audience: str = "authsvc"
    access_token_ttl: int = Field(default=900, ge=1)
    session_ttl: int = Field(default=30 * 24 * 3600, ge=1)
    refresh_reuse_grace: float = Field(default=10.0, ge=0)
    refresh_reuse_grace_count: int = Field(default=20, ge=0)
    key_reload_interval: float = Field(default=60.0, gt=0)
    key_retire_margin: float = Field(default=120.0, ge=0)
    auth_cache_size: int = Field(default=100_000, ge=0)
    auth_cache_ttl: float = Field(default=60.0, ge=0)
    revocation_max_lag: float = Field(default=2.0, gt=0)
    revocation_heartbeat: float = Field(default=5.0, gt=0)

    # Passwords
    password_min_length: int = Field(default=8, ge=1)
    password_max_length: int = Field(default=256, ge=8, le=4096)
    argon2_memory_kib: int = Field(default=19456, ge=8)
    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_parallelism: int = Field(default=1, ge=1)
    hash_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    # Accounts and callers
    signup_enabled: bool = True
    api_keys: str = ""
    signin_attempts_per_email: int = Field(default=10, ge=0)
    signin_attempts_per_ip: int = Field(default=100, ge=0)
    rate_limit_window: int = Field(default=60, ge=1)

    # Logging
    log_format: str = "auto"
    log_level: str = "info"

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in {"auto", "json", "console"}:
            raise ValueError("must be auto, json or console")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "AUTHSVC_TLS_CLIENT_CA_FILE (mutual TLS) needs AUTHSVC_TLS_CERT_FILE "
                "and AUTHSVC_TLS_KEY_FILE"
            )
        return self

    @property
    def uses_postgres(self) -> bool:
        return self.database_url is not None

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or the embedded SQLite file."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite+aiosqlite:///{(self.data_dir / 'authsvc.db').resolve()}"


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); port 0 is any free port.

    Raises:
        ValueError: not host:port with a port from 0 to 65535.
    """
    parts = urlsplit("//" + value)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname
    bad = parts.path or parts.query or parts.username is not None or value != value.strip()
    if port is None or not host or bad:
        raise ValueError("must be host:port (127.0.0.1:9464, [::1]:9464), port 0 to 65535")
    return host, port

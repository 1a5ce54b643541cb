"""One settings model for every command.

Sources, in rising precedence: a TOML file (`--config`), `PORTAO_*` environment
variables, then command-line flags. Secrets may come from files
(`jwt_secret_file`); their values never appear in `repr`, logs or `config show`.
Every limit has a finite default (DESIGN.md §4); a bad value raises `ConfigError`
naming the setting.
"""

from __future__ import annotations

import resource
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from portao.errors import ConfigError

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Every setting of gateway, worker and client, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="PORTAO_", extra="forbid", validate_default=True, frozen=True
    )

    # where
    listen: list[str] = Field(default_factory=list)
    broker: str | None = None
    state: str | None = None
    prefix: str = Field("portao", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    admin: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # auth
    jwt_secret: SecretStr | None = None
    jwt_secret_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"

    # connection limits
    max_frame_bytes: int = Field(65536, ge=64, le=64 * MIB)
    auth_timeout_s: float = Field(10.0, gt=0)
    idle_timeout_s: float = Field(0.0, ge=0)
    call_timeout_s: float = Field(30.0, gt=0)
    rate_limit_per_s: float = Field(1000.0, gt=0)
    rate_burst: int = Field(2000, ge=1)
    max_pending_calls: int = Field(1000, ge=1)
    max_connections: int = Field(0, ge=0)  # 0: open-file limit - 256
    outbound_buffer_bytes: int = Field(MIB, ge=1024)
    drain_timeout_s: float = Field(10.0, ge=0)

    # workers and queues
    max_attempts: int = Field(3, ge=1)
    retry_delay_s: float = Field(0.2, ge=0)
    visibility_timeout_s: float = Field(5.0, gt=0)
    handler_timeout_s: float = Field(25.0, gt=0)
    worker_concurrency: int = Field(100, ge=1)
    max_queue_length: int = Field(100_000, ge=1)

    # presence
    presence_ttl_s: float = Field(15.0, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)

    # logs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_s >= self.presence_ttl_s:
            raise ValueError("heartbeat_s must be shorter than presence_ttl_s")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def effective_max_connections(self) -> int:
        """The connection cap: the setting, or the open-file limit less 256."""
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(1, soft - 256)

    def jwt_key(self) -> str | None:
        """The key that verifies tokens: the shared secret, or the public key file."""
        if self.jwt_algorithm == "HS256":
            if self.jwt_secret is not None:
                return self.jwt_secret.get_secret_value()
            if self.jwt_secret_file is not None:
                return self.jwt_secret_file.read_text().strip()
            return None
        if self.jwt_public_key_file is None:
            return None
        return self.jwt_public_key_file.read_text()

    def public_dict(self) -> dict[str, Any]:
        """The effective settings with secrets masked (for `config show`)."""
        out = self.model_dump(mode="json")
        if self.jwt_secret is not None:
            out["jwt_secret"] = "**********"
        return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a TOML file, the environment and explicit overrides.

    Overrides whose value is None are ignored, so unset CLI flags fall through.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        file_values = data.get("portao", data)
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    try:
        # Environment beats the file; flags beat both. Only fields present in the
        # environment are taken from it, so file values survive where env is silent.
        from_env = Settings().model_dump(exclude_unset=True)
        merged = {**file_values, **from_env, **given}
        return Settings(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid setting " + "; ".join(parts)

"""One settings model for every command.

Sources, in rising precedence: a TOML file (`--config`), `PORTAO_*` environment
variables, then command-line flags. They are merged first and validated once, so a
rule that spans settings (`heartbeat_s` < `presence_ttl_s`) sees the final values.
Secrets may come from files (`jwt_secret_file`); their values, and passwords in
broker URLs, never appear in `repr`, logs or `config show`. Every limit has a finite
default (DESIGN.md §4); a bad value raises `ConfigError` naming the setting and
where the value came from.
"""

from __future__ import annotations

import difflib
import os
import resource
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from portao.errors import ConfigError

MIB = 1024 * 1024
ENV_PREFIX = "PORTAO_"
MASK = "**********"
#: Settings that hold URLs which may carry a password.
_URL_FIELDS = ("broker", "state")
#: `--admin off` (or "") turns the admin listener off, even where it is on by default.
ADMIN_OFF = ("off", "")
#: HS256 keys shorter than the hash output are refused (RFC 7518 §3.2).
MIN_SECRET_BYTES = 32

#: Listeners of `portao run` and `portao gateway` when `listen` is empty.
RUN_LISTEN = ["tcp://127.0.0.1:7878", "ws://127.0.0.1:7879"]
GATEWAY_LISTEN = ["tcp://0.0.0.0:7878"]
#: The admin listener of `portao run` when `admin` is unset (elsewhere: off).
RUN_ADMIN = "127.0.0.1:7880"


class Settings(BaseSettings):
    """Every setting of gateway, worker and client, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # where
    listen: list[str] = Field(
        default_factory=list,
        description="Listener URLs (repeatable; tcp://, tcp+len://, ws://, tls://, …). "
        "Environment: a JSON list.",
    )
    broker: str | None = Field(
        None, description="Broker URL: redis://, rediss://, amqp://, amqps://."
    )
    state: str | None = Field(
        None, description="State store URL (redis://) for room members and once-keys with amqp://."
    )
    prefix: str = Field(
        "portao",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Namespace of every key, stream, channel, queue and exchange.",
    )
    admin: str | None = Field(
        None,
        description="Admin HTTP listener HOST:PORT (/metrics, /healthz, /readyz, chat page); "
        "'off' disables it.",
    )
    processes: int = Field(
        1, ge=1, le=256, description="Gateway processes sharing the listen ports (SO_REUSEPORT)."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate for the TLS listeners.")
    tls_key: Path | None = Field(None, description="PEM private key for the TLS listeners.")
    ws_origins: list[str] = Field(
        default_factory=list,
        description="WebSocket Origin allowlist; empty allows any (tokens authenticate).",
    )
    ws_compression: bool = Field(
        default=False,
        description="permessage-deflate for WebSocket (costs tens of KiB per connection).",
    )

    # auth
    jwt_secret: SecretStr | None = Field(
        None, description="HS256 shared secret (environment or file only, never a flag)."
    )
    jwt_secret_file: Path | None = Field(None, description="File holding the HS256 secret.")
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key for RS256/ES256 tokens."
    )
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = Field(
        "HS256", description="Token signature algorithm."
    )

    # connection limits
    max_frame_bytes: int = Field(
        65536, ge=64, le=64 * MIB, description="Largest client message (JSON payload bytes)."
    )
    auth_timeout_s: float = Field(
        10.0, gt=0, description="A connection must authenticate within this."
    )
    idle_timeout_s: float = Field(
        0.0, ge=0, description="Close connections silent this long (0: off)."
    )
    call_timeout_s: float = Field(
        30.0, gt=0, description="A call with no answer by then gets `timeout`."
    )
    rate_limit_per_s: float = Field(
        1000.0, gt=0, description="Token bucket refill per connection (messages/s)."
    )
    rate_burst: int = Field(default=2000, ge=1, description="Token bucket size per connection.")
    max_pending_calls: int = Field(
        default=1000, ge=1, description="Calls in flight per connection."
    )
    max_connections: int = Field(
        0, ge=0, description="Connections per process (0: open-file limit - 256)."
    )
    outbound_buffer_bytes: int = Field(
        MIB, ge=1024, description="Unsent bytes per connection before `slow_consumer`."
    )
    drain_timeout_s: float = Field(
        10.0, ge=0, description="Graceful shutdown: how long calls in flight may finish."
    )

    # workers and queues
    max_attempts: int = Field(
        default=3, ge=1, description="Handler attempts before the dead-letter queue."
    )
    retry_delay_s: float = Field(
        default=0.2, ge=0, description="First retry delay (doubles each time)."
    )
    visibility_timeout_s: float = Field(
        5.0, gt=0, description="A dead worker's message moves on after this."
    )
    handler_timeout_s: float = Field(
        default=25.0, gt=0, description="Longest run of one handler attempt."
    )
    worker_concurrency: int = Field(
        default=100, ge=1, description="Handlers one worker runs at once."
    )
    max_queue_length: int = Field(
        100_000, ge=1, description="Backlog per route before `overloaded`."
    )

    # presence
    presence_ttl_s: float = Field(
        15.0, gt=0, description="A dead gateway's inbox, users and rooms vanish after this."
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="Gateway liveness refresh period (< presence_ttl_s)."
    )

    # logs
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged."
    )
    log_format: Literal["console", "json"] = Field(
        "console", description="console (readable) or json (one object per line)."
    )

    @field_validator("admin")
    @classmethod
    def _check_admin(cls, value: str | None) -> str | None:
        if value is not None and value not in ADMIN_OFF:
            parse_host_port(value)
        return value

    @field_validator("broker", "state")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                urlsplit(value).port  # noqa: B018  (parsing the port is the check)
            except ValueError as exc:  # the message quotes no part of the URL
                raise ValueError(f"malformed URL: {exc}") from None
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_secret_length(value.get_secret_value(), "the HS256 secret")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_s >= self.presence_ttl_s:
            raise ValueError("heartbeat_s must be shorter than presence_ttl_s")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.jwt_secret is not None and self.jwt_secret_file is not None:
            raise ValueError("jwt_secret and jwt_secret_file: set one, not both")
        for name in ("jwt_secret_file", "jwt_public_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {str(path)!r} is not a readable file")
        if self.jwt_secret_file is not None:
            secret = _read_secret(self.jwt_secret_file)
            _check_secret_length(secret, f"jwt_secret_file: the secret in {self.jwt_secret_file}")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name in _URL_FIELDS and value else value)

    @property
    def effective_max_connections(self) -> int:
        """The connection cap: the setting, or the open-file limit less 256."""
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(1, soft - 256)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """(host, port) of the admin listener, or None when it is off."""
        if self.admin is None or self.admin in ADMIN_OFF:
            return None
        return parse_host_port(self.admin)

    def jwt_key(self) -> str | None:
        """The key that verifies tokens: the shared secret, or the public key file."""
        if self.jwt_algorithm == "HS256":
            if self.jwt_secret is not None:
                return self.jwt_secret.get_secret_value()
            if self.jwt_secret_file is not None:
                return _read_secret(self.jwt_secret_file)
            return None
        if self.jwt_public_key_file is None:
            return None
        return self.jwt_public_key_file.read_text()

    def public_dict(self) -> dict[str, Any]:
        """The effective settings with secrets and URL passwords masked (`config show`)."""
        out = self.model_dump(mode="json")
        for name, value in out.items():
            if isinstance(getattr(self, name), SecretStr):
                out[name] = MASK
            elif name in _URL_FIELDS and value:
                out[name] = mask_url(value)
        return out


def _read_secret(path: Path) -> str:
    return path.read_text().strip()


def _check_secret_length(secret: str, what: str) -> None:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{what} must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2); "
            "make one with `openssl rand -hex 32`"
        )


#: Settings by role; each command offers the flags of the roles it plays.
_SERVES = frozenset({"admin", "log_level", "log_format"})
_BROKER = frozenset({
    "broker", "state", "prefix", "max_queue_length", "max_attempts", "visibility_timeout_s",
    "presence_ttl_s",
})  # fmt: skip
_AUTH = frozenset({"jwt_secret", "jwt_secret_file", "jwt_public_key_file", "jwt_algorithm"})
_GATEWAY = _AUTH | {
    "listen", "processes", "tls_cert", "tls_key", "ws_origins", "ws_compression",
    "max_frame_bytes", "auth_timeout_s", "idle_timeout_s", "call_timeout_s", "rate_limit_per_s",
    "rate_burst", "max_pending_calls", "max_connections", "outbound_buffer_bytes",
    "drain_timeout_s", "heartbeat_s",
}  # fmt: skip
_WORKER = frozenset({
    "max_attempts", "retry_delay_s", "visibility_timeout_s", "handler_timeout_s",
    "worker_concurrency", "drain_timeout_s",
})  # fmt: skip
#: The settings each command reads (its flags, less those never offered as flags).
#: `run` is gateway and worker on the memory broker: no broker URLs, one process.
COMMAND_SETTINGS: dict[str, frozenset[str]] = {
    "run": (_SERVES | _GATEWAY | _WORKER | _BROKER) - {"broker", "state", "prefix", "processes"},
    "gateway": _SERVES | _GATEWAY | _BROKER,
    "worker": _SERVES | _WORKER | _BROKER,
    "token": frozenset({"jwt_secret", "jwt_secret_file", "jwt_algorithm"}),
}
#: Where a command's default differs from the model's (unset `listen`, `admin`).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"listen": RUN_LISTEN, "admin": RUN_ADMIN},
    "gateway": {"listen": GATEWAY_LISTEN, "admin": "off"},
    "worker": {"admin": "off"},
}


def for_command(settings: Settings, command: str) -> Settings:
    """The settings `command` runs with: its own defaults where a setting is unset."""
    unset = {
        name: list(value) if isinstance(value, list) else value
        for name, value in COMMAND_DEFAULTS.get(command, {}).items()
        if getattr(settings, name) in (None, [])
    }
    return settings.model_copy(update=unset) if unset else settings


def describe_os_error(exc: OSError) -> str:
    """Why a socket call failed, as an error message says it ("connection refused")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno is not None and exc.errno > 0:
        text = os.strerror(exc.errno)
    else:  # getaddrinfo's errors (negative numbers), or no number at all
        text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def parse_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) into (host, port); `ValueError` says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:7880), got {value!r}")
    return host, int(port)


def mask_url(url: str) -> str:
    """The URL with its password replaced by the mask.

    Plain text work, no URL parser: a malformed URL (`[::1`, a `/` in the password)
    is masked too. Everything from the first `:` after the user to the last `@` is
    the password.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:{MASK}@{host}"


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + field.upper()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a TOML file, the environment and explicit overrides (flags).

    Overrides whose value is None are ignored, so unset CLI flags fall through.
    """
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if config_file is not None:
        for key, value in _read_file(config_file).items():
            merged[key] = value
            sources[key] = f"config file {config_file}"
    try:
        from_env = EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigError(_env_parse_error(exc)) from None
    for key, value in from_env.items():
        merged[key] = value
        sources[key] = f"environment {env_name(key)}"
    for key, value in overrides.items():
        if value is not None and value != ():
            merged[key] = value
            sources[key] = f"flag --{key.replace('_', '-')}"
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None


def _read_file(config_file: Path) -> dict[str, Any]:
    """The settings table of a TOML file (`[portao]`, or the top level: not both)."""
    try:
        data = tomllib.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {config_file}: {exc}") from None
    table = data.get("portao", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {config_file}: [portao] must be a table")
    outside = sorted(key for key in data if key != "portao")
    if table is not data and outside:
        raise ConfigError(
            f"config file {config_file}: settings both in [portao] and at the top level "
            f"({', '.join(outside)}); keep them in one place"
        )
    return {key.replace("-", "_"): value for key, value in table.items()}


def _env_parse_error(exc: SettingsError) -> str:
    for name in Settings.model_fields:
        if f'"{name}"' in str(exc):
            return f"invalid setting {name} (from environment {env_name(name)}): not valid JSON"
    return f"invalid environment: {exc}"


def _describe(exc: ValidationError, sources: dict[str, str]) -> str:
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, Settings.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            parts.append(f"unknown setting {name!r} (from {sources.get(name, '?')}){hint}")
        elif name:
            where = sources.get(name, "its default")
            parts.append(f"invalid setting {name} (from {where}): {message}")
        else:
            parts.append(f"invalid settings: {message}")
    return "; ".join(parts)

"""The `portao` command line.

Every setting of `portao.config.Settings` is also a flag (`--max-frame-bytes`),
generated from the model so the two never drift; flags beat `PORTAO_*`
environment variables, which beat the `--config` TOML file.
"""

from __future__ import annotations

import json
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import uvloop
from pydantic import SecretStr

from portao.bench.cli import bench
from portao.config import Settings, env_name, load_settings
from portao.errors import ConfigError, PortaoError
from portao.logs import setup_logging

F = typing.TypeVar("F", bound=Callable[..., Any])

#: Settings that are not offered as flags on a command line (visible in `ps`).
_NOT_FLAGS = {"jwt_secret"}


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a settings field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return str, True
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if args and origin is not None:
        return _click_type(args[0])
    if annotation in (int, float, str):
        return annotation, False
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation is SecretStr:
        return str, False
    return str, False


def settings_options(func: F) -> F:
    """Add `--config` and one flag per setting to a command."""
    for name, field in reversed(list(Settings.model_fields.items())):
        if name in _NOT_FLAGS:
            continue
        kind, multiple = _click_type(field.annotation)
        func = click.option(
            "--" + name.replace("_", "-"),
            name,
            type=kind,
            multiple=multiple,
            default=None,
            help=f"{field.description} (default {field.get_default(call_default_factory=True)!r})",
        )(func)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="TOML settings file.",
    )(func)


def _settings(config_file: Path | None, flags: dict[str, Any], **fixed: Any) -> Settings:
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    values = {k: v for k, v in values.items() if v not in (None, [])}
    values.update({k: v for k, v in fixed.items() if v is not None})
    try:
        return load_settings(config_file, **values)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _run(coro: Any) -> Any:
    try:
        return uvloop.run(coro)
    except PortaoError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="portao")
def main() -> None:
    """portao: a connection gateway in front of a message broker."""


@main.command()
@click.argument("app", default="portao.demo:app")
@settings_options
def run(app: str, config_file: Path | None, **flags: Any) -> None:
    """Gateway and workers in one process on the memory broker (development)."""
    from portao.runtime import RUN_ADMIN, raise_open_file_limit, serve_embedded
    from portao.session.auth import generate_secret, mint_token
    from portao.worker.app import load_app

    raise_open_file_limit()
    settings = _settings(config_file, flags, broker="memory://")
    admin_required = settings.admin is not None  # the default address may be busy
    if settings.admin is None:
        settings = settings.model_copy(update={"admin": RUN_ADMIN})
    generated = None
    if settings.jwt_key() is None:
        generated = generate_secret()
        settings = settings.model_copy(update={"jwt_secret": SecretStr(generated)})
    setup_logging(settings)
    application = load_app(app)

    def banner(gateway: Any, admin: Any) -> None:
        addrs = ", ".join(f"{s.url}" for s in gateway.specs)
        click.echo(f"portao run: app {app} listening on {addrs}", err=True)
        page = None
        if admin is not None:
            host = settings.admin_address[0] if settings.admin_address else "127.0.0.1"
            page = f"http://{host}:{admin.port}/"
            click.echo(f"admin (chat page, /metrics, /healthz, /readyz): {page}", err=True)
        if generated is not None:
            token = mint_token(generated, "alice", rooms=["*"], ttl_s=86400, now=time.time())
            click.echo("development secret (generated; shown only here):", err=True)
            click.echo(f"PORTAO_JWT_SECRET={generated}")
            click.echo(
                "a token for user 'alice' (mint more in another terminal with "
                "PORTAO_JWT_SECRET=… portao token --sub NAME):",
                err=True,
            )
            click.echo(token)
            if page is not None:
                click.echo("the chat page as alice:", err=True)
                click.echo(f"{page}?token={token}")
        sys.stdout.flush()

    _run(serve_embedded(settings, application, admin_required=admin_required, on_ready=banner))


@main.command()
@settings_options
def gateway(config_file: Path | None, **flags: Any) -> None:
    """A gateway process on a real broker (--broker redis://… or amqp://…).

    With --processes N, a parent runs N gateway processes sharing the ports.
    """
    from portao.runtime import raise_open_file_limit, serve_gateway

    settings = _settings(config_file, flags)
    setup_logging(settings)
    if settings.processes > 1:
        from portao.supervisor import Supervisor

        try:
            supervisor = Supervisor(settings)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        sys.exit(_run(supervisor.run()))
    raise_open_file_limit()
    _run(serve_gateway(settings))


@main.command()
@click.argument("app", default="portao.demo:app")
@settings_options
def worker(app: str, config_file: Path | None, **flags: Any) -> None:
    """A worker process running APP's handlers (--broker required)."""
    from portao.runtime import serve_worker
    from portao.worker.app import load_app

    settings = _settings(config_file, flags)
    setup_logging(settings)
    _run(serve_worker(settings, load_app(app)))


@main.command()
@click.option("--sub", "sub", required=True, help="User id (the token's `sub`).")
@click.option("--rooms", default=None, help="Comma-separated room patterns (`*` wildcard).")
@click.option("--ttl", "ttl_s", type=float, default=3600.0, show_default=True)
@click.option(
    "--private-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key for RS256/ES256.",
)
@settings_options
def token(
    sub: str,
    rooms: str | None,
    ttl_s: float,
    private_key: Path | None,
    config_file: Path | None,
    **flags: Any,
) -> None:
    """Mint a token; it is the last line of output."""
    from portao.session.auth import mint_token

    settings = _settings(config_file, flags)
    if settings.jwt_algorithm == "HS256":
        key = settings.jwt_key()
        if key is None:
            raise click.UsageError("set PORTAO_JWT_SECRET (or --jwt-secret-file) to mint a token")
    else:
        if private_key is None:
            raise click.UsageError(f"--private-key is required for {settings.jwt_algorithm}")
        key = private_key.read_text()
    room_list = [r.strip() for r in rooms.split(",") if r.strip()] if rooms else None
    try:
        minted = mint_token(
            key, sub, rooms=room_list, ttl_s=ttl_s, algorithm=settings.jwt_algorithm,
            now=time.time(),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(minted)


@main.command()
@click.argument("url", default="tcp://127.0.0.1:7878")
@click.option("--token", "token_", envvar="PORTAO_TOKEN", help="JWT (or PORTAO_TOKEN).")
def client(url: str, token_: str | None) -> None:
    """Interactive client: type `call ROUTE JSON`, `send ROUTE JSON`, `sub ROOM`…"""
    from portao.client import connect, run_interactive

    async def main_() -> None:
        conn = await connect(url, token=token_)
        try:
            await run_interactive(conn, sys.stdin, sys.stdout)
        finally:
            await conn.aclose()

    _run(main_())


@main.group()
def config() -> None:
    """Inspect the effective settings."""


@config.command("show")
@settings_options
def config_show(config_file: Path | None, **flags: Any) -> None:
    """Print the effective settings as JSON, secrets masked."""
    settings = _settings(config_file, flags)
    click.echo(json.dumps(settings.public_dict(), indent=2, sort_keys=True))


@config.command("reference")
def config_reference() -> None:
    """Print the Markdown table of every setting (docs/configuration.md holds it)."""
    click.echo(settings_reference())


def settings_reference() -> str:
    """Every setting as a Markdown table row: name, flag, environment, default, meaning."""
    rows = [
        "| setting | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        flag = "—" if name in _NOT_FLAGS else f"`--{name.replace('_', '-')}`"
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None or default == [] else f"`{default}`"
        rows.append(
            f"| `{name}` | {flag} | `{env_name(name)}` | {shown} | {field.description} |"
        )
    return "\n".join(rows)


main.add_command(bench)

if __name__ == "__main__":  # pragma: no cover
    main()

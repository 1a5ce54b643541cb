"""The `portao` command line.

Every setting of `portao.config.Settings` is also a flag (`--max-frame-bytes`),
generated from the model so the two never drift; each command offers the flags of
the settings it reads (`COMMAND_SETTINGS`). Flags beat `PORTAO_*` environment
variables, which beat the `--config` TOML file.
"""

from __future__ import annotations

import json
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import uvloop
from pydantic import SecretStr

from portao.bench.cli import bench
from portao.config import (
    COMMAND_DEFAULTS,
    COMMAND_SETTINGS,
    Settings,
    describe_os_error,
    env_name,
    for_command,
    load_settings,
)
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
    if origin is typing.Literal:  # `--log-level DEBUG` is `debug`
        return click.Choice([str(a) for a in args], case_sensitive=False), False
    if args and origin is not None:
        return _click_type(args[0])
    if annotation in (int, float, str, bool):
        return annotation, False
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation is SecretStr:
        return str, False
    return str, False


def settings_options(command: str | None = None) -> Callable[[F], F]:
    """Add `--config` and a flag per setting `command` reads (no command: every setting)."""
    names = COMMAND_SETTINGS[command] if command else set(Settings.model_fields)
    defaults = COMMAND_DEFAULTS.get(command or "", {})

    def decorate(func: F) -> F:
        for name, field in reversed(list(Settings.model_fields.items())):
            if name in names and name not in _NOT_FLAGS:
                default = defaults.get(name, field.get_default(call_default_factory=True))
                func = _setting_option(name, field.annotation, field.description, default)(func)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="TOML settings file.",
        )(func)

    return decorate


def _setting_option(
    name: str, annotation: Any, description: str | None, default: Any
) -> Callable[[F], F]:
    """The flag of one setting; unset (None) unless given, so lower sources show through."""
    flag = "--" + name.replace("_", "-")
    kind, multiple = _click_type(annotation)
    shown = _shown_default(default)
    help_text = f"{description} [default: {shown}]" if shown else description
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    # Choices as the model spells them (click would show them case-folded).
    metavar = f"[{'|'.join(kind.choices)}]" if isinstance(kind, click.Choice) else None
    return click.option(
        flag, name, type=kind, multiple=multiple, default=None, help=help_text, metavar=metavar
    )


def _shown_default(default: Any) -> str:
    """A default as `--help` shows it; "" for none."""
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ", ".join(map(str, default))
    return str(default)


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


def _load_app(path: str) -> Any:
    """The App at `module:attr`; a path that names no app is a usage error."""
    from portao.worker.app import load_app

    try:
        return load_app(path)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.version_option(package_name="portao")
def main() -> None:
    """portao: a connection gateway in front of a message broker."""


@main.command()
@click.argument("app", default="portao.demo:app")
@settings_options("run")
def run(app: str, config_file: Path | None, **flags: Any) -> None:
    """Gateway and workers in one process on the memory broker (development).

    APP is `module:attr`, looked up from the current directory too.
    """
    from portao.runtime import raise_open_file_limit, serve_embedded, websocket_url
    from portao.session.auth import generate_secret, mint_token

    raise_open_file_limit()
    given = _settings(config_file, flags, broker="memory://")
    admin_required = given.admin is not None  # the default address may be busy
    settings = for_command(given, "run")
    generated = None
    if settings.jwt_key() is None:
        generated = generate_secret()
        settings = settings.model_copy(update={"jwt_secret": SecretStr(generated)})
    setup_logging(settings)
    application = _load_app(app)

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
            ws = websocket_url(gateway)
            if page is not None and ws is None:
                click.echo(
                    "no chat page link: the page needs a ws:// listener "
                    "(add --listen ws://127.0.0.1:7879/)",
                    err=True,
                )
            elif page is not None:
                click.echo("the chat page as alice:", err=True)
                click.echo(f"{page}?token={token}&ws={quote(ws or '', safe=':/[]')}")
        sys.stdout.flush()

    _run(serve_embedded(settings, application, admin_required=admin_required, on_ready=banner))


@main.command()
@settings_options("gateway")
def gateway(config_file: Path | None, **flags: Any) -> None:
    """A gateway process on a real broker (--broker redis://… or amqp://…).

    With --processes N, a parent runs N gateway processes sharing the ports.
    """
    from portao.runtime import raise_open_file_limit, serve_gateway

    settings = for_command(_settings(config_file, flags), "gateway")
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
@settings_options("worker")
def worker(app: str, config_file: Path | None, **flags: Any) -> None:
    """A worker process running APP's handlers (--broker required).

    APP is `module:attr`, looked up from the current directory too.
    """
    from portao.runtime import serve_worker

    settings = for_command(_settings(config_file, flags), "worker")
    setup_logging(settings)
    application = _load_app(app)
    _run(serve_worker(settings, application))


@main.command()
@click.option("--sub", "sub", required=True, help="User id (the token's `sub`).")
@click.option("--rooms", default=None, help="Comma-separated room patterns (`*` wildcard).")
@click.option(
    "--ttl", "ttl_s", type=float, default=3600.0, show_default=True, metavar="SECONDS",
    help="Lifetime in seconds (the token's `exp`).",
)
@click.option(
    "--private-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key for RS256/ES256.",
)
@settings_options("token")
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


#: Where `portao client` dials without a URL: `portao run`'s TCP listener.
CLIENT_URL = "tcp://127.0.0.1:7878"
_NO_TOKEN_HINT = (
    "no token: the gateway answers only `auth` and `ping`, and closes the connection "
    "unless you authenticate within its auth_timeout_s (10 s by default). Mint a token "
    "with `PORTAO_JWT_SECRET=… portao token --sub NAME` and pass it with --token or "
    "PORTAO_TOKEN, or type `auth TOKEN` now."
)


@main.command()
@click.argument("url", default=CLIENT_URL)
@click.option("--token", "token_", envvar="PORTAO_TOKEN", help="JWT (or PORTAO_TOKEN).")
def client(url: str, token_: str | None) -> None:
    """Interactive client of the gateway at URL (default tcp://127.0.0.1:7878).

    Reads commands, one a line: `call ROUTE JSON`, `send ROUTE JSON`, `sub ROOM`…
    (`help` lists them); prints answers and pushes as JSON lines. Exit status 1
    when the gateway closed the connection.
    """
    from portao.client import connect, run_interactive

    async def main_() -> int:
        try:
            conn = await connect(url, token=token_)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(
                f"cannot connect to {url}: {describe_os_error(exc)}"
            ) from None
        try:
            if conn.user is None:
                click.echo(f"connected to {url} (not authenticated)", err=True)
                click.echo(_NO_TOKEN_HINT, err=True)
            else:
                click.echo(f"connected to {url} as {conn.user}", err=True)
            return await run_interactive(conn, sys.stdin, sys.stdout, sys.stderr)
        finally:
            await conn.aclose()

    sys.exit(_run(main_()))


@main.group()
def config() -> None:
    """Inspect the effective settings."""


@config.command("show")
@click.argument("command", required=False, type=click.Choice(["run", "gateway", "worker"]))
@settings_options()
def config_show(command: str | None, config_file: Path | None, **flags: Any) -> None:
    """Print the settings as JSON, secrets masked.

    With COMMAND: the settings that command reads, with its own defaults filled in
    (`portao config show gateway`). Without: every setting as given, unset ones
    as their model default (an empty `listen`, a null `admin`).
    """
    settings = _settings(config_file, flags)
    shown = settings.public_dict()
    if command is not None:
        effective = for_command(settings, command).public_dict()
        shown = {name: effective[name] for name in COMMAND_SETTINGS[command]}
    click.echo(json.dumps(shown, indent=2, sort_keys=True))


@config.command("reference")
def config_reference() -> None:
    """Print the Markdown table of every setting (docs/configuration.md holds it)."""
    click.echo(settings_reference())


def settings_reference() -> str:
    """Every setting as a Markdown table row: name, flag, environment, defaults, commands…"""
    rows = [
        "| setting | flag | environment | default | commands | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        flag = "—" if name in _NOT_FLAGS else f"`--{name.replace('_', '-')}`"
        shown = _shown_default(field.get_default(call_default_factory=True))
        per_command = [
            f"{command}: `{_shown_default(defaults[name])}`"
            for command, defaults in COMMAND_DEFAULTS.items()
            if name in defaults
        ]
        default = "; ".join(per_command) or (f"`{shown}`" if shown else "unset")
        commands = ", ".join(c for c, names in COMMAND_SETTINGS.items() if name in names)
        rows.append(
            f"| `{name}` | {flag} | `{env_name(name)}` | {default} | {commands} "
            f"| {field.description} |"
        )
    return "\n".join(rows)


main.add_command(bench)

if __name__ == "__main__":  # pragma: no cover
    main()

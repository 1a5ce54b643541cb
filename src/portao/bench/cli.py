"""`portao bench`: the click group, a subcommand of `portao`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from portao.bench import loadgen, report

F = TypeVar("F", bound=Callable[..., Any])


def _progress(line: str) -> None:
    """Progress goes to stderr: one rewritten line on a terminal, else plain lines."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{line}", err=True, nl=False)
    else:
        click.echo(line, err=True)


def _secret(ctx: click.Context, param: click.Parameter, path: Path | None) -> str:
    """The HS256 secret: from --jwt-secret-file, else PORTAO_JWT_SECRET (never a flag)."""
    from portao.config import load_settings
    from portao.errors import ConfigError

    try:
        key = load_settings(jwt_secret_file=path).jwt_key()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if key is None:
        raise click.UsageError("set PORTAO_JWT_SECRET or --jwt-secret-file to mint tokens")
    return key


def secret_option(func: F) -> F:
    """`--jwt-secret-file` (or PORTAO_JWT_SECRET) as the command's `secret` argument."""
    return click.option(
        "--jwt-secret-file", "secret", callback=_secret,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="File holding the gateway's HS256 secret (default: PORTAO_JWT_SECRET).",
    )(func)


def load_options(func: F) -> F:
    """Options every scenario shares."""
    options = [
        click.option("--target", default="tcp://127.0.0.1:7878", show_default=True,
                     help="Gateway listener (newline JSON)."),
        click.option("-c", "--connections", type=click.IntRange(min=1), default=1000,
                     show_default=True),
        click.option("-p", "--processes", type=click.IntRange(min=0), default=0,
                     help="Load-generator processes (0: one per 18,000 connections)."),
        click.option("-d", "--duration", "duration_s", type=float, default=10.0,
                     show_default=True, help="Measured seconds."),
        click.option("--warmup", "warmup_s", type=float, default=1.0, show_default=True),
        secret_option,
        click.option("--server-pid", type=int, default=None,
                     help="Server process to sample (default: whoever listens on the port)."),
        click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Also write the result here."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run(scenario: str, json_path: Path | None, **values: Any) -> None:
    try:
        options = loadgen.Options(scenario=scenario, **values)
        result = loadgen.run(options, _progress)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if sys.stderr.isatty():
        click.echo(err=True)
    click.echo(report.describe(result))
    if json_path is not None:
        report.write_json(result, json_path)


@click.group()
def bench() -> None:
    """Measure a gateway: load scenarios, reference servers, the before/after table."""


@bench.command()
@load_options
def idle(json_path: Path | None, **values: Any) -> None:
    """Open N authenticated connections, hold them, ping each once; server memory per conn."""
    _run("idle", json_path, **values)


@bench.command()
@load_options
@click.option("--rate", type=float, default=0.0,
              help="Offered calls/s in total (open loop); 0 runs a closed loop.")
@click.option("--depth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Closed loop: calls in flight per connection.")
@click.option("--route", default="echo", show_default=True)
@click.option("--payload-bytes", type=click.IntRange(min=0), default=16, show_default=True)
def rpc(json_path: Path | None, **values: Any) -> None:
    """Calls: closed loop, or open loop at --rate; calls/s and p50/p99/p99.9."""
    _run("rpc", json_path, **values)


@bench.command()
@load_options
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="Room messages/s sent (0: one at a time, as fast as they are answered).")
@click.option("--room", default="bench.room", show_default=True)
def fanout(json_path: Path | None, **values: Any) -> None:
    """Room broadcast to N members (`sub`, then `chat.say`): deliveries/s and latency."""
    _run("fanout", json_path, **values)


@bench.command()
@load_options
def churn(json_path: Path | None, **values: Any) -> None:
    """N loops of connect → auth → close: connections per second."""
    _run("churn", json_path, **values)


def _host_port(url: str) -> tuple[str, int]:
    try:
        return loadgen.parse_target(url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@bench.command()
@click.argument("app", default="portao.demo:app")
@click.option("--listen", default="tcp://127.0.0.1:7978", show_default=True)
@secret_option
def baseline(app: str, listen: str, secret: str) -> None:
    """The "before" server: thread per client, handlers on the socket thread."""
    from portao.bench.baseline import main
    from portao.runtime import raise_open_file_limit
    from portao.session.auth import TokenVerifier
    from portao.worker.app import load_app

    raise_open_file_limit()
    host, port = _host_port(listen)
    click.echo(f"baseline (thread per client) listening on {listen}", err=True)
    main(host, port, TokenVerifier("HS256", secret), load_app(app))


@bench.command()
@click.option("--listen", default="tcp://127.0.0.1:7977", show_default=True)
def bare(listen: str) -> None:
    """The bare uvloop echo server that "% of bare uvloop" is measured against."""
    from portao.bench.bare import main
    from portao.runtime import raise_open_file_limit

    raise_open_file_limit()
    host, port = _host_port(listen)
    click.echo(f"bare uvloop echo listening on {listen}", err=True)
    main(host, port)


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None


@bench.command()
@click.option("--targets", default="bare,baseline,run,redis", show_default=True,
              help="Which servers to measure (bare, baseline, run, redis).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--idle-connections", type=click.IntRange(min=1), default=10_000,
              show_default=True)
@click.option("--rpc-connections", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--rpc-processes", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--rpc-depth", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--capacity-depth", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calls in flight per connection for the echo-capacity run (% of bare).")
@click.option("-d", "--duration", "duration_s", type=float, default=5.0, show_default=True)
@click.option("--ramp", default="1000,2000,4000,8000,16000", show_default=True,
              help="Connection counts of the one-call-per-second ramp.")
@click.option("--ramp-p99-ms", type=float, default=100.0, show_default=True)
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench/results/compare.json"), show_default=True)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write latency-vs-load and memory-vs-connections PNGs here.")
def compare(
    targets: str, ramp: str, json_path: Path, plot_dir: Path | None, **values: Any
) -> None:
    """Baseline vs `portao run` vs gateway+worker over Redis: the before/after table."""
    from portao.bench import compare as comparison
    from portao.session.auth import generate_secret

    plan = comparison.Plan(targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                           ramp=_ints(ramp), **values)
    unknown = set(plan.targets) - {"bare", "baseline", "run", "redis"}
    if unknown:
        raise click.UsageError(f"unknown targets: {', '.join(sorted(unknown))}")
    result = comparison.run(plan, generate_secret(), _progress)
    if sys.stderr.isatty():
        click.echo(err=True)
    report.write_json(result, json_path)
    click.echo(comparison.table(result))
    if result["skipped"]:
        click.echo(f"skipped (service not reachable): {', '.join(result['skipped'])}")
    if plot_dir is not None:
        from portao.bench import plot

        for path in plot.draw(result, plot_dir):
            click.echo(f"wrote {path}")


@bench.command()
@click.option("--listen", default="socketio://127.0.0.1:7979", show_default=True)
@secret_option
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True,
              help="Redis for the Socket.IO manager ('' for none).")
@click.option("--channel", default="portao-bench-socketio", show_default=True)
def socketio(listen: str, secret: str, redis_url: str, channel: str) -> None:
    """The peer: python-socketio (Redis manager) on uvicorn, same chat/echo workload."""
    from portao.bench.peer import main
    from portao.runtime import raise_open_file_limit

    raise_open_file_limit()
    host, port = _host_port(listen)
    click.echo(f"python-socketio peer listening on {listen}", err=True)
    main(host, port, secret, redis_url or None, channel)


@bench.command()
@click.option("--targets", default="socketio,run-ws,redis-ws", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--idle-connections", type=click.IntRange(min=1), default=5000, show_default=True)
@click.option("--rpc-connections", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--rpc-rate", type=float, default=2000.0, show_default=True,
              help="Echo calls/s offered in total.")
@click.option("--fanout-members", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("-d", "--duration", "duration_s", type=float, default=5.0, show_default=True)
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench/results/peer.json"), show_default=True)
def peer(targets: str, json_path: Path, **values: Any) -> None:
    """python-socketio (Redis manager) vs portao's WebSocket listener, same workload."""
    from portao.bench import compare as comparison
    from portao.session.auth import generate_secret

    plan = comparison.PeerPlan(
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()), **values)
    unknown = set(plan.targets) - {"socketio", "run-ws", "redis-ws"}
    if unknown:
        raise click.UsageError(f"unknown targets: {', '.join(sorted(unknown))}")
    result = comparison.run_peer(plan, generate_secret(), _progress)
    if sys.stderr.isatty():
        click.echo(err=True)
    report.write_json(result, json_path)
    click.echo(comparison.peer_table(result))
    if result["skipped"]:
        click.echo(f"skipped (service not reachable): {', '.join(result['skipped'])}")

"""Process wiring for the commands: build brokers, gateway and workers, run, stop.

Each `serve_*` coroutine runs until SIGTERM/SIGINT, then shuts down in the
brief's order and returns normally (exit status 0). With `--admin`, each also
serves the admin listener (metrics, health, readiness) on its own loop, from
right after start until the drain has ended: `/readyz` answers 503 while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
from collections.abc import Awaitable, Callable

from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.registry import CollectorRegistry

from portao.admin.metrics import build_registry
from portao.admin.server import AdminServer, ReadyCheck, build_admin_app
from portao.broker.base import Broker, StateStore
from portao.broker.factory import create_broker, create_state
from portao.broker.memory import MemoryBroker
from portao.client import Backoff
from portao.config import (
    GATEWAY_LISTEN,
    RUN_LISTEN,
    Settings,
    describe_os_error,
    mask_url,
)
from portao.errors import BrokerUnavailable, ConfigError
from portao.gateway.server import Gateway
from portao.session.auth import TokenVerifier
from portao.worker.app import App
from portao.worker.runner import Worker

log = logging.getLogger("portao")

#: Why binding a listener fails (address taken, not ours, not allowed); getaddrinfo's
#: errors (a host that does not resolve) have negative numbers.
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

OnReady = Callable[[Gateway, AdminServer | None], Awaitable[None] | None]


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (connections are files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def make_broker(settings: Settings) -> tuple[Broker, StateStore]:
    """The broker from `--broker` and the state store (the broker or `--state`)."""
    if not settings.broker:
        raise ConfigError("broker: --broker URL is required")
    if settings.broker.startswith("memory:"):
        raise ConfigError("broker: memory:// works only inside `portao run`")
    broker = create_broker(settings.broker, settings)
    if isinstance(broker, StateStore):
        return broker, broker
    if not settings.state:
        raise ConfigError(
            f"state: --state redis://… is required with {mask_url(settings.broker)!r}"
        )
    return broker, create_state(settings.state, settings)


async def start_admin(
    settings: Settings, registry: CollectorRegistry, ready: ReadyCheck, *, required: bool = True
) -> AdminServer | None:
    """The admin listener `settings.admin` asks for, started; None when it is off.

    With `required` False (the default address of `portao run`) a busy port only
    turns the listener off with a warning.
    """
    address = settings.admin_address
    if address is None:
        return None
    server = AdminServer(
        build_admin_app(metrics=make_aiohttp_handler(registry), ready=ready), *address
    )
    try:
        await server.start()
    except OSError as exc:
        if required:
            raise ConfigError(f"admin: {cannot_listen(settings.admin, exc)}") from None
        log.warning("admin listener off: %s", cannot_listen(settings.admin, exc))
        return None
    return server


def cannot_listen(where: object, exc: OSError) -> str:
    """The message of a listener that could not bind: where, and why in plain words."""
    return f"cannot listen on {where}: {describe_os_error(exc)}"


async def start_gateway(gateway: Gateway) -> None:
    """Start the gateway; a listener that cannot bind is a `ConfigError` naming its URL."""
    try:
        await gateway.start()
    except OSError as exc:
        opened = len(gateway.servers)  # listeners open in `--listen` order
        if opened == len(gateway.specs) or not (
            exc.errno in _BIND_ERRNOS or (exc.errno or 0) < 0
        ):
            raise
        raise ConfigError(cannot_listen(gateway.specs[opened].url, exc)) from None


def reachable_host(host: str) -> str:
    """Where to reach a listener bound to `host` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def websocket_url(gateway: Gateway) -> str | None:
    """What a browser on this machine dials for the first ws:// (or wss://) listener."""
    for spec, (_, port) in zip(gateway.specs, gateway.addresses, strict=True):
        if spec.websocket is not None:
            host = reachable_host(spec.host)
            host = f"[{host}]" if ":" in host else host
            return f"{spec.scheme}://{host}:{port}{spec.websocket.path}"
    return None


async def _announce(
    on_ready: OnReady | None, gateway: Gateway, admin: AdminServer | None
) -> None:
    if on_ready is not None:
        result = on_ready(gateway, admin)
        if result is not None:
            await result


async def serve_embedded(
    settings: Settings,
    app: App,
    *,
    admin_required: bool = True,
    on_ready: OnReady | None = None,
) -> None:
    """`portao run`: gateway and workers in one process on the memory broker."""
    broker = MemoryBroker(settings)
    verifier = TokenVerifier.from_settings(settings)
    gateway = Gateway(settings, broker, broker, verifier, listen=settings.listen or RUN_LISTEN)
    worker = Worker(app, broker, broker, settings)
    registry = build_registry(gateway=gateway, worker=worker, brokers=[broker])
    stop = stop_event()
    admin: AdminServer | None = None
    await broker.connect()
    await broker.register_routes(app.routes)
    worker_task = asyncio.create_task(worker.run(), name="embedded-worker")
    try:
        await start_gateway(gateway)
        admin = await start_admin(
            settings, registry, _async(gateway.is_ready), required=admin_required
        )
        await _announce(on_ready, gateway, admin)
        await stop.wait()
        log.info("shutting down: draining connections")
        await gateway.drain()  # workers keep answering until the drain ends
    finally:
        if admin is not None:
            await admin.aclose()
        await worker.stop()
        await worker_task
        await gateway.aclose()


async def serve_gateway(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: OnReady | None = None,
) -> None:
    """`portao gateway`: only connections, forwarding to a real broker."""
    broker, state = make_broker(settings)
    verifier = TokenVerifier.from_settings(settings)
    gateway = Gateway(
        settings, broker, state, verifier, listen=settings.listen or GATEWAY_LISTEN,
        reuse_port=reuse_port,
    )
    registry = build_registry(gateway=gateway, brokers=[broker])
    stop = stop_event()
    admin: AdminServer | None = None
    try:
        await start_gateway(gateway)
        admin = await start_admin(settings, registry, _async(gateway.is_ready))
        await _announce(on_ready, gateway, admin)
        await stop.wait()
        log.info("shutting down: draining connections")
        await gateway.drain()
    finally:
        if admin is not None:
            await admin.aclose()
        await gateway.aclose()


async def serve_worker(settings: Settings, app: App) -> None:
    """`portao worker`: run the app's handlers against a real broker."""
    broker, state = make_broker(settings)
    worker = Worker(app, broker, state, settings)
    registry = build_registry(worker=worker, brokers=[broker])
    stop = stop_event()
    admin: AdminServer | None = None
    links: list[Broker | StateStore] = [broker]
    if state is not broker:  # type: ignore[comparison-overlap]
        links.append(state)
    try:
        admin = await start_admin(
            settings, registry, _async(lambda: broker.is_ready() and not worker.stopping)
        )
        if not await _connect_until_stopped(links, stop):
            return
        task = asyncio.create_task(worker.run(), name="worker")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        await worker.stop()
        await task
    finally:
        if admin is not None:
            await admin.aclose()
        if state is not broker:  # type: ignore[comparison-overlap]
            await state.aclose()
        await broker.aclose()


async def _connect_until_stopped(links: list[Broker | StateStore], stop: asyncio.Event) -> bool:
    """Open each link, waiting out a broker that is down at start (backoff with jitter),
    as a gateway does; False if asked to stop first."""
    backoff = Backoff(base_s=0.5, cap_s=10.0)
    for link in links:
        while True:
            try:
                await link.connect()
                break
            except BrokerUnavailable as exc:
                delay = backoff.next_delay_s()
                log.warning("cannot reach the broker; retrying in %.1f s: %s", delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
    return True


def _async(check: Callable[[], bool]) -> ReadyCheck:
    """A readiness check for the admin listener from a plain predicate."""

    async def ready() -> bool:
        return check()

    return ready

"""`portao gateway --processes N`: N gateway processes on shared ports, and their parent.

    parent ── spawns ──▶ process 0 … N-1, each `serve_gateway(reuse_port=True)` with
      │                  its own gateway id and inbox, all bound to the same ports
      ├ SIGTERM/SIGINT ▶ SIGTERM to every process: each drains (DESIGN.md §3.5) and
      │                  exits 0; the parent exits 0 once all have (SIGKILL after
      │                  `drain_timeout_s` + KILL_GRACE_S, then exit 1)
      ├ a process dies ▶ started again after RESTART_MIN_S, doubling up to
      │                  RESTART_MAX_S (reset once one ran STABLE_S); meanwhile the
      │                  kernel hands new connections to the others
      └ --admin H:P ───▶ the parent serves /healthz, /readyz (some process ready),
                         /metrics (every process's, with a `process` label, plus its
                         own with process="supervisor") and /processes (JSON);
                         process i serves its own on H:P+1+i (any free port if P is 0)

Processes start by multiprocessing's spawn method: a fresh interpreter each, nothing
inherited from the parent's event loop. Settings, secrets included, travel pickled
through the spawn pipe, never through argv or the environment. If a process fails
before any became ready, the parent stops all and exits 1: a configuration or start
error does not turn into a restart loop. Each process keeps a socket to the parent
open and drains by itself when it reads EOF there: a parent killed with SIGKILL
leaves no orphans holding the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from portao.admin.server import AdminServer, build_admin_app
from portao.config import GATEWAY_LISTEN, Settings
from portao.errors import ConfigError, PortaoError
from portao.gateway.listeners import parse_listen
from portao.gateway.server import Gateway
from portao.logs import setup_logging
from portao.runtime import (
    cannot_listen,
    make_broker,
    raise_open_file_limit,
    reachable_host,
    serve_gateway,
)
from portao.session.auth import TokenVerifier

log = logging.getLogger("portao.supervisor")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
#: A process that ran this long resets the restart backoff.
STABLE_S = 30.0
#: After `drain_timeout_s`, how long processes get to close before SIGKILL.
KILL_GRACE_S = 5.0
#: Per request to a process's admin listener (metrics, readiness).
CHILD_HTTP_TIMEOUT_S = 2.0


@dataclass(eq=False)
class _Child:
    """One running gateway process, as the parent sees it."""

    index: int
    process: BaseProcess
    link: Connection  # the process sends its admin port once it serves; EOF = parent gone
    started_at: float = field(default_factory=time.monotonic)
    admin_port: int | None = None
    ready: bool = False


class Supervisor:
    """Runs `settings.processes` gateway processes until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        check_settings(settings)
        self.settings = settings
        self.children: dict[int, _Child] = {}
        self.restarts = [0] * settings.processes
        self.exit_status = 0
        self._ever_ready = False
        self._stopping = asyncio.Event()
        self._killer: asyncio.Task[None] | None = None
        self._spawn_context = multiprocessing.get_context("spawn")

    async def run(self) -> int:
        """Supervise until stopped; the exit status (0 after a clean drain of all)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CHILD_HTTP_TIMEOUT_S)
        ) as http:
            admin = await self._start_admin(http)
            try:
                async with asyncio.TaskGroup() as tg:
                    for index in range(self.settings.processes):
                        tg.create_task(self._keep(index), name=f"portao-keep-{index}")
            finally:
                if self._killer is not None:
                    self._killer.cancel()
                if admin is not None:
                    await admin.aclose()
        return self.exit_status

    def request_stop(self) -> None:
        """Forward SIGTERM to every process; SIGKILL the ones still there at the deadline."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("stopping: draining %d gateway processes", len(self.children))
        for child in self.children.values():
            if child.process.is_alive():
                child.process.terminate()
        self._killer = asyncio.create_task(self._kill_stragglers())

    # -- one slot -------------------------------------------------------------------

    async def _keep(self, index: int) -> None:
        """Keep process `index` running: start it, and start it again when it dies."""
        backoff = RESTART_MIN_S
        while not self._stopping.is_set():
            child = self._spawn(index)
            await self._wait_ready(child)
            await _readable(child.process.sentinel)
            child.process.join()
            child.link.close()
            child.ready = False
            code = child.process.exitcode
            if self._stopping.is_set():
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    log.error("gateway process %d exited with %s while draining", index, code)
                    self.exit_status = 1
                return
            if not self._ever_ready:
                log.error("gateway process %d exited with %s before it served; giving up",
                          index, code)
                self.exit_status = 1
                self.request_stop()
                return
            if time.monotonic() - child.started_at >= STABLE_S:
                backoff = RESTART_MIN_S
            delay = backoff * (0.5 + random.random() / 2)
            log.warning(
                "gateway process %d (pid %s) exited with %s; restarting in %.1f s",
                index, child.process.pid, code, delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            backoff = min(backoff * 2, RESTART_MAX_S)
            self.restarts[index] += 1

    def _spawn(self, index: int) -> _Child:
        link, child_link = self._spawn_context.Pipe(duplex=True)
        settings = self.settings.model_copy(
            update={"processes": 1, "admin": self._child_admin(index)}
        )
        process = self._spawn_context.Process(
            target=_child_main, args=(settings, index, child_link), name=f"portao-gateway-{index}"
        )
        process.start()
        child_link.close()
        child = _Child(index, process, link)
        self.children[index] = child
        log.info("started gateway process %d (pid %s)", index, process.pid)
        return child

    async def _wait_ready(self, child: _Child) -> None:
        """Wait for the process's report (its admin port), or for it to die first."""
        try:
            await _readable(child.link.fileno())
            child.admin_port = child.link.recv()
        except EOFError:
            return
        child.ready = True
        self._ever_ready = True

    async def _kill_stragglers(self) -> None:
        await asyncio.sleep(self.settings.drain_timeout_s + KILL_GRACE_S)
        for child in self.children.values():
            if child.process.is_alive():
                log.error("gateway process %d did not stop in time: killed", child.index)
                child.process.kill()
                self.exit_status = 1

    def _child_admin(self, index: int) -> str | None:
        address = self.settings.admin_address
        if address is None:
            return None
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port + 1 + index if port else 0}"

    # -- the parent's admin listener ----------------------------------------------------

    async def _start_admin(self, http: aiohttp.ClientSession) -> AdminServer | None:
        address = self.settings.admin_address
        if address is None:
            return None
        merged = MergedMetrics(self)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(merged)
        inner = make_aiohttp_handler(registry)

        async def metrics(request: web.Request) -> web.StreamResponse:
            await merged.refresh(http)
            return await inner(request)

        async def ready() -> bool:
            if self._stopping.is_set():
                return False
            answers = await self.fetch_all(http, "/readyz")
            return any(text is not None for _, text in answers)

        async def processes(request: web.Request) -> web.Response:
            return web.json_response(self.describe())

        routes = [web.get("/processes", processes)]
        server = AdminServer(
            build_admin_app(metrics=metrics, ready=ready, routes=routes), *address
        )
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(f"admin: {cannot_listen(self.settings.admin, exc)}") from None
        return server

    def describe(self) -> list[dict[str, Any]]:
        """Each process: index, pid, whether it serves, restarts, admin port."""
        return [
            {
                "process": index,
                "pid": child.process.pid,
                "ready": child.ready,
                "restarts": self.restarts[index],
                "admin_port": child.admin_port,
            }
            for index, child in sorted(self.children.items())
        ]

    def ready_children(self) -> list[_Child]:
        """Processes that reported serving, with an admin listener to ask."""
        return [c for c in self.children.values() if c.ready and c.admin_port is not None]

    async def fetch_all(
        self, http: aiohttp.ClientSession, path: str
    ) -> list[tuple[_Child, str | None]]:
        """GET `path` from every serving process: the body of a 200 answer, else None."""
        children = self.ready_children()
        texts = await asyncio.gather(*(self._fetch(http, child, path) for child in children))
        return list(zip(children, texts, strict=True))

    async def _fetch(self, http: aiohttp.ClientSession, child: _Child, path: str) -> str | None:
        assert self.settings.admin_address is not None
        host = reachable_host(self.settings.admin_address[0])
        url = f"http://{f'[{host}]' if ':' in host else host}:{child.admin_port}{path}"
        try:
            async with http.get(url) as response:
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None


class MergedMetrics(Collector):
    """Every process's metrics with a `process` label, refreshed before each scrape."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._own = ProcessCollector(registry=None)
        self._families: list[Metric] = []

    async def refresh(self, http: aiohttp.ClientSession) -> None:
        sup = self._supervisor
        merged: dict[str, Metric] = {}
        sources: list[tuple[str, list[Metric]]] = [("supervisor", list(self._own.collect()))]
        for child, text in await sup.fetch_all(http, "/metrics"):
            if text is not None:
                sources.append((str(child.index), list(text_string_to_metric_families(text))))
        for process, families in sources:
            for family in families:
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    target.samples.append(
                        sample._replace(labels={**sample.labels, "process": process})
                    )
        restarts = CounterMetricFamily(
            "portao_supervisor_restarts", "Gateway processes started again after dying.",
            labels=["process"],
        )
        for index, count in enumerate(sup.restarts):
            restarts.add_metric([str(index)], count)
        serving = GaugeMetricFamily(
            "portao_supervisor_processes_ready", "Gateway processes that reported serving.",
            value=len(sup.ready_children()),
        )
        self._families = [*merged.values(), restarts, serving]

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def check_settings(settings: Settings) -> None:
    """Refuse what N processes cannot share, before starting any (`ConfigError`)."""
    for url in settings.listen or GATEWAY_LISTEN:
        if parse_listen(url, settings).port == 0:
            raise ConfigError(
                f"listen: {url!r}: --processes needs fixed ports (with port 0 each process "
                "would listen on a port of its own)"
            )
    make_broker(settings)
    TokenVerifier.from_settings(settings)


def _child_main(settings: Settings, index: int, link: Connection) -> None:
    """Entry point of gateway process `index` (runs in a fresh interpreter)."""
    setup_logging(settings)
    raise_open_file_limit()

    def parent_gone() -> None:
        asyncio.get_running_loop().remove_reader(link.fileno())
        log.warning("gateway process %d: the supervisor is gone; draining", index)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_ready(gateway: Gateway, admin: AdminServer | None) -> None:
        log.info("gateway process %d serving", index, extra={"gateway": gateway.id})
        try:
            link.send(admin.port if admin is not None else None)
        except OSError:
            parent_gone()
            return
        asyncio.get_running_loop().add_reader(link.fileno(), parent_gone)

    try:
        uvloop.run(serve_gateway(settings, reuse_port=True, on_ready=on_ready))
    except PortaoError as exc:
        log.error("gateway process %d failed: %s", index, exc)
        sys.exit(1)


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable (data, EOF, or a process sentinel at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await future
    finally:
        loop.remove_reader(fd)


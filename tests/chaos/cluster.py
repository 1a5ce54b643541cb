"""Clusters of real processes for the chaos suite, and the faults injected into them.

A cluster is gateways and workers (`portao gateway`, `portao worker
tests.apps.chaos:app`) on one broker: the shared Redis under the test's prefix, a
redis-server of its own (`server`) when the faults restart, cut or freeze it, or a
RabbitMQ vhost. The app's records go to `record_url` (tests/apps/chaos.py), apart
from the broker under test.

Each fault below acts while the fleet runs and returns once the cluster has healed
and every member of the fleet has been answered again. The tests and the soak
(bench/soak.py) run the same functions.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import aiormq
from redis.asyncio import Redis

from portao.broker.amqp_topology import Topology
from portao.config import Settings
from tests.apps.chaos import RECORD_URL_ENV
from tests.broker.backend_redis import SHARED_URL, RedisServer
from tests.chaos.fleet import Fleet, Tally, judge, read_records, report, settle
from tests.ops.admin import Scrape, scrape
from tests.procs import Procs, free_port

APP = "tests.apps.chaos:app"
#: Settings that make faults show within seconds (reclaim after 1 s). Presence (and
#: so a gateway's inbox) outlives the broker's stall: replies written before it wait.
FAST = {
    "visibility_timeout_s": "1",
    "heartbeat_s": "1",
    "presence_ttl_s": "10",
    "call_timeout_s": "10",
    "retry_delay_s": "0.05",
    "log_level": "warning",
}


@dataclass
class Proc:
    """A gateway or worker process and its admin listener."""

    process: subprocess.Popen[bytes]
    admin_port: int
    port: int = 0  # a gateway's client port

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def metrics(self) -> Scrape:
        return await scrape(f"http://127.0.0.1:{self.admin_port}")

    async def value(self, name: str) -> float:
        """One unlabelled sample of this process's metrics (0 while it cannot answer)."""
        try:
            return (await self.metrics()).value(name)
        except OSError:
            return 0.0

    async def wait_for(self, name: str, at_least: float = 1, timeout_s: float = 20.0) -> None:
        """Wait until the sample `name` reaches `at_least`."""
        deadline = time.monotonic() + timeout_s
        while await self.value(name) < at_least:
            assert self.alive, f"process exited with {self.process.returncode}"
            assert time.monotonic() < deadline, f"{name} stayed under {at_least}"
            await asyncio.sleep(0.05)


@dataclass
class Cluster:
    """The processes of one test (or soak) on one broker."""

    procs: Procs
    broker_url: str
    prefix: str
    record_url: str = SHARED_URL
    server: RedisServer | None = None  # the broker's own redis-server, if it has one
    gateways: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.procs.env[RECORD_URL_ENV] = self.record_url

    def gateway(self, *extra: str, port: int = 0) -> Proc:
        """A gateway on `port` (default: a spare one), its admin listener on another."""
        port, admin_port = port or free_port(), free_port()
        name = f"gateway{len(self.gateways)}"
        process = self.procs.gateway(port, "--admin", f"127.0.0.1:{admin_port}", *extra, name=name)
        self.gateways.append(Proc(process, admin_port, port))
        return self.gateways[-1]

    def worker(self, *extra: str, env: dict[str, str] | None = None) -> Proc:
        """A worker of the chaos app; `env` adds variables (LD_PRELOAD, …) to its own."""
        procs = self.procs
        if env:
            procs = Procs({**procs.env, **env}, procs.log_dir, procs.started)
        admin_port = free_port()
        name = f"worker{len(self.workers)}"
        process = procs.worker(APP, "--admin", f"127.0.0.1:{admin_port}", *extra, name=name)
        self.workers.append(Proc(process, admin_port))
        return self.workers[-1]

    @property
    def live(self) -> list[Proc]:
        return [p for p in (*self.gateways, *self.workers) if p.alive]

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every live process has its broker link up again."""
        for proc in self.live:
            await proc.wait_for("portao_broker_up", 1, timeout_s)

    async def settle(self, route: str = "tally") -> None:
        """Wait until the route's work is done (nothing queued, nothing in hand)."""
        if self.broker_url.startswith("amqp"):
            await self._settle_amqp(route)
        else:
            await settle(self.broker_url, self.prefix, route)

    async def _settle_amqp(self, route: str, timeout_s: float = 30.0) -> None:
        """Nothing ready in the route's queue and nothing in a live worker's hands,
        three looks in a row (RabbitMQ does not count unacknowledged messages)."""
        queue = Topology.from_settings(Settings(prefix=self.prefix)).route_queue(route)
        connection = await aiormq.connect(self.broker_url)
        try:
            channel = await connection.channel()
            deadline = time.monotonic() + timeout_s
            quiet = 0
            while quiet < 3:
                assert time.monotonic() < deadline, f"{queue} not empty after {timeout_s} s"
                declared = await channel.queue_declare(queue, passive=True)
                workers = [w for w in self.workers if w.alive]
                in_flight = sum([await w.value("portao_worker_in_flight") for w in workers])
                quiet = quiet + 1 if declared.message_count == 0 and in_flight == 0 else 0
                await asyncio.sleep(0.2)
        finally:
            await connection.close()

    async def judge(self, fleet: Fleet, scenario: str, route: str = "tally", **rules: Any) -> Tally:
        """Settle, then hold the fleet's ledger to what the app and the broker recorded."""
        await self.settle(route)
        records = await read_records(self.record_url, self.broker_url, self.prefix, route)
        tally = judge(scenario, fleet.ledger, records, **rules)
        for gateway in self.gateways:
            if gateway.alive:
                late = int(await gateway.value("portao_gateway_late_replies_total"))
                if late:
                    tally.notes["late replies dropped at the gateway"] += late
        return tally

    async def account(
        self, fleet: Fleet, scenario: str, route: str = "tally", **rules: Any
    ) -> Tally:
        """Judge the fleet's ledger, report the row; the test fails on any problem."""
        tally = await self.judge(fleet, scenario, route, **rules)
        if tally.problems:
            print(self.procs.logs())  # shown with the failure
        return report(tally)


# -- faults ---------------------------------------------------------------------------------

#: Messages one worker may hold when a fault strikes (worker_concurrency): the bound on
#: the once-keys it can orphan (fleet.py).
IN_HAND = 100

#: Wait after a worker's death: the others reclaim its messages past the visibility
#: timeout (1 s in FAST; RabbitMQ hands them back at once).
RECLAIM_WAIT_S = 2.5
#: How long a frozen worker stays frozen: three visibility timeouts.
FREEZE_S = 3.0
#: How long the broker stays down, and stalled: past the 2 s command timeout (plus the
#: 1 s of a blocking read), so every process finds its link dead.
BROKER_DOWN_S = 1.0
STALL_S = 4.0


async def kill_worker(fleet: Fleet, victim: Proc) -> None:
    """SIGKILL a worker holding messages; the others take them over."""
    await fleet.recovers()
    await victim.wait_for("portao_worker_in_flight", 3)
    victim.process.send_signal(signal.SIGKILL)
    await asyncio.sleep(RECLAIM_WAIT_S)
    await fleet.recovers()


async def freeze_worker(fleet: Fleet, frozen: Proc) -> None:
    """SIGSTOP a worker holding messages past their claims, then SIGCONT it."""
    await fleet.recovers()
    handled = await frozen.value("portao_worker_handled_total")
    await frozen.wait_for("portao_worker_in_flight", 3)
    frozen.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(FREEZE_S)
    frozen.process.send_signal(signal.SIGCONT)
    await frozen.wait_for("portao_worker_handled_total", handled + 1)
    await fleet.recovers()


async def kill_gateway(fleet: Fleet, victim: Proc) -> None:
    """SIGKILL a gateway with calls in flight; its clients move to another gateway."""
    await fleet.recovers()
    await victim.wait_for("portao_gateway_pending_calls", 3)
    victim.process.send_signal(signal.SIGKILL)
    await fleet.recovers()


async def _busy(fleet: Fleet, cluster: Cluster) -> None:
    """Wait until the fleet runs and calls are in flight on a gateway: the fault lands
    on work in hand."""
    await fleet.recovers()
    gateway = next(g for g in cluster.gateways if g.alive)
    await gateway.wait_for("portao_gateway_pending_calls", 3)


def _server(cluster: Cluster) -> RedisServer:
    assert cluster.server is not None, "this fault needs the cluster's own redis-server"
    return cluster.server


async def restart_broker(fleet: Fleet, cluster: Cluster) -> None:
    """SIGKILL the redis-server (AOF on) and start it again on the same port and dir."""
    server = _server(cluster)
    await _busy(fleet, cluster)
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(BROKER_DOWN_S)
    await asyncio.to_thread(server.start)
    await cluster.ready()
    await fleet.recovers()


async def drop_broker_connections(fleet: Fleet, cluster: Cluster, times: int = 3) -> None:
    """CLIENT KILL every connection to the redis-server but this one, `times` times."""
    server = _server(cluster)
    admin = Redis(port=server.port)
    try:
        for _ in range(times):
            await _busy(fleet, cluster)
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += await admin.client_kill_filter(_type=kind, skipme=True)
            # Every process holds one at least: its blocking read (inbox, fetch).
            assert killed >= len(cluster.live), f"{killed} connections killed"
            await cluster.ready()
            await fleet.recovers()
    finally:
        await admin.aclose()


async def stall_broker(fleet: Fleet, cluster: Cluster) -> None:
    """SIGSTOP the redis-server past the command timeouts (no data, no reset), SIGCONT."""
    server = _server(cluster)
    await _busy(fleet, cluster)
    server.freeze()
    try:
        await asyncio.sleep(STALL_S)
    finally:
        server.thaw()
    await cluster.ready()
    await fleet.recovers()

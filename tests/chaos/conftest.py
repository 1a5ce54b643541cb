"""Clusters of real processes for the chaos suite, and the report it prints at the end.

A cluster is gateways and workers (`portao gateway`, `portao worker
tests.apps.chaos:app`) on one broker: the shared Redis under the test's prefix, or
a redis-server of the test's own when the test restarts, cuts or freezes it. The
app's records always go to the shared Redis; the test's keys are removed afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.broker.backend_redis import SHARED_URL, delete_prefix
from tests.chaos.fleet import REPORT, Fleet, Tally, judge, read_records, report, settle
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service
from tests.ops.admin import Scrape, scrape
from tests.procs import Procs, free_port, processes

APP = "tests.apps.chaos:app"
#: Settings that make faults show within seconds (reclaim after 1 s, presence 3 s).
FAST = {
    "visibility_timeout_s": "1",
    "heartbeat_s": "1",
    "presence_ttl_s": "3",
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
            assert self.process.poll() is None, f"process exited with {self.process.returncode}"
            assert time.monotonic() < deadline, f"{name} stayed under {at_least}"
            await asyncio.sleep(0.05)


@dataclass
class Cluster:
    """The processes of one test on one broker."""

    procs: Procs
    broker_url: str
    prefix: str
    gateways: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def gateway(self, *extra: str) -> Proc:
        """A gateway on a spare port, with its admin listener on another."""
        port, admin_port = free_port(), free_port()
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

    async def account(
        self, fleet: Fleet, scenario: str, route: str = "tally", **rules: Any
    ) -> Tally:
        """Wait until the route's work is done, judge the fleet's ledger, report the row."""
        await settle(self.broker_url, self.prefix, route)
        records = await read_records(SHARED_URL, self.broker_url, self.prefix, route)
        tally = judge(scenario, fleet.ledger, records, **rules)
        for gateway in self.gateways:
            if gateway.process.poll() is None:
                late = int(await gateway.value("portao_gateway_late_replies_total"))
                if late:
                    tally.notes["late replies dropped at the gateway"] += late
        if tally.problems:
            print(self.procs.logs())  # shown with the failure
        return report(tally)

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
async def cluster_factory(tmp_path: Path, prefix: str) -> AsyncIterator[ClusterFactory]:
    """Start clusters (`broker_url` default: the shared Redis); all killed after."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    with ExitStack() as stack:

        def make(broker_url: str = SHARED_URL, **settings: Any) -> Cluster:
            values = {**FAST, **{k: str(v) for k, v in settings.items()}}
            procs = stack.enter_context(
                processes(tmp_path, broker=broker_url, prefix=prefix, **values)
            )
            return Cluster(procs, broker_url, prefix)

        try:
            yield make
        finally:
            stack.close()
            await delete_prefix(SHARED_URL, prefix)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The table the brief asks for: one row per scenario that ran."""
    if not REPORT:
        return
    terminalreporter.section("chaos: what was sent and what came back")
    terminalreporter.write_line("| scenario | sent | answered | lost | doubled | notes |")
    terminalreporter.write_line("|---|---|---|---|---|---|")
    for tally in REPORT:
        terminalreporter.write_line(tally.row())

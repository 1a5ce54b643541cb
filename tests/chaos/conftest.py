"""Fixtures of the chaos suite (clusters of real processes, see cluster.py), and the
report it prints at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.broker.backend_amqp import amqp_url, fresh_vhost
from tests.broker.backend_redis import SHARED_URL, RedisServer, delete_prefix
from tests.chaos.cluster import FAST, Cluster
from tests.chaos.fleet import REPORT, table
from tests.conftest import REDIS_HOST, REDIS_PORT, require_service
from tests.procs import processes

ClusterFactory = Callable[..., Cluster]


@pytest.fixture
async def cluster_factory(tmp_path: Path, prefix: str) -> AsyncIterator[ClusterFactory]:
    """Start clusters (`broker_url` default: the shared Redis); all killed after.

    Keyword arguments are settings (FAST unless given); `server` is the broker's
    own redis-server, for the faults that act on it.
    """
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    with ExitStack() as stack:

        def make(
            broker_url: str = SHARED_URL, server: RedisServer | None = None, **settings: Any
        ) -> Cluster:
            values = {**FAST, **{k: str(v) for k, v in settings.items()}}
            procs = stack.enter_context(
                processes(tmp_path, broker=broker_url, prefix=prefix, **values)
            )
            return Cluster(procs, broker_url, prefix, server=server)

        try:
            yield make
        finally:
            stack.close()
            await delete_prefix(SHARED_URL, prefix)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (spare port, AOF always), killed after."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with RedisServer(directory) as server:
        yield server


@pytest.fixture
async def amqp_broker() -> AsyncIterator[str]:
    """The URL of a RabbitMQ vhost of the test's own."""
    async with fresh_vhost() as vhost:
        yield amqp_url(vhost)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The table the brief asks for: one row per scenario that ran."""
    if not REPORT:
        return
    terminalreporter.section("chaos: what was sent and what came back")
    for line in table(REPORT):
        terminalreporter.write_line(line)

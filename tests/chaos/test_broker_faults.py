"""The broker restarted, cut off and frozen under a running cluster.

Each test runs its own redis-server (AOF, `appendfsync always`) on a spare port, so
it can be killed, have its connections dropped or be stopped without touching the
shared one; the app's records stay on the shared Redis. While the broker is gone the
gateway answers new work `unavailable` (the only error allowed); what it had
accepted survives and is answered once the link is back.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.broker.backend_redis import RedisServer
from tests.chaos.cluster import (
    IN_HAND,
    Cluster,
    drop_broker_connections,
    restart_broker,
    stall_broker,
)
from tests.chaos.conftest import ClusterFactory
from tests.chaos.fleet import Fleet, run_for, served

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Each of the two workers may have had a once-key's SET in flight for every message
#: in hand (fleet.py: orphaned keys).
RULES: dict[str, Any] = {"allowed_errors": {"unavailable"}, "orphaned_keys": 2 * IN_HAND}


async def _cluster(cluster_factory: ClusterFactory, server: RedisServer) -> Cluster:
    cluster = cluster_factory(f"redis://127.0.0.1:{server.port}/0", server=server)
    gateway = cluster.gateway()
    cluster.worker()
    cluster.worker()
    await served(gateway.url)
    return cluster


async def test_broker_restart(cluster_factory: ClusterFactory, redis_server: RedisServer) -> None:
    cluster = await _cluster(cluster_factory, redis_server)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, restart_broker(fleet, cluster))
    await cluster.account(fleet, "broker SIGKILL, restarted (AOF)", **RULES)


async def test_broker_connections_dropped(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    cluster = await _cluster(cluster_factory, redis_server)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, drop_broker_connections(fleet, cluster))
    await cluster.account(fleet, "broker connections killed, 3 times", **RULES)


async def test_broker_link_stalled(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    cluster = await _cluster(cluster_factory, redis_server)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, stall_broker(fleet, cluster))
    await cluster.account(fleet, "broker SIGSTOP 4 s, SIGCONT", **RULES)

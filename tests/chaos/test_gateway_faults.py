"""A gateway killed under its clients: they move to the other gateway and go on.

Two gateways and two workers on the shared Redis; the fleet is spread over both. One
gateway is SIGKILLed with calls in flight. What its connections had in flight died
with it: each such call got no answer (at most one) and ran at least once, unless it
never reached the broker; everything else is held to the usual rules.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.chaos.cluster import kill_gateway
from tests.chaos.conftest import ClusterFactory
from tests.chaos.fleet import Fleet, run_for, served

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def test_gateway_sigkill_clients_move_to_the_other(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory()
    victim, survivor = cluster.gateway(), cluster.gateway()
    cluster.worker()
    cluster.worker()
    await asyncio.gather(served(victim.url), served(survivor.url))
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, kill_gateway(fleet, victim))
    assert victim.process.wait(5) == -signal.SIGKILL
    tally = await cluster.account(fleet, "gateway SIGKILL, 2 gateways")
    # The fault hit calls in flight, and every member now talks to the survivor.
    assert tally.notes["call on a dead connection"] >= 1, tally.row()
    assert {fleet.urls[m.url_index] for m in fleet.members} == {survivor.url}

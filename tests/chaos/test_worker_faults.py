"""Workers killed, frozen, outlived by their handlers, or living at another time.

Each scenario runs the accounting fleet on one gateway over the shared Redis while
the fault happens, then judges every call and send (tests/chaos/fleet.py).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.broker.backend_redis import SHARED_URL
from tests.chaos.cluster import IN_HAND, freeze_worker, kill_worker
from tests.chaos.conftest import ClusterFactory
from tests.chaos.fleet import REDELIVERED, Fleet, run_for, served
from tests.conftest import IN_CI

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


async def test_worker_sigkill_loses_nothing(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory()
    gateway = cluster.gateway()
    victim, _ = cluster.worker(), cluster.worker()
    await served(gateway.url)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, kill_worker(fleet, victim))
    assert victim.process.wait(5) == -signal.SIGKILL
    # A killed worker may die between taking a once-key and the effect it guards.
    tally = await cluster.account(fleet, "worker SIGKILL", orphaned_keys=IN_HAND)
    assert tally.notes[REDELIVERED] >= 3, "the kill caught no message in hand"


@pytest.mark.amqp
async def test_worker_sigkill_on_rabbitmq_loses_nothing(
    cluster_factory: ClusterFactory, amqp_broker: str
) -> None:
    """The same on RabbitMQ (the once-keys in Redis): the broker requeues at once."""
    cluster = cluster_factory(amqp_broker, state=SHARED_URL)
    gateway = cluster.gateway()
    victim, _ = cluster.worker(), cluster.worker()
    await served(gateway.url)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, kill_worker(fleet, victim))
    assert victim.process.wait(5) == -signal.SIGKILL
    tally = await cluster.account(fleet, "worker SIGKILL, RabbitMQ", orphaned_keys=IN_HAND)
    assert tally.notes[REDELIVERED] >= 3, "the kill caught no message in hand"


async def test_worker_sigstop_then_sigcont(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory()
    gateway = cluster.gateway()
    frozen, _ = cluster.worker(), cluster.worker()
    await served(gateway.url)
    async with Fleet(cluster.urls, size=20, sleep_s=0.2) as fleet:
        await run_for(fleet, freeze_worker(fleet, frozen))
    tally = await cluster.account(fleet, "worker SIGSTOP 3 s, SIGCONT")
    assert tally.notes[REDELIVERED] >= 3, "the freeze caught no message in hand"
    lost_claims = int(await frozen.value("portao_worker_lost_claims_total"))
    tally.notes["results dropped by the thawed worker"] += lost_claims


async def test_handler_slower_than_visibility_timeout_never_runs_twice(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(visibility_timeout_s=1)
    gateway = cluster.gateway()
    cluster.worker()
    cluster.worker()
    await served(gateway.url)
    async with Fleet(cluster.urls, size=30, lanes=2, route="slow", sleep_s=2.5) as fleet:
        await fleet.run(asyncio.Event(), max_each=2)
    tally = await cluster.account(fleet, "handler 2.5 s, visibility timeout 1 s", route="slow")
    records = tally.records
    assert records is not None
    assert set(records.maxrun.values()) == {1}, "a message ran twice at once"
    assert set(records.runs.values()) == {1}, "a live worker's claim was taken from it"
    assert len(records.runs) == tally.sent == 120


@pytest.fixture
def libfaketime() -> None:
    """Fail in CI, skip elsewhere, when libfaketime is missing (apt package faketime)."""
    if LIBFAKETIME.exists():
        return
    reason = f"libfaketime is not installed ({LIBFAKETIME}; apt install faketime)"
    if IN_CI:
        pytest.fail(reason + " (CI=true: the clock-skew scenario must not skip)")
    pytest.skip(reason)


def _faketime(offset_s: int) -> dict[str, str]:
    """Environment that shifts a process's wall clock (not its monotonic clock)."""
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{offset_s:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@pytest.mark.usefixtures("libfaketime")
@pytest.mark.parametrize(
    ("skew_s", "calls_time_out"),
    [(2, False), (-60, False), (60, True)],
    ids=["ahead 2 s", "behind 60 s", "ahead 60 s"],
)
async def test_worker_clock_skew(
    cluster_factory: ClusterFactory, skew_s: int, calls_time_out: bool
) -> None:
    """The worker compares a call's deadline (the gateway's clock) with its own clock.

    Within the call timeout a skew changes nothing; a worker ahead by more skips
    every call as expired (the gateway answers `timeout`), and sends still run once.
    """
    cluster = cluster_factory(call_timeout_s=4)
    gateway = cluster.gateway()
    worker = cluster.worker(env=_faketime(skew_s))
    await served(gateway.url)
    async with Fleet(cluster.urls, size=10, lanes=2) as fleet:
        await fleet.run(asyncio.Event(), max_each=2)
    allowed = {"timeout"} if calls_time_out else set()
    label = f"worker clock {'ahead' if skew_s > 0 else 'behind'} {abs(skew_s)} s, call timeout 4 s"
    tally = await cluster.account(fleet, label, allowed_errors=allowed)
    calls = tally.sent // 2
    if calls_time_out:
        assert tally.notes["error timeout"] == calls
        assert await worker.value("portao_worker_expired_skipped_total") == calls
    else:
        assert tally.notes["reply"] == calls
    assert tally.notes["ack"] == tally.sent - calls

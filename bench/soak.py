"""Soak: the chaos suite's fleet against one cluster for minutes, faults in rotation.

Two gateways and three workers (`tests.apps.chaos:app`) on a redis-server of the
soak's own (AOF, `appendfsync always`); the app's records on a second one, which no
fault touches. The accounting fleet (tests/chaos/fleet.py) runs over both gateways
the whole time while the faults of tests/chaos/cluster.py strike in turn: worker
SIGKILL, worker SIGSTOP/SIGCONT, gateway SIGKILL, broker restart, broker connections
killed, broker stalled. A killed worker or gateway is replaced (the gateway on the
same port) before the next fault.

At the end every request is judged with the rules of its fault's window (the time
from that fault's start to the next one's) and the table is printed: one row per
fault, and the total. The exit status is 1 if anything was lost or doubled.

    python -m bench.soak --minutes 3          # from the repository root
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any

import uvloop
from tests.broker.backend_redis import RedisServer
from tests.chaos import cluster as faults
from tests.chaos.cluster import FAST, IN_HAND, Cluster, Proc
from tests.chaos.fleet import Fleet, Ledger, Tally, judge, read_records, run_for, served
from tests.chaos.fleet import table as format_table
from tests.procs import processes

PREFIX = "soak"


@dataclass
class Window:
    """The requests made from one fault's start to the next one's."""

    fault: str
    start: int  # index of its first request in the ledger
    end: int = 0
    orphaned_keys: int = 0


@dataclass
class Fault:
    """One fault of the rotation: how to strike, what its window may show."""

    name: str
    strike: Callable[[Soak], Awaitable[int]]  # returns the once-keys it may orphan
    allowed_errors: frozenset[str] = frozenset()


@dataclass
class Soak:
    cluster: Cluster
    fleet: Fleet
    windows: list[Window] = field(default_factory=list)

    def live_workers(self) -> list[Proc]:
        return [w for w in self.cluster.workers if w.alive]

    def busiest_gateway(self) -> Proc:
        """The live gateway most members talk to."""
        counts = {g.url: 0 for g in self.cluster.gateways if g.alive}
        for member in self.fleet.members:
            url = self.fleet.urls[member.url_index]
            if url in counts:
                counts[url] += 1
        url = max(counts, key=counts.__getitem__)
        return next(g for g in self.cluster.gateways if g.alive and g.url == url)


async def kill_worker(soak: Soak) -> int:
    await faults.kill_worker(soak.fleet, soak.live_workers()[0])
    soak.cluster.worker()
    return IN_HAND


async def freeze_worker(soak: Soak) -> int:
    await faults.freeze_worker(soak.fleet, soak.live_workers()[0])
    return 0


async def kill_gateway(soak: Soak) -> int:
    victim = soak.busiest_gateway()
    await faults.kill_gateway(soak.fleet, victim)
    await asyncio.to_thread(victim.process.wait, 10)
    replacement = await asyncio.to_thread(soak.cluster.gateway, port=victim.port)
    await served(replacement.url)
    return 0


async def restart_broker(soak: Soak) -> int:
    await faults.restart_broker(soak.fleet, soak.cluster)
    return IN_HAND * len(soak.live_workers())


async def drop_connections(soak: Soak) -> int:
    await faults.drop_broker_connections(soak.fleet, soak.cluster, times=1)
    return IN_HAND * len(soak.live_workers())


async def stall_broker(soak: Soak) -> int:
    await faults.stall_broker(soak.fleet, soak.cluster)
    return IN_HAND * len(soak.live_workers())


BROKER_DOWN = frozenset({"unavailable"})
ROTATION = [
    Fault("worker SIGKILL", kill_worker),
    Fault("worker SIGSTOP 3 s, SIGCONT", freeze_worker),
    Fault("gateway SIGKILL", kill_gateway),
    Fault("broker SIGKILL, restarted (AOF)", restart_broker, BROKER_DOWN),
    Fault("broker connections killed", drop_connections, BROKER_DOWN),
    Fault("broker SIGSTOP 4 s, SIGCONT", stall_broker, BROKER_DOWN),
]


async def rotate(soak: Soak, until: float) -> None:
    """Strike the faults in turn until the monotonic time `until`."""
    ledger = soak.fleet.ledger
    for fault in cycle(ROTATION):
        if time.monotonic() >= until:
            return
        window = Window(fault.name, len(ledger.entries))
        soak.windows.append(window)
        started = time.monotonic()
        window.orphaned_keys = await fault.strike(soak)
        print(f"{fault.name}: healed after {time.monotonic() - started:.1f} s", flush=True)


def _tallies(soak: Soak, records: Any) -> list[Tally]:
    """One tally per fault (its windows together), and the total."""
    entries = list(soak.fleet.ledger.entries.values())
    windows = soak.windows
    for window, following in zip(windows, [*windows[1:], None], strict=True):
        window.end = following.start if following else len(entries)
    tallies = []
    for fault in ROTATION:
        mine = [w for w in windows if w.fault == fault.name]
        if not mine:
            continue
        ledger = Ledger({e.key: e for w in mine for e in entries[w.start : w.end]})
        tally = judge(
            f"{fault.name}, {len(mine)} times",
            ledger,
            records,
            allowed_errors=fault.allowed_errors,
            orphaned_keys=sum(w.orphaned_keys for w in mine),
        )
        tallies.append(tally)
    before = Ledger({e.key: e for e in entries[: windows[0].start if windows else len(entries)]})
    if before.entries:
        tallies.insert(0, judge("before the first fault", before, records))
    total = Tally("total")
    for tally in tallies:
        total.sent += tally.sent
        total.answered += tally.answered
        total.lost += tally.lost
        total.doubled += tally.doubled
        total.notes.update(tally.notes)
        total.problems += tally.problems
    unclaimed = soak.fleet.ledger.unclaimed
    total.problems += [f"unclaimed message {m}" for m in unclaimed]
    tallies.append(total)
    return tallies


@contextmanager
def redis_servers(directory: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """The broker's redis-server and the records' one, killed at exit."""
    with ExitStack() as stack:
        servers = []
        for name in ("broker", "record"):
            (directory / name).mkdir()
            server = RedisServer(directory / name)
            stack.callback(server.kill)
            server.start()
            servers.append(server)
        yield servers[0], servers[1]


async def soak(minutes: float, fleet_size: int, directory: Path) -> int:
    with redis_servers(directory) as (broker, record):
        broker_url = f"redis://127.0.0.1:{broker.port}/0"
        record_url = f"redis://127.0.0.1:{record.port}/0"
        with processes(directory, broker=broker_url, prefix=PREFIX, **FAST) as procs:
            cluster = Cluster(procs, broker_url, PREFIX, record_url=record_url, server=broker)
            gateways = [cluster.gateway(), cluster.gateway()]
            for _ in range(3):
                cluster.worker()
            await asyncio.gather(*(served(g.url) for g in gateways))
            async with Fleet(cluster.urls, size=fleet_size, sleep_s=0.2) as fleet:
                state = Soak(cluster, fleet)
                until = time.monotonic() + minutes * 60
                print(f"soak: {fleet_size} clients, faults in rotation for {minutes:g} min")
                await run_for(fleet, rotate(state, until))
            await cluster.settle()
            records = await read_records(record_url, broker_url, PREFIX, "tally")
            tallies = _tallies(state, records)
    print("\n".join(format_table(tallies)))
    total = tallies[-1]
    for problem in total.problems[:40]:
        print(problem)
    if total.problems or total.lost or total.doubled:
        print(f"FAILED: the processes' logs are in {directory}")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults strike")
    parser.add_argument("--fleet", type=int, default=40, help="client connections")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    args = parser.parse_args()
    directory = args.logs or Path(tempfile.mkdtemp(prefix="portao-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    status = uvloop.run(soak(args.minutes, args.fleet, directory))
    if status == 0 and args.logs is None:
        shutil.rmtree(directory)  # kept when something went wrong
    sys.exit(status)


if __name__ == "__main__":
    main()

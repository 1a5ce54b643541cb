"""The accounting fleet: clients that log every call and send, and the judge of the log.

Each member is one `portao.client` connection (`reconnect=True`) sending `call`s and
`send`s with ids of its own (`member-n`) through `request_raw`, so every answer is
tied to its request: the awaited one, and any later answer with the same id, which
the client hands to `recv_raw` and the member's collector adds to the same entry.
With several gateway URLs, a member whose connection died dials the next one.

After the run the judge reads what the app recorded (tests/apps/chaos.py: handler
runs and `ctx.once`-guarded effects per key) and what the broker still holds, and
holds every entry to the brief (DESIGN.md §3):

- a call answered while its connection lived got exactly one answer: a `reply`
  carrying its own key, or an error the scenario allows;
- a call whose connection died got no answer and ran at least once, unless it never
  reached the broker (it is in no queue and never ran: it died with the gateway);
- an acked send ran at least once and its effect happened exactly once, except when
  its once-key was orphaned: taken by a run that never learned it (a worker killed
  between the key and the effect, or a `SET NX` the broker ran but whose answer was
  lost when it was killed, stalled or cut off). The key then ran again and skipped
  the effect; the scenario bounds how many (`orphaned_keys`);
- no effect ever happened twice, and no request got two answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis

from portao.broker.redis_keys import ENVELOPE_FIELD, Keys
from portao.client import Backoff, Client, connect
from portao.envelope import decode_envelope
from portao.errors import ConnectionClosed, RequestError
from portao.session.auth import mint_token
from tests.apps.chaos import record_key
from tests.procs import SECRET

#: The note of a request whose handler ran more than once (the fault hit it in hand).
REDELIVERED = "ran again"
#: The note of an acked send whose once-key was orphaned (see the module docstring).
ORPHANED = "once-key orphaned, effect skipped"
#: Rows of the report printed at the end of the run (tests/chaos/conftest.py).
REPORT: list[Tally] = []


@dataclass(slots=True)
class Entry:
    """One request and everything that came back for it."""

    key: str
    kind: Literal["call", "send"]
    answers: list[dict[str, Any]] = field(default_factory=list)
    died: bool = False  # the connection ended before an answer
    timed_out: bool = False  # the connection lived, but nothing came back in time


@dataclass(slots=True)
class Ledger:
    """Every request the fleet made, by id, and the messages no request claimed."""

    entries: dict[str, Entry] = field(default_factory=dict)
    unclaimed: list[dict[str, Any]] = field(default_factory=list)

    def open(self, key: str, kind: Literal["call", "send"]) -> Entry:
        entry = self.entries[key] = Entry(key, kind)
        return entry

    def take_stray(self, message: dict[str, Any]) -> None:
        """An answer that arrived when nobody waited for its id: a second one, or late."""
        entry = self.entries.get(str(message.get("id")))
        if entry is None:
            self.unclaimed.append(message)
        else:
            entry.answers.append(message)


def token(user: str) -> str:
    return mint_token(SECRET, user, rooms=["*"], now=time.time())


async def served(url: str, route: str = "echo", timeout_s: float = 30.0) -> None:
    """Wait until a worker has registered its routes behind the gateway at `url`."""
    deadline = time.monotonic() + timeout_s
    async with await connect(url, token=token("probe")) as client:
        while True:
            try:
                # A send, not a call: a worker that skips calls (clock skew) still counts.
                await client.send(route, {"key": "probe"})
                return
            except RequestError as exc:
                if exc.code != "unknown_route" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


class _Member:
    """One connection of the fleet.

    On one URL the client re-dials by itself (`reconnect=True`). With several, a
    member whose gateway died dials the next URL, with the client's own backoff
    between failed dials: that is how a `portao.client` user fails over.
    """

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.user = f"fleet{index}"
        self.url_index = index % len(fleet.urls)
        self.failover = len(fleet.urls) > 1
        self.client: Client | None = None
        self.collector: asyncio.Task[None] | None = None
        self.successes = 0  # requests answered `reply` or `ack`
        self.moving = asyncio.Lock()  # held while the member dials another gateway

    async def dial(self, timeout_s: float = 20.0) -> None:
        """Connect to the current URL, or to the next ones in turn (bounded)."""
        urls = self.fleet.urls
        backoff = Backoff()
        deadline = time.monotonic() + timeout_s
        while True:
            url = urls[self.url_index]
            try:
                self.client = await connect(
                    url, token=token(self.user), reconnect=not self.failover,
                    connect_timeout_s=2.0, request_timeout_s=self.fleet.request_timeout_s,
                )  # fmt: skip
            except (OSError, TimeoutError, ConnectionClosed):
                if time.monotonic() > deadline:
                    raise
                self.url_index = (self.url_index + 1) % len(urls)
                await asyncio.sleep(backoff.next_delay_s())
                continue
            self.collector = asyncio.create_task(self._collect(self.client))
            return

    async def _collect(self, client: Client) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                self.fleet.ledger.take_stray(await client.recv_raw())

    async def hang_up(self) -> None:
        """Close the connection; answers it already held are collected first."""
        if self.client is not None:
            await self.client.aclose()
        if self.collector is not None:
            await self.collector

    async def request(self, entry: Entry, data: dict[str, Any]) -> None:
        client = await self._client()
        message = {"op": entry.kind, "id": entry.key, "route": self.fleet.route, "data": data}
        try:
            answer = await client.request_raw(message, timeout_s=self.fleet.request_timeout_s)
        except ConnectionClosed:
            entry.died = True
            return
        except TimeoutError:
            entry.timed_out = True
            return
        entry.answers.append(answer)
        if answer.get("op") in ("reply", "ack"):
            self.successes += 1

    async def _client(self) -> Client:
        """The member's client; a closed one (its gateway died) is replaced first."""
        async with self.moving:
            if self.failover and self.client is not None and self.client.is_closed:
                self.url_index = (self.url_index + 1) % len(self.fleet.urls)
                await self.hang_up()
                await self.dial()
            assert self.client is not None
            return self.client


class Fleet:
    """`size` connections spread over `urls`, each running `lanes` request loops.

    Each loop alternates `call` and `send` to `route` with data `{"key", "sleep"}`
    and pauses `pause_s` between requests, until `stop` is set or it made `max_each`.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        size: int = 20,
        lanes: int = 1,
        route: str = "tally",
        sleep_s: float = 0.0,
        pause_s: float = 0.1,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.urls = urls
        self.route = route
        self.sleep_s = sleep_s
        self.pause_s = pause_s
        self.lanes = lanes
        self.request_timeout_s = request_timeout_s
        self.ledger = Ledger()
        self.members = [_Member(self, i) for i in range(size)]

    async def recovers(self, each: int = 2, timeout_s: float = 30.0) -> None:
        """Wait until every member got `each` more `reply`s or `ack`s: the whole fleet
        goes on (after a fault, or once it runs)."""
        targets = [m.successes + each for m in self.members]
        deadline = time.monotonic() + timeout_s
        while short := sum(m.successes < t for m, t in zip(self.members, targets, strict=True)):
            assert time.monotonic() < deadline, f"{short} members not answered again"
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Fleet:
        await asyncio.gather(*(m.dial() for m in self.members))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.gather(*(m.hang_up() for m in self.members))

    async def run(self, stop: asyncio.Event, max_each: int = 10_000) -> None:
        """Make requests until `stop` is set; returns once every request has ended."""
        await asyncio.gather(
            *(
                self._lane(member, lane, stop, max_each)
                for member in self.members
                for lane in range(self.lanes)
            )
        )

    async def _lane(self, member: _Member, lane: int, stop: asyncio.Event, max_each: int) -> None:
        data = {"sleep": self.sleep_s}
        for n in range(max_each):
            if stop.is_set():
                return
            key = f"{member.index}-{lane}-{n}"
            # Half the members start with a send (half of each gateway's, with two):
            # calls and sends are in flight together when a fault strikes.
            kind: Literal["call", "send"] = "call" if (n + member.index // 2) % 2 == 0 else "send"
            entry = self.ledger.open(key, kind)
            await member.request(entry, {**data, "key": key})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.pause_s)


async def run_for(fleet: Fleet, fault: Any, max_each: int = 10_000) -> None:
    """Run the fleet while the coroutine `fault` injects its fault, then stop it."""
    stop = asyncio.Event()

    async def inject() -> None:
        try:
            await fault
        finally:
            stop.set()

    await asyncio.gather(fleet.run(stop, max_each), inject())


# -- what the app and the broker recorded --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Records:
    """Per key: handler runs, guarded effects, most concurrent runs; keys still queued."""

    runs: dict[str, int]
    effects: dict[str, int]
    maxrun: dict[str, int]
    queued: frozenset[str]


async def _hash(client: Redis, name: str) -> dict[str, int]:
    raw = await client.hgetall(name)
    return {k.decode(): int(v) for k, v in raw.items()}


async def settle(broker_url: str, prefix: str, route: str, timeout_s: float = 30.0) -> None:
    """Wait until the route's backlog (undelivered + pending) is empty: all work done."""
    client = Redis.from_url(broker_url)
    backlog = Keys(prefix).backlog(route)
    deadline = time.monotonic() + timeout_s
    try:
        while int(await client.get(backlog) or 0) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"backlog of {route} not empty after {timeout_s} s")
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def read_records(record_url: str, broker_url: str | None, prefix: str, route: str) -> Records:
    """What the app recorded (on `record_url`), and the keys `route`'s stream still
    holds when the broker is Redis (`broker_url`; None or AMQP: none looked at)."""
    record = Redis.from_url(record_url)
    try:
        runs, effects, maxrun = [
            await _hash(record, record_key(prefix, name)) for name in ("runs", "effects", "maxrun")
        ]
    finally:
        await record.aclose()
    queued = set()
    if broker_url is not None and broker_url.startswith(("redis:", "rediss:")):
        broker = Redis.from_url(broker_url)
        try:
            for _, fields in await broker.xrange(Keys(prefix).queue(route)):
                envelope = decode_envelope(fields[ENVELOPE_FIELD])
                queued.add(str(json.loads(envelope.data)["key"]))
        finally:
            await broker.aclose()
    return Records(runs, effects, maxrun, frozenset(queued))


# -- the judge --------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One row of the report: the brief's columns, and what lies behind them."""

    scenario: str
    sent: int = 0
    answered: int = 0
    lost: int = 0
    doubled: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    records: Records | None = None

    def fail(self, kind: str, entry: Entry, why: str) -> None:
        if kind == "lost":
            self.lost += 1
        else:
            self.doubled += 1
        if len(self.problems) < 20:
            self.problems.append(f"{kind} {entry.kind} {entry.key}: {why}")

    def row(self) -> str:
        notes = ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items()))
        return (
            f"| {self.scenario} | {self.sent} | {self.answered} | {self.lost} | {self.doubled} "
            f"| {notes} |"
        )


def judge(
    scenario: str,
    ledger: Ledger,
    records: Records,
    *,
    allowed_errors: Collection[str] = (),
    orphaned_keys: int = 0,
) -> Tally:
    """Hold every entry of `ledger` to the rules of the module docstring.

    `orphaned_keys` is how many once-keys the fault may have orphaned: at most the
    messages in hand when it struck (a worker's concurrency, per worker hit).
    """
    tally = Tally(scenario, records=records)
    for entry in ledger.entries.values():
        tally.sent += 1
        runs = records.runs.get(entry.key, 0)
        effects = records.effects.get(entry.key, 0)
        if entry.answers:
            tally.answered += 1
        if len(entry.answers) > 1:
            tally.fail("doubled", entry, f"{len(entry.answers)} answers: {entry.answers[:3]}")
        if effects > 1:
            tally.fail("doubled", entry, f"effect ran {effects} times")
        if runs > 1:
            tally.notes[REDELIVERED] += 1
        for outcome in _outcomes(entry, runs, effects, records, allowed_errors, tally):
            tally.notes[outcome] += 1
    orphaned = tally.notes[ORPHANED]
    if orphaned > orphaned_keys:
        tally.problems.append(f"{orphaned} once-keys orphaned, allowed {orphaned_keys}")
    for message in ledger.unclaimed:
        tally.problems.append(f"unclaimed message {message}")
    return tally


def _outcomes(
    entry: Entry,
    runs: int,
    effects: int,
    records: Records,
    allowed_errors: Collection[str],
    tally: Tally,
) -> Iterator[str]:
    """Check one entry; yield the labels it is counted under in the notes."""
    if entry.timed_out:
        yield "client timeout"
        tally.fail("lost", entry, "the gateway never answered, its connection alive")
        return
    if entry.died:
        yield f"{entry.kind} on a dead connection"
        if entry.kind == "call" and runs == 0:
            if entry.key in records.queued:
                tally.fail("lost", entry, "accepted by the broker, never ran")
            else:
                yield "call never reached the broker"
        return
    answer = entry.answers[0]
    op = answer.get("op")
    if op == "error":
        code = str(answer.get("code"))
        yield f"error {code}"
        if code not in allowed_errors:
            tally.problems.append(f"{entry.kind} {entry.key}: unexpected error {answer}")
        return
    if entry.kind == "call":
        yield "reply"
        if op != "reply" or answer.get("data") != {"key": entry.key}:
            tally.fail("lost", entry, f"answered {answer}")
        return
    yield "ack"
    if op != "ack":
        tally.fail("lost", entry, f"answered {answer}")
    elif runs == 0:
        tally.fail("lost", entry, "acked, never ran")
    elif effects == 0:
        if runs >= 2:
            yield ORPHANED
        else:
            tally.fail("lost", entry, "acked and ran once, effect never happened")


def table(tallies: list[Tally]) -> list[str]:
    """The report's lines: a Markdown table, one row per tally."""
    return [
        "| scenario | sent | answered | lost | doubled | notes |",
        "|---|---|---|---|---|---|",
        *(tally.row() for tally in tallies),
    ]


def report(tally: Tally) -> Tally:
    """Keep the row for the end-of-run table and fail the test on any problem."""
    REPORT.append(tally)
    assert not tally.problems, "\n".join([tally.row(), *tally.problems])
    assert (tally.lost, tally.doubled) == (0, 0), tally.row()
    return tally

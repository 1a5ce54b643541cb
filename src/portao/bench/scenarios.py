"""The scenarios, as run inside one load-generator process.

Each process gets a `Plan` (its share of the connections and of the offered
rate), connects, waits for the parent's start time, runs, and returns counters
plus an encoded latency histogram. Latencies count from the *intended* send
time, so an open-loop run that falls behind shows it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

from portao.bench.latency import Samples
from portao.bench.link import PORTAO, Dialect, Link, decode_said, open_link, source_address
from portao.bench.sio import SOCKETIO
from portao.session.auth import mint_token

TOKEN_TTL_S = 6 * 3600
ROOM_PATTERNS = ["bench.*"]
#: Open-loop sends are scheduled this often (uvloop's timer resolution is ~1 ms).
TICK_S = 0.001
#: After the window, wait this long with no answer/push before calling the rest lost.
QUIET_S = 0.5
CHURN_TOKENS = 256
DIALECTS: dict[str, Dialect] = {"portao": PORTAO, "socketio": SOCKETIO}


@dataclass(frozen=True, slots=True)
class Plan:
    """One process's part of a run."""

    scenario: str
    url: str  # tcp://H:P or ws://H:P/path
    host: str
    dialect: str  # portao | socketio
    index: int
    connections: int
    first: int  # global number of this process's first connection
    secret: str
    duration_s: float
    warmup_s: float
    rate: float  # this process's offered calls (rpc) or messages (fanout) per second; 0: closed
    depth: int  # calls in flight per connection in a closed loop
    route: str
    payload_bytes: int
    room: str
    connect_concurrency: int
    timeout_s: float


class Scenario:
    """Connects this process's share and records what comes back."""

    name: ClassVar[str]

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.links: list[Link] = []
        self.samples = Samples()
        self.errors: Counter[str] = Counter()
        self.connect_errors: Counter[str] = Counter()
        self.closed_by: Counter[str] = Counter()
        self.done = 0
        self.window = (float("inf"), float("inf"))
        self.last_answer = 0.0
        self.dialect = DIALECTS[plan.dialect]
        self.route = plan.route.encode()
        self.data = b'"' + b"x" * plan.payload_bytes + b'"'

    # -- connecting ---------------------------------------------------------------

    def token(self, number: int) -> str:
        return mint_token(
            self.plan.secret, f"b{number}", rooms=ROOM_PATTERNS, ttl_s=TOKEN_TTL_S, now=time.time()
        )

    async def connect(self) -> None:
        """Open and authenticate this process's connections, a bounded number at once."""
        gate = asyncio.Semaphore(self.plan.connect_concurrency)

        async def one(number: int) -> None:
            async with gate:
                link = await self.open(number)
                if link is not None:
                    self.links.append(link)

        async with asyncio.TaskGroup() as group:
            for i in range(self.plan.connections):
                group.create_task(one(self.plan.first + i))

    async def open(self, number: int, token: str | None = None) -> Link | None:
        """One authenticated (and, for fanout, subscribed) link, or None on failure."""
        plan = self.plan
        try:
            link = await open_link(
                plan.url, source_address(plan.host, number), self, self.dialect, plan.timeout_s
            )
        except TimeoutError:
            self.connect_errors["connect timeout"] += 1
            return None
        except OSError as exc:
            self.connect_errors[type(exc).__name__] += 1
            return None
        try:
            auth = self.dialect.auth(token or self.token(number))
            answer = await link.request(auth, plan.timeout_s)
            if answer.op == "ok":
                answer = await self.after_auth(link)
        except (TimeoutError, ConnectionError) as exc:
            self.connect_errors["auth timeout" if isinstance(exc, TimeoutError) else "closed"] += 1
            link.close()
            return None
        if answer.op != "ok":
            self.connect_errors[f"{answer.op} {answer.code}"] += 1
            link.close()
            return None
        return link

    async def after_auth(self, link: Link) -> Any:
        """Hook for a request after `auth` (fanout subscribes); returns the last answer."""
        return _OK

    # -- running ------------------------------------------------------------------

    async def run(self, start_at: float) -> None:
        plan = self.plan
        begin = start_at + plan.warmup_s
        self.window = (begin, begin + plan.duration_s)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await self.drive(self.window[1])
        await self.settle()

    async def drive(self, end: float) -> None:
        """Generate load until `end`."""
        await asyncio.sleep(max(0.0, end - time.time()))

    async def settle(self) -> None:
        """Wait until answers stop coming (bounded by the request timeout)."""
        deadline = time.time() + self.plan.timeout_s
        self.last_answer = time.time()
        while time.time() < deadline and self.is_waiting():
            if time.time() - self.last_answer > QUIET_S:
                break
            await asyncio.sleep(0.05)

    def is_waiting(self) -> bool:
        return any(link.pending for link in self.links)

    def in_window(self, at: float) -> bool:
        return self.window[0] <= at <= self.window[1]

    # -- Sink ---------------------------------------------------------------------

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        self.last_answer = now
        if code is not None:
            self.errors[code] += 1
        elif self.window[0] <= started and now <= self.window[1]:
            self.done += 1
            self.samples.record(now - started)

    def pushed(self, link: Link, data: bytes, now: float) -> None:
        self.last_answer = now

    def lost(self, link: Link, code: str | None) -> None:
        self.closed_by[code or "closed"] += 1

    # -- reporting ----------------------------------------------------------------

    def progress(self) -> dict[str, int]:
        errors = sum(self.errors.values())
        return {"connected": len(self.links), "done": self.done, "errors": errors}

    def result(self) -> dict[str, Any]:
        return {
            "connected": len(self.links),
            "connect_errors": dict(self.connect_errors),
            "done": self.done,
            "errors": dict(self.errors),
            "closed_by": dict(self.closed_by),
            "unanswered": sum(len(link.pending) for link in self.links),
            "histogram": self.samples.encoded(),
        }

    async def aclose(self) -> None:
        for link in self.links:
            link.close()
        await asyncio.sleep(0)


class _Ok:
    op = "ok"
    code = None


_OK = _Ok()


class Idle(Scenario):
    """Hold connections; every one answers one ping during the hold."""

    name = "idle"

    async def drive(self, end: float) -> None:
        gate = asyncio.Semaphore(self.plan.connect_concurrency)
        spacing = self.plan.duration_s / max(1, len(self.links)) / 2

        async def ping(link: Link, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.time()))
            async with gate:
                started = time.time()
                try:
                    answer = await link.request(self.dialect.ping(), self.plan.timeout_s)
                except (TimeoutError, ConnectionError):
                    self.errors["ping unanswered"] += 1
                    return
                if answer.op == "pong":
                    self.completed(link, started, time.time(), None)
                else:
                    self.errors[f"{answer.op} {answer.code}"] += 1

        begin = time.time()
        async with asyncio.TaskGroup() as group:
            for i, link in enumerate(self.links):
                group.create_task(ping(link, begin + i * spacing))
        await super().drive(end)

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        self.done += 1
        self.samples.record(now - started)


class Rpc(Scenario):
    """Calls: a closed loop (`depth` in flight per connection) or an offered rate."""

    name = "rpc"

    async def drive(self, end: float) -> None:
        route, data = self.route, self.data
        if not self.plan.rate:
            now = time.time()
            for link in self.links:
                for _ in range(self.plan.depth):
                    link.call(route, data, now)
            await super().drive(end)
            return
        interval = 1.0 / self.plan.rate
        start = time.time()
        sent = 0
        links = self.links
        count = len(links)
        while links:
            now = time.time()
            if now >= end:
                break
            due = int((now - start) / interval) + 1
            while sent < due:
                links[sent % count].call(route, data, start + sent * interval)
                sent += 1
            await asyncio.sleep(TICK_S)

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        super().completed(link, started, now, code)
        if not self.plan.rate and now < self.window[1] and not link.closed:
            link.call(self.route, self.data, now)


class Fanout(Scenario):
    """Room broadcast: members `sub` a room; process 0's sender calls `chat.say`."""

    name = "fanout"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.sender: Link | None = None
        self.delivered = 0
        self.sent = 0

    async def after_auth(self, link: Link) -> Any:
        return await link.request(self.dialect.sub(self.plan.room), self.plan.timeout_s)

    async def connect(self) -> None:
        await super().connect()
        if self.plan.index == 0:
            self.sender = await self.open(-1)

    async def drive(self, end: float) -> None:
        sender = self.sender
        if sender is None:
            await super().drive(end)
            return
        room = self.plan.room.encode()
        interval = 1.0 / self.plan.rate if self.plan.rate else 0.0
        start = time.time()
        while True:
            now = time.time()
            if now >= end:
                break
            if interval:
                due = start + self.sent * interval
                await asyncio.sleep(max(0.0, due - now))
            elif sender.pending:
                await asyncio.sleep(TICK_S)  # closed loop: one message at a time
                continue
            stamp = time.time()
            data = b'{"room":"%s","text":"%r"}' % (room, stamp)
            sender.call(b"chat.say", data, stamp)
            self.sent += 1

    def completed(self, link: Link, started: float, now: float, code: str | None) -> None:
        self.last_answer = now
        if code is not None:
            self.errors[code] += 1

    def pushed(self, link: Link, data: bytes, now: float) -> None:
        self.last_answer = now
        try:
            stamp = float(decode_said(data).text)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            self.errors["foreign push"] += 1
            return
        if self.in_window(stamp):
            self.delivered += 1
            self.done += 1
            self.samples.record(now - stamp)

    def is_waiting(self) -> bool:
        return True  # pushes may still arrive: wait for quiet

    def result(self) -> dict[str, Any]:
        return super().result() | {"messages": self.sent, "deliveries": self.delivered}


class Churn(Scenario):
    """`connections` loops of connect → auth → close, as fast as each can."""

    name = "churn"

    async def connect(self) -> None:
        self.tokens = [self.token(self.plan.first + i) for i in range(CHURN_TOKENS)]

    async def drive(self, end: float) -> None:
        counter = iter(range(self.plan.first, 1 << 62))

        async def loop() -> None:
            while time.time() < end:
                number = next(counter)
                started = time.time()
                link = await self.open(number, self.tokens[number % CHURN_TOKENS])
                if link is None:
                    continue
                link.abort()
                now = time.time()
                if self.in_window(started):
                    self.done += 1
                    self.samples.record(now - started)

        async with asyncio.TaskGroup() as group:
            for _ in range(self.plan.connections):
                group.create_task(loop())

    def progress(self) -> dict[str, int]:
        return super().progress() | {"errors": sum(self.connect_errors.values())}

    def is_waiting(self) -> bool:
        return False


SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (Idle, Rpc, Fanout, Churn)
}

"""One Redis connection pool kept honest: timeouts, readiness, batching, errors.

- Every call has a timeout: the URL's `socket_timeout` (default `DEFAULT_TIMEOUT_S`)
  for a command, `MAX_BLOCK_S` more for a blocking read. redis-py's own retries are
  off: a write whose answer was lost may have happened, so the caller decides.
- A connection error or timeout marks the link down: calls fail fast with
  `BrokerUnavailable` until a PING, retried with exponential backoff and jitter,
  succeeds. Readiness changes are logged on "portao.broker".
- Short commands go through one flusher: whatever an event-loop turn queued is sent
  as one pipeline (no round trip per publish or reply), each caller's future
  resolved with its own raw reply (bytes, integers, lists: no redis-py response
  callbacks). A script the server lost (NOSCRIPT: it did not run) is loaded and
  run again.
- The hot path bypasses redis-py: the flusher and each blocking reader (a gateway's
  inbox, a worker's XREADGROUP) have a `Lane`, a connection of their own speaking
  RESP through hiredis (`redis_resp`). redis-py keeps the rest: health PINGs,
  pub/sub, loading scripts.

redis exceptions are translated here, and only here, into `BrokerError`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from portao.broker.redis_resp import ReplyError, RespConnection
from portao.broker.redis_scripts import Script
from portao.errors import BrokerError, BrokerUnavailable, ConfigError

log = logging.getLogger("portao.broker")

T = TypeVar("T")

#: Command timeout and connect timeout unless the URL sets `socket_timeout` /
#: `socket_connect_timeout`: a stalled server answers `unavailable` this fast.
DEFAULT_TIMEOUT_S = 2.0
#: Longest BLOCK of a blocking read; its timeout is this plus the command timeout.
MAX_BLOCK_S = 1.0
#: Reconnect backoff: doubles from MIN to MAX, each wait drawn from [50 %, 100 %].
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
#: PING period while the link is up (finds a dead or stalled server when idle).
HEALTH_INTERVAL_S = 1.0
#: Most commands, and about the most payload bytes, in one flushed pipeline.
MAX_BATCH = 1000
MAX_BATCH_BYTES = 1 << 20
#: Pool size unless the URL sets `max_connections`.
MAX_CONNECTIONS = 256


class NoGroup(Exception):
    """A blocking read found a stream without its consumer group (or lost it)."""


@dataclass(slots=True, eq=False)
class _Command:
    """One command waiting for the flusher, and the future its caller awaits.

    With `items`, the command is one caller's share of a batched script: `args`
    is the call without the items, and adjacent commands with equal `args` are
    sent as one call whose reply holds one result per share.
    """

    args: tuple[Any, ...]
    script: Script | None
    future: asyncio.Future[Any]
    items: tuple[Any, ...] | None = None
    # Turns the reply into the future's result; a BrokerError it raises fails the future.
    finish: Callable[[Any], Any] | None = None


@dataclass(slots=True, eq=False)
class _Call:
    """What goes on the wire: one command, or the shares of one batched script call."""

    args: list[Any]
    script: Script | None
    commands: list[_Command]

    @property
    def batched(self) -> bool:
        return self.commands[0].items is not None


class Lane:
    """A connection of one sequential user of the link (the flusher, a blocking reader).

    Opened on demand and again after a failure; replies are raw. A call that fails
    or is abandoned (timeout, cancellation) closes the connection, since the replies
    still owed would answer the next call.
    """

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._conn: RespConnection | None = None

    async def execute(self, commands: Sequence[Sequence[Any]], timeout_s: float) -> list[Any]:
        link = self._link
        link.check_ready()
        try:
            async with asyncio.timeout(timeout_s):
                conn = self._conn
                if conn is None or not conn.is_open:
                    conn = self._conn = await RespConnection.open(
                        link._options, link.client.connection_pool.make_connection()
                    )
                return await conn.execute(commands)
        except (OSError, TimeoutError) as exc:
            self.close()
            link._link_down(exc)
            raise BrokerUnavailable(f"redis at {link.where}: {_reason(exc)}") from None
        except BaseException:
            self.close()
            raise

    async def read(self, commands: Sequence[Sequence[Any]], timeout_s: float) -> list[Any]:
        """`execute`, with an error reply raised: `NoGroup` for a consumer group that
        is missing or gone, `BrokerUnavailable` for any other."""
        replies = await self.execute(commands, timeout_s)
        for reply in replies:
            if isinstance(reply, ReplyError):
                if str(reply).startswith(("NOGROUP", "UNBLOCKED")):
                    raise NoGroup(str(reply))
                raise BrokerUnavailable(f"redis refused: {reply}")
        return replies

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RedisLink:
    """The pool, its readiness, and the command flusher (see the module docstring)."""

    def __init__(self, url: str) -> None:
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise ConfigError(f"broker: invalid Redis URL: {exc}") from None
        self.where = _describe(url)
        self.timeout_s = float(options.pop("socket_timeout", None) or DEFAULT_TIMEOUT_S)
        options.setdefault("socket_connect_timeout", DEFAULT_TIMEOUT_S)
        options.setdefault("max_connections", MAX_CONNECTIONS)
        options.update(
            # The socket timeout only backs up our own per-call timeouts; it must
            # outlast the longest blocking read.
            socket_timeout=self.timeout_s + MAX_BLOCK_S + 1.0,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            decode_responses=False,
        )
        self._options = options
        # Any: redis-py's inline annotations and the types-redis stubs disagree on
        # most of this API, and its replies are untyped either way.
        self.client: Any = None
        self._closed = False
        self._ready = False
        self._ready_event = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: deque[_Command] = deque()
        self._outbox_event = asyncio.Event()
        self._lanes: list[Lane] = []
        self._flusher = self.lane()
        self._loop: asyncio.AbstractEventLoop  # set by `open`: no call queues before it

    def lane(self) -> Lane:
        """A connection of one's own (closed with the link, or by `drop_lane`)."""
        lane = Lane(self)
        self._lanes.append(lane)
        return lane

    def drop_lane(self, lane: Lane) -> None:
        lane.close()
        with contextlib.suppress(ValueError):
            self._lanes.remove(lane)

    @property
    def is_open(self) -> bool:
        return self.client is not None and not self._closed

    def is_ready(self) -> bool:
        return self._ready

    async def open(self) -> None:
        """Create the pool and the background tasks; one PING decides readiness now."""
        if self.client is not None:
            return
        self._closed = False
        self._ready_event.clear()
        self._loop = asyncio.get_running_loop()
        self.client = Redis(connection_pool=ConnectionPool(**self._options))
        self._tasks = [
            asyncio.create_task(self._watch(), name="portao-redis-watch"),
            asyncio.create_task(self._flush_forever(), name="portao-redis-flush"),
        ]
        error = await self._ping()
        if error is None:
            self._link_up()
        else:
            self._link_down(error)

    async def aclose(self) -> None:
        """Stop the tasks, fail queued commands, close the pool."""
        client = self.client
        if client is None:
            return
        self.client = None
        self._closed = True
        self._ready = False
        self._ready_event.set()  # waiters wake and see the link is closed
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._outbox:
            _fail(self._outbox.popleft().future, BrokerUnavailable("redis broker closed"))
        for lane in self._lanes:
            lane.close()
        for close in (client.aclose, client.connection_pool.disconnect):
            with contextlib.suppress(RedisError, OSError):
                await close()
        log.info("redis %s: closed", self.where)

    def check_ready(self) -> None:
        """Raise `BrokerUnavailable` unless the link is open and up."""
        if not self.is_open:
            raise BrokerUnavailable("redis broker is not connected")
        if not self._ready:
            raise BrokerUnavailable(f"redis at {self.where} is unreachable")

    async def wait_ready(self, deadline: float | None) -> None:
        """Wait (until the loop time `deadline`, or for ever) for the link to be up."""
        while True:
            if not self.is_open:
                raise BrokerUnavailable("redis broker is not connected")
            if self._ready:
                return
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready_event.wait()  # set by link up, and by aclose
            except TimeoutError:
                raise BrokerUnavailable(f"redis at {self.where} is unreachable") from None

    # -- readiness -----------------------------------------------------------------

    def _link_up(self) -> None:
        if not self._ready and not self._closed:
            self._ready = True
            self._ready_event.set()
            log.info("redis %s: link up, broker ready", self.where)

    def _link_down(self, error: BaseException) -> None:
        if self._ready:
            log.warning("redis %s: link down (%s); reconnecting", self.where, _reason(error))
        self._ready = False
        self._ready_event.clear()
        self._link_lost.set()

    async def _ping(self) -> BaseException | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return exc
        return None

    async def _watch(self) -> None:
        """PING while up; after a failure, PING with backoff until the link is back."""
        delay = BACKOFF_MIN_S
        while True:
            if self._ready:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_INTERVAL_S):
                        await self._link_lost.wait()
            self._link_lost.clear()
            error = await self._ping()
            if error is None:
                delay = BACKOFF_MIN_S
                self._link_up()
                continue
            self._link_down(error)
            await asyncio.sleep(jitter(delay))
            delay = min(delay * 2, BACKOFF_MAX_S)

    # -- calls ----------------------------------------------------------------------

    async def run(self, call: Callable[[Any], Awaitable[T]], timeout_s: float) -> T:
        """Run `call(client)` with a timeout, translating redis errors.

        A missing consumer group raises `NoGroup`; a refusal `BrokerUnavailable`;
        a connection error or timeout also marks the link down.
        """
        self.check_ready()
        try:
            async with asyncio.timeout(timeout_s):
                return await call(self.client)
        except ResponseError as exc:
            if str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise NoGroup(str(exc)) from None
            raise BrokerUnavailable(f"redis refused: {exc}") from None
        except (RedisError, OSError, TimeoutError) as exc:
            self._link_down(exc)
            raise BrokerUnavailable(f"redis at {self.where}: {_reason(exc)}") from None

    def submit(self, *args: Any, script: Script | None = None) -> asyncio.Future[Any]:
        """Queue a command for the next flush; the future holds its parsed reply."""
        self.check_ready()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._outbox.append(_Command(args, script, future))
        self._outbox_event.set()
        return future

    def submit_script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        return self.submit(*script_call(script, keys, args), script=script)

    def submit_share(
        self,
        call: tuple[Any, ...],
        items: tuple[Any, ...],
        script: Script,
        finish: Callable[[Any], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one share of a batched script: `call` (from `script_call`) followed by
        every adjacent share's `items`; the future holds this share's result, passed
        through `finish` when given.

        Such a script takes a fixed number of ARGV per share after its own and
        returns a list with one result per share. Merging only adjacent shares
        keeps every command in the order it was submitted.
        """
        self.check_ready()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._outbox.append(_Command(call, script, future, items, finish))
        self._outbox_event.set()
        return future

    async def eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.submit_script(script, keys, args)

    # -- the flusher ------------------------------------------------------------------

    async def _flush_forever(self) -> None:
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            while self._outbox:
                batch = self._take_batch()
                if batch:
                    await self._flush(batch)

    def _take_batch(self) -> list[_Call]:
        """The next calls to send; a command whose caller gave up is never sent."""
        calls: list[_Call] = []
        taken = size = 0
        outbox = self._outbox
        while outbox and taken < MAX_BATCH and size < MAX_BATCH_BYTES:
            command = outbox.popleft()
            if command.future.done():
                continue
            taken += 1
            args, items = command.args, command.items
            if items is None:
                calls.append(_Call(list(args), command.script, [command]))
                size += _bytes_in(args)
                continue
            size += _bytes_in(items)
            last = calls[-1] if calls else None
            if last is not None and last.batched and last.commands[0].args == args:
                last.args.extend(items)
                last.commands.append(command)
            else:
                calls.append(_Call([*args, *items], command.script, [command]))
        return calls

    async def _flush(self, calls: list[_Call]) -> None:
        """Send calls as one pipeline; a script the server lost is loaded and rerun."""
        try:
            replies = await self._pipeline(calls)
            missing = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
            if missing:
                # NOSCRIPT: the script did not run, so running it again is safe.
                for script in {calls[i].script for i in missing}:
                    if script is not None:
                        await self.run(partial(_load, script.source), self.timeout_s)
                rerun = await self._pipeline([calls[i] for i in missing])
                for i, reply in zip(missing, rerun, strict=True):
                    replies[i] = reply
        except BrokerError as exc:
            for call in calls:
                for command in call.commands:
                    _fail(command.future, exc)
            return
        for call, reply in zip(calls, replies, strict=True):
            commands = call.commands
            if isinstance(reply, Exception):
                name = call.script.name if call.script else call.args[0]
                error = BrokerUnavailable(f"redis refused {name}: {reply}")
                for command in commands:
                    _fail(command.future, error)
            elif not call.batched:
                if not commands[0].future.done():
                    commands[0].future.set_result(reply)
            else:
                for command, result in zip(commands, reply, strict=True):
                    future, finish = command.future, command.finish
                    if future.done():
                        continue
                    if finish is None:
                        future.set_result(result)
                        continue
                    try:
                        future.set_result(finish(result))
                    except BrokerError as exc:
                        future.set_exception(exc)

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        return await self._flusher.execute([call.args for call in calls], self.timeout_s)


def script_call(script: Script, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
    """The EVALSHA command running `script` (to keep, for `submit_share`)."""
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _bytes_in(args: tuple[Any, ...]) -> int:
    size = 0
    for arg in args:
        if type(arg) is bytes:
            size += len(arg)
    return size


async def _load(source: str, client: Any) -> Any:
    return await client.script_load(source)


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


def _fail(future: asyncio.Future[Any], error: BrokerError) -> None:
    if not future.done():
        future.set_exception(type(error)(*error.args))


def jitter(delay_s: float) -> float:
    """A backoff wait drawn from [50 %, 100 %] of `delay_s`."""
    return delay_s * random.uniform(0.5, 1.0)


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _describe(url: str) -> str:
    """scheme://host:port/db of a Redis URL: what logs may show (never a password)."""
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}"
    return where + (parts.path if parts.path not in ("", "/") else "/0")

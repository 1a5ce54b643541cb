"""One AMQP connection kept up: reconnect with backoff, channels reopened on use.

The link owns the connection, two shared channels (publishing with confirms, and
declarations) and one supervisor task. When the connection drops, `is_up()` turns
False and the supervisor reconnects with exponential backoff and jitter, then runs
the owner's `on_up` hook (re-declare, re-bind, re-consume) before it reports the link
up again. A channel the broker closed (a declaration it refused, a consumer timeout)
is reopened on next use; a consumer's channel that dies while the connection lives
bounces the whole connection (`fail`), so there is one recovery path, tested once.

aiormq exceptions are translated here into `BrokerUnavailable` (`translate`), with
the broker's own words where it gave some ("NOT_ALLOWED - vhost x not found").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from math import ceil

import aiormq
import aiormq.abc
from aiormq.connection import FrameReceiver, exception_by_code
from pamqp.base import Frame
from pamqp.commands import Connection
from pamqp.frame import FrameTypes
from yarl import URL

from portao.config import Settings
from portao.errors import BrokerUnavailable

log = logging.getLogger("portao.broker")

OnUp = Callable[[aiormq.abc.AbstractConnection], Awaitable[None]]

#: What a failed AMQP operation can raise: protocol errors, a closed channel or
#: connection, a socket error, a timeout.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class LinkTimeouts:
    """Per-phase timeouts of the link, derived from the settings.

    `heartbeat_s`: AMQP has no visibility timeout. A dead worker's messages return
    the moment its connection closes; a frozen one's when the broker misses its
    heartbeats. Twice the visibility timeout (10 s by default) moves those messages on
    within seconds, yet does not cut off a busy process whose loop skipped a beat.
    `operation_s` bounds a publisher confirm or a declaration: past it the outcome is
    unknown and the caller gets `BrokerUnavailable`. It does not follow the visibility
    timeout: a closed link fails every confirm at once (a silent one once its
    heartbeats are missed), so a short bound mostly cuts confirms queued behind a
    burst (10,000 calls from two gateways wait seconds on a busy 2-core machine) and
    answers `unavailable` for calls the broker took and runs.
    """

    heartbeat_s: int = 10
    connect_s: float = 5.0
    operation_s: float = 10.0
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkTimeouts:
        return cls(heartbeat_s=max(2, ceil(2 * settings.visibility_timeout_s)))


def backoff_s(attempt: int, timeouts: LinkTimeouts) -> float:
    """Exponential backoff with jitter (half to full), so clients do not stampede."""
    ceiling: float = min(timeouts.backoff_max_s, timeouts.backoff_min_s * 2.0**attempt)
    return ceiling * random.uniform(0.5, 1.0)


@asynccontextmanager
async def translate(what: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound `what` in time; turn its aiormq, socket or timeout errors into
    `BrokerUnavailable` (a stalled broker must not hang a caller)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except LINK_ERRORS as exc:
        raise BrokerUnavailable(f"RabbitMQ: {what} failed: {reason(exc)}") from exc


def reason(exc: BaseException) -> str:
    """An aiormq or socket error in words: the broker's reply text when it sent one."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    texts = [arg for arg in exc.args if isinstance(arg, str) and arg]
    return texts[-1] if texts else repr(exc)


class _HandshakeFrames(FrameReceiver):
    """Frames of the handshake, where a `Connection.Close` raises with its reply text."""

    async def get_frame(self) -> tuple[int, int, FrameTypes]:
        received = await super().get_frame()
        if isinstance(received[2], Connection.Close):
            raise exception_by_code(received[2])
        return received


class _Connection(aiormq.Connection):
    """aiormq's connection, saying why the broker refused the handshake.

    aiormq 7 checks a handshake answer against the frames it expects before it looks
    for `Connection.Close`, so a refused `Connection.Open` (a missing vhost, one the
    user may not use) surfaced as an `InvalidFrameError` naming the frame's repr.
    """

    @staticmethod
    async def _rpc(
        request: Frame,
        writer: asyncio.StreamWriter,
        frame_receiver: FrameReceiver,
        wait_response: bool = True,
    ) -> FrameTypes | None:
        frames = _HandshakeFrames(frame_receiver.reader)
        return await aiormq.Connection._rpc(request, writer, frames, wait_response)


class _ChannelSlot:
    """A channel of the current connection, reopened if the broker closed it."""

    def __init__(self, confirms: bool) -> None:
        self._confirms = confirms
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    def reset(self) -> None:
        self._channel = None

    async def get(self, connection: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await open_channel(connection, confirms=self._confirms)
            return self._channel


async def open_channel(
    connection: aiormq.abc.AbstractConnection, *, confirms: bool
) -> aiormq.abc.AbstractChannel:
    """A new channel; `confirms` turns on publisher confirms and returns as errors."""
    try:
        return await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    except RuntimeError as exc:  # aiormq: the connection closed under us
        raise BrokerUnavailable(f"RabbitMQ: opening a channel failed: {exc}") from exc


class AmqpLink:
    """The connection, its shared channels, and the task that keeps it up."""

    def __init__(self, url: str, timeouts: LinkTimeouts, on_up: OnUp) -> None:
        parsed = URL(url)
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=timeouts.heartbeat_s)
        self._url = parsed
        self.timeouts = timeouts
        # Restoring is a few round trips per route and inbox: a generous bound.
        self._restore_s = 3 * timeouts.operation_s
        self._on_up = on_up
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._up = False
        self._supervisor: asyncio.Task[None] | None = None
        self._publisher = _ChannelSlot(confirms=True)
        self._admin = _ChannelSlot(confirms=False)
        self._bounce = asyncio.Event()

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return str(self._url.with_password(None) if self._url.password else self._url)

    def is_up(self) -> bool:
        return self._up

    async def start(self) -> None:
        """Connect once (`BrokerUnavailable` if that fails), then keep the link up."""
        if self._supervisor is not None:
            return
        connection = await self._open()
        self._supervisor = asyncio.create_task(self._supervise(connection), name="portao-amqp-link")

    async def aclose(self) -> None:
        self._up = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._connection is not None:
            await _close(self._connection, "closed by portao")
            self._connection = None

    def connection(self) -> aiormq.abc.AbstractConnection:
        """The live connection, or `BrokerUnavailable` while the link is down."""
        if not self._up or self._connection is None or self._connection.is_closed:
            raise BrokerUnavailable("RabbitMQ link is down; reconnecting")
        return self._connection

    async def publisher(self) -> aiormq.Channel:
        """The shared channel in confirm mode (many publishes in flight on it).

        Typed as the concrete channel: its `basic_publish(wait=False)` is not in the ABC.
        """
        channel = await self._publisher.get(self.connection())
        assert isinstance(channel, aiormq.Channel)
        return channel

    async def admin(self, connection: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        """The channel for declarations; `connection` lets `on_up` use it while down."""
        return await self._admin.get(connection)

    def fail(self, reason: str) -> None:
        """Drop the connection so the supervisor rebuilds everything on a new one."""
        if self._up:
            log.warning("RabbitMQ: %s; reconnecting", reason)
            self._up = False
            self._bounce.set()

    async def _open(self) -> aiormq.abc.AbstractConnection:
        """Connect, then run `on_up`; the link is up only once both succeeded."""
        connection = _Connection(self._url)
        try:
            async with translate(f"connecting to {self.safe_url}", self.timeouts.connect_s):
                await connection.connect()
            self._publisher.reset()
            self._admin.reset()
            self._bounce.clear()
            self._connection = connection
            async with translate("restoring queues, bindings and consumers", self._restore_s):
                await self._on_up(connection)
        except BaseException:
            await _close(connection, "set-up failed")
            raise
        self._up = True
        log.info("RabbitMQ link up (vhost %s) at %s", self._url.path[1:] or "/", self.safe_url)
        return connection

    async def _supervise(self, connection: aiormq.abc.AbstractConnection) -> None:
        while True:
            await self._wait_down(connection)
            self._up = False
            log.warning("RabbitMQ link to %s lost; reconnecting", self.safe_url)
            connection = await self._reconnect()

    async def _wait_down(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Return once the connection closed, closing it first if `fail` was called."""
        bounce = asyncio.create_task(self._bounce.wait())
        try:
            await asyncio.wait({connection.closing, bounce}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            bounce.cancel()
        await _close(connection, "reset by portao")

    async def _reconnect(self) -> aiormq.abc.AbstractConnection:
        attempt = 0
        while True:
            await asyncio.sleep(backoff_s(attempt, self.timeouts))
            try:
                return await self._open()
            except BrokerUnavailable as exc:
                log.info("RabbitMQ reconnect attempt %d failed: %s", attempt + 1, exc)
            except Exception:  # a bug must not end the link's only keeper
                log.exception("RabbitMQ reconnect attempt %d failed", attempt + 1)
            attempt += 1


async def _close(connection: aiormq.abc.AbstractConnection, why: str) -> None:
    """Close with an error, not aiormq's default CancelledError: publishes waiting on
    a confirm then fail as `BrokerUnavailable` instead of looking cancelled."""
    if not connection.is_closed:
        with suppress(*LINK_ERRORS):
            await connection.close(aiormq.exceptions.AMQPConnectionError(why))

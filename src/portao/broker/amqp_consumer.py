"""A channel consuming queues into a local buffer: claims and batched acks.

Workers and gateway inboxes both read this way: `basic.consume` with manual acks and
a prefetch bound, the broker pushes deliveries, the consumer callback only appends
them to an `asyncio.Queue`, and `take` hands out what arrived (waiting up to a
timeout). A delivery tag is valid only on the channel it came on: after the channel
closed (link lost, consumer released) its deliveries are back in their queue, so a
stale handle is never acked, and `is_live` reports the claim lost.

Claims: a worker's consumer may keep a message `claim_s` (the visibility timeout)
after `take` or its last `extend`. AMQP itself only takes messages back when the
channel closes, so the broker releases (`stop`s) a consumer that let a claim lapse:
everything it held returns to the queues at once, as from a dead worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import aiormq.abc

from portao.broker.amqp_link import LINK_ERRORS, open_channel, translate
from portao.errors import BrokerUnavailable

log = logging.getLogger("portao.broker")


@dataclass(frozen=True, slots=True, eq=False)
class Handle:
    """Where a delivery is acked: the channel it arrived on, and its tag there."""

    channel: aiormq.abc.AbstractChannel
    tag: int


@dataclass(frozen=True, slots=True, eq=False)
class Received:
    """One delivery as the callback buffered it."""

    queue: str
    message: aiormq.abc.DeliveredMessage
    handle: Handle


def plan_acks(outstanding: set[int], done: Iterable[int]) -> tuple[int | None, list[int]]:
    """Split acks into one `multiple` ack and single ones: (multiple up to, singles).

    An ack with `multiple` covers every outstanding tag up to it, so it may only end
    a gapless run of finished tags starting at the lowest outstanding one; the rest
    are acked one by one (all written in one turn).
    """
    finished = sorted(outstanding.intersection(done))
    pending = sorted(outstanding)
    run = 0
    while run < len(finished) and finished[run] == pending[run]:
        run += 1
    if run < 2:
        return None, finished
    return finished[run - 1], finished[run:]


class Consumer:
    """A channel consuming `queues` (with `prefetch` each) into one buffer."""

    def __init__(
        self,
        name: str,
        prefetch: int,
        on_lost: Callable[[str], None],
        timeout_s: float,
        claim_s: float | None = None,
    ) -> None:
        self.name = name
        self.queues: list[str] = []
        self._prefetch = prefetch
        self._on_lost = on_lost
        self._timeout_s = timeout_s
        self._claim_s = claim_s
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._starting: aiormq.abc.AbstractChannel | None = None
        self._consuming: set[str] = set()
        self._unacked: set[int] = set()
        self._claims: dict[int, float] = {}  # tag -> loop time the claim lapses
        self._buffer: asyncio.Queue[Received] = asyncio.Queue()
        self._settled = asyncio.Event()  # set while no start is in progress
        self._settled.set()

    async def start(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Consume every queue on a fresh channel (first start, or after a reconnect).

        The channel counts as this consumer's only once every queue is consumed: a
        queue that cannot be (a quorum queue with no leader) fails this start with
        `BrokerUnavailable`, and closing the half-made channel is no link loss. A
        queue with a backlog delivers as soon as it is consumed: those deliveries
        wait in the buffer until the start ended (see `take`).
        """
        self._settled.clear()
        try:
            await self._start(connection)
        finally:
            self._settled.set()

    async def _start(self, connection: aiormq.abc.AbstractConnection) -> None:
        self._consuming = set()
        self._unacked = set()
        self._claims = {}
        async with translate(f"opening a channel for {self.name}", self._timeout_s):
            channel = await open_channel(connection, confirms=False)
        self._starting = channel
        try:
            async with translate(f"starting consumer {self.name}", self._timeout_s):
                await channel.basic_qos(prefetch_count=self._prefetch)
                for queue in list(self.queues):
                    await self._consume(channel, queue)
        except BrokerUnavailable:
            with suppress(*LINK_ERRORS):
                await channel.close()
            raise
        finally:
            self._starting = None
        self._channel = channel
        channel.closing.add_done_callback(lambda _: self._closed(channel))

    async def add(self, queues: Sequence[str]) -> None:
        """Consume more queues; on the live channel now, else at the next `start`."""
        for queue in queues:
            if queue not in self.queues:
                self.queues.append(queue)
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        async with translate(f"consuming for {self.name}", self._timeout_s):
            for queue in queues:
                await self._consume(channel, queue)

    async def _consume(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        if queue in self._consuming:
            return
        self._consuming.add(queue)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            tag = message.delivery_tag
            if tag is None or channel not in (self._channel, self._starting):
                return
            self._unacked.add(tag)
            self._buffer.put_nowait(Received(queue, message, Handle(channel, tag)))

        await channel.basic_consume(queue, on_message, no_ack=False)

    def _closed(self, channel: aiormq.abc.AbstractChannel) -> None:
        if channel is self._channel:  # not closed by `stop`
            self._on_lost(f"the channel of consumer {self.name} closed")

    def is_running(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def is_live(self, handle: Handle) -> bool:
        """True while the delivery's channel is this consumer's open channel."""
        return handle.channel is self._channel and not handle.channel.is_closed

    async def take(self, max_count: int, timeout_s: float) -> list[Received]:
        """Up to `max_count` live deliveries, waiting up to `timeout_s` for the first.

        Nothing is judged live or stale while a start is in progress: the deliveries
        of the channel being started would look stale, and dropped unacked they
        would stall the channel for good. They are handed out once it ended (on a
        reconnect, in the turn the link is reported up, so their replies go out).
        """
        taken: list[Received] = []
        held: Received | None = None
        try:
            async with asyncio.timeout(timeout_s):
                while not taken:
                    await self._settled.wait()
                    if held is not None:
                        self._keep_if_live(taken, held)
                        held = None
                    self._drain(taken, max_count)
                    if not taken:
                        held = await self._buffer.get()
        except TimeoutError:
            if held is not None:  # not judged yet: the next take does
                self._buffer.put_nowait(held)
            return []
        self.extend(r.handle for r in taken)
        return taken

    def _drain(self, taken: list[Received], max_count: int) -> None:
        while len(taken) < max_count and not self._buffer.empty():
            self._keep_if_live(taken, self._buffer.get_nowait())

    def _keep_if_live(self, taken: list[Received], received: Received) -> None:
        if self.is_live(received.handle):
            taken.append(received)

    def extend(self, handles: Iterable[Handle]) -> None:
        """Push the claims on live deliveries out by `claim_s` from now."""
        if self._claim_s is None:
            return
        lapse_at = asyncio.get_running_loop().time() + self._claim_s
        for handle in handles:
            if self.is_live(handle):
                self._claims[handle.tag] = lapse_at

    def claims_lapse_at(self) -> float | None:
        """Loop time at which the oldest claim lapses; None when nothing is claimed."""
        return min(self._claims.values(), default=None)

    async def ack(self, handles: Iterable[Handle]) -> None:
        """Ack live deliveries in as few frames as the tags allow, written in one turn.

        Stale handles are skipped: their messages already went back to the queue.
        """
        channel = self._channel
        tags = [h.tag for h in handles if self.is_live(h)]
        if channel is None or not tags:
            return
        up_to, singles = plan_acks(self._unacked, tags)
        self._unacked.difference_update(tags)
        for tag in tags:
            self._claims.pop(tag, None)
        frames = ([(up_to, True)] if up_to is not None else []) + [(t, False) for t in singles]
        async with translate(f"acking for {self.name}", self._timeout_s):
            for i, (tag, multiple) in enumerate(frames):
                await channel.basic_ack(tag, multiple=multiple, wait=i == len(frames) - 1)

    async def stop(self) -> None:
        """Stop consuming; what it held goes back to its queues. `start` resumes."""
        channel, self._channel = self._channel, None
        self._claims = {}
        if channel is not None and not channel.is_closed:
            async with translate(f"stopping consumer {self.name}", self._timeout_s):
                await channel.close()

"""The in-process broker and state store: `portao run`, tests, and the reference.

Everything lives in one event loop's memory and nothing survives the process. It
follows every rule the Redis and RabbitMQ backends follow, so the contract suite
(tests/broker) holds them all to the same semantics:

- a route queue is a FIFO of undelivered messages plus the pending claims, kept in
  claim-time order, so publish, fetch, reclaim of the oldest expired claim, extend and
  ack are O(1);
- a claim is held by (consumer, deliveries): once another consumer reclaimed it, the
  old holder's `extend` reports it lost and its `ack` is ignored;
- each gateway has an ordered, capped inbox; user and room bindings pick the inboxes
  a push reaches;
- a gateway with no heartbeat for `presence_ttl_s` loses its inbox, bindings and room
  members. Expiry is checked lazily on access (and swept on every heartbeat) against an
  injectable clock: no background task, and tests drive time.

Waiting (`fetch`, `read_inbox`) parks on futures and events that writers wake: no
polling loop. After `aclose` every operation raises `BrokerUnavailable`, as a real
broker whose link is down would.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from portao.broker.base import DeadLetter, Delivery, Member
from portao.config import Settings
from portao.envelope import Envelope, InboxMessage
from portao.errors import BrokerUnavailable, QueueFull, UnknownRoute

log = logging.getLogger("portao.broker")

#: Messages kept per gateway inbox. A gateway that stops reading (a stalled loop, a
#: bug) must not grow the process's memory forever: past this the oldest are dropped
#: and counted in `MemoryStats.inbox_overflow`.
INBOX_LIMIT = 100_000

Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(slots=True)
class MemoryStats:
    """What the memory broker dropped or reclaimed, for metrics and tests."""

    inbox_dropped: int = 0  # sent to an unknown, closed or expired inbox
    inbox_overflow: int = 0  # oldest messages pushed out of a full inbox
    dead_letters_overflow: int = 0  # oldest dead letters pushed out (bound: max_queue_length)
    reclaimed: int = 0  # deliveries taken over from a consumer past its visibility timeout


@dataclass(slots=True, eq=False)
class _Claim:
    envelope: Envelope
    consumer: str
    expires_at: float
    deliveries: int


class _RouteQueue:
    """One route: undelivered FIFO, pending claims (oldest first), dead letters."""

    __slots__ = ("dead", "pending", "undelivered", "waiters")

    def __init__(self, dead_limit: int) -> None:
        self.undelivered: deque[tuple[int, Envelope]] = deque()
        # OrderedDict, not dict: popping and peeking at the front stay O(1) under churn.
        self.pending: OrderedDict[int, _Claim] = OrderedDict()
        self.dead: deque[DeadLetter] = deque(maxlen=dead_limit)
        # Fetchers parked on this route (an ordered set: oldest waiter woken first).
        self.waiters: dict[asyncio.Future[None], None] = {}

    @property
    def backlog(self) -> int:
        return len(self.undelivered) + len(self.pending)

    def take(self, consumer: str, now: float, visibility_s: float) -> Delivery | None:
        """Claim the oldest expired pending message, else the next undelivered one."""
        if self.pending:
            handle, claim = next(iter(self.pending.items()))
            if claim.expires_at <= now:
                claim.consumer = consumer
                claim.expires_at = now + visibility_s
                claim.deliveries += 1
                self.pending.move_to_end(handle)
                return Delivery(claim.envelope, claim.deliveries, handle)
        if self.undelivered:
            handle, envelope = self.undelivered.popleft()
            self.pending[handle] = _Claim(envelope, consumer, now + visibility_s, 1)
            return Delivery(envelope, 1, handle)
        return None

    def _held(self, consumer: str, delivery: Delivery) -> int | None:
        """The handle if `consumer` still holds this very delivery, else None."""
        handle = delivery.handle
        if not isinstance(handle, int):
            return None
        claim = self.pending.get(handle)
        if claim is None or claim.consumer != consumer or claim.deliveries != delivery.deliveries:
            return None
        return handle

    def renew(self, consumer: str, delivery: Delivery, expires_at: float) -> bool:
        """Push a held claim's expiry out (to the back of the claim order)."""
        handle = self._held(consumer, delivery)
        if handle is None:
            return False
        self.pending[handle].expires_at = expires_at
        self.pending.move_to_end(handle)
        return True

    def remove(self, consumer: str, delivery: Delivery) -> bool:
        """Drop a held claim for good (ack, dead letter); False if not held."""
        handle = self._held(consumer, delivery)
        if handle is None:
            return False
        del self.pending[handle]
        return True

    def next_expiry(self) -> float | None:
        if not self.pending:
            return None
        return next(iter(self.pending.values())).expires_at

    def wake_one(self) -> None:
        while self.waiters:
            waiter = next(iter(self.waiters))
            del self.waiters[waiter]
            if not waiter.done():
                waiter.set_result(None)
                return


class _Inbox:
    """A gateway's ordered inbox; `event` is set whenever there is something to read."""

    __slots__ = ("event", "messages")

    def __init__(self, limit: int) -> None:
        self.messages: deque[InboxMessage] = deque(maxlen=limit)
        self.event = asyncio.Event()


@dataclass(slots=True, eq=False)
class _Gateway:
    """Everything that lives only as long as the gateway's heartbeat."""

    expires_at: float
    inbox: _Inbox | None = None
    users: set[str] = field(default_factory=set)
    rooms: set[str] = field(default_factory=set)
    members: set[tuple[str, Member]] = field(default_factory=set)


class MemoryBroker:
    """`Broker` and `StateStore` in one process (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.monotonic,
        inbox_limit: int = INBOX_LIMIT,
    ) -> None:
        self._visibility_s = settings.visibility_timeout_s
        self._ttl_s = settings.presence_ttl_s
        self._max_queue = settings.max_queue_length
        self._clock = clock
        self._inbox_limit = inbox_limit
        self._ready = False
        self._handles = itertools.count(1)
        self._turn = 0  # rotates the first route of each fetch: round-robin fairness
        self._queues: dict[str, _RouteQueue] = {}
        self._gateways: dict[str, _Gateway] = {}
        self._user_gateways: dict[str, set[str]] = {}
        self._room_gateways: dict[str, set[str]] = {}
        self._members: dict[str, set[Member]] = {}
        self._once: dict[str, float] = {}
        self._once_expiry: list[tuple[float, str]] = []  # heap, so dead keys leave memory
        self.stats = MemoryStats()

    # -- link -----------------------------------------------------------------------

    async def connect(self) -> None:
        self._ready = True

    async def aclose(self) -> None:
        """Mark the link down and wake every waiter, which then raises."""
        if not self._ready:
            return
        self._ready = False
        for queue in self._queues.values():
            for waiter in list(queue.waiters):
                if not waiter.done():
                    waiter.set_result(None)
        for gateway in self._gateways.values():
            if gateway.inbox is not None:
                gateway.inbox.event.set()

    def is_ready(self) -> bool:
        return self._ready

    def _check_ready(self) -> None:
        if not self._ready:
            raise BrokerUnavailable("memory broker is not connected")

    # -- route queues ---------------------------------------------------------------

    async def register_routes(self, routes: Iterable[str]) -> None:
        self._check_ready()
        for route in routes:
            if route not in self._queues:
                self._queues[route] = _RouteQueue(self._max_queue)

    def _route(self, route: str) -> _RouteQueue:
        try:
            return self._queues[route]
        except KeyError:
            raise UnknownRoute(f"no worker registered route {route!r}") from None

    async def publish(self, envelope: Envelope) -> None:
        self._check_ready()
        queue = self._route(envelope.route)
        if queue.backlog >= self._max_queue:
            raise QueueFull(f"route {envelope.route!r} holds {queue.backlog} messages")
        queue.undelivered.append((next(self._handles), envelope))
        queue.wake_one()

    async def fetch(
        self, consumer: str, routes: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        self._check_ready()
        queues = [self._route(route) for route in routes]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            taken = self._take(consumer, queues, max_count)
            remaining = deadline - loop.time()
            if taken or remaining <= 0:
                return taken
            await self._wait(queues, min(remaining, self._until_reclaim(queues)))
            self._check_ready()

    def _take(self, consumer: str, queues: list[_RouteQueue], max_count: int) -> list[Delivery]:
        """One message per route in turn, starting at a rotating route, up to max_count."""
        if not queues:
            return []
        now = self._clock()
        start = self._turn % len(queues)
        self._turn += 1
        active = queues[start:] + queues[:start]
        taken: list[Delivery] = []
        while active and len(taken) < max_count:
            still: list[_RouteQueue] = []
            for queue in active:
                delivery = queue.take(consumer, now, self._visibility_s)
                if delivery is None:
                    continue
                if delivery.deliveries > 1:
                    self.stats.reclaimed += 1
                taken.append(delivery)
                still.append(queue)
                if len(taken) == max_count:
                    break
            active = still
        return taken

    def _until_reclaim(self, queues: list[_RouteQueue]) -> float:
        """Seconds until a claim on these routes may expire.

        With nothing pending, a claim made from now on expires no sooner than one
        visibility timeout away, so that is the longest a fetcher need sleep.
        """
        now = self._clock()
        expiries = [e for e in (q.next_expiry() for q in queues) if e is not None]
        return min(expiries, default=now + self._visibility_s) - now

    async def _wait(self, queues: list[_RouteQueue], timeout_s: float) -> None:
        """Park until a publish on one of `queues` wakes us, or `timeout_s` passes."""
        waiter = asyncio.get_running_loop().create_future()
        for queue in queues:
            queue.waiters[waiter] = None
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Woken, then cancelled before taking: pass the wakeup on, or a
                # message could sit while another fetcher sleeps.
                for queue in queues:
                    if queue.undelivered:
                        queue.wake_one()
            raise
        finally:
            for queue in queues:
                queue.waiters.pop(waiter, None)

    async def extend(self, consumer: str, deliveries: Sequence[Delivery]) -> list[Delivery]:
        self._check_ready()
        expires_at = self._clock() + self._visibility_s
        lost: list[Delivery] = []
        for delivery in deliveries:
            queue = self._queues.get(delivery.envelope.route)
            if queue is None or not queue.renew(consumer, delivery, expires_at):
                lost.append(delivery)
        return lost

    async def ack(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Remove held deliveries; one reclaimed by another consumer is its to ack."""
        self._check_ready()
        for delivery in deliveries:
            queue = self._queues.get(delivery.envelope.route)
            if queue is not None:
                queue.remove(consumer, delivery)

    async def dead_letter(self, consumer: str, delivery: Delivery, error: str) -> None:
        self._check_ready()
        queue = self._queues.get(delivery.envelope.route)
        if queue is None or not queue.remove(consumer, delivery):
            return  # reclaimed by another consumer: the new holder decides
        if len(queue.dead) == queue.dead.maxlen:
            self.stats.dead_letters_overflow += 1
        queue.dead.append(DeadLetter(delivery.envelope, error))

    async def dead_letters(self, route: str, limit: int = 100) -> list[DeadLetter]:
        self._check_ready()
        queue = self._queues.get(route)
        if queue is None:
            return []
        return list(itertools.islice(queue.dead, limit))

    # -- gateways: liveness and inboxes --------------------------------------------

    def _live(self, gateway_id: str) -> _Gateway | None:
        """The gateway's record if its heartbeat is fresh; an expired one is purged."""
        gateway = self._gateways.get(gateway_id)
        if gateway is not None and gateway.expires_at <= self._clock():
            self._purge(gateway_id, gateway)
            return None
        return gateway

    def _purge(self, gateway_id: str, gateway: _Gateway) -> None:
        log.info("gateway %s missed its heartbeat: dropping its inbox and bindings", gateway_id)
        del self._gateways[gateway_id]
        self._drop_inbox(gateway_id, gateway)
        self._drop_members(gateway)

    def _drop_inbox(self, gateway_id: str, gateway: _Gateway) -> None:
        if gateway.inbox is not None:
            gateway.inbox.messages.clear()
            gateway.inbox.event.set()  # a pending read returns []
            gateway.inbox = None
        for user in gateway.users:
            _discard(self._user_gateways, user, gateway_id)
        for room in gateway.rooms:
            _discard(self._room_gateways, room, gateway_id)
        gateway.users.clear()
        gateway.rooms.clear()

    def _drop_members(self, gateway: _Gateway) -> None:
        for room, member in gateway.members:
            _discard(self._members, room, member)
        gateway.members.clear()

    async def heartbeat(self, gateway_id: str) -> None:
        """Refresh liveness; also sweeps expired gateways nobody touched since."""
        self._check_ready()
        now = self._clock()
        for other, gateway in list(self._gateways.items()):
            if gateway.expires_at <= now:
                self._purge(other, gateway)
        self._gateways.setdefault(gateway_id, _Gateway(now)).expires_at = now + self._ttl_s

    async def open_inbox(self, gateway_id: str) -> None:
        """Create the inbox (kept if it exists) and start or refresh liveness."""
        self._check_ready()
        expires_at = self._clock() + self._ttl_s
        gateway = self._live(gateway_id)
        if gateway is None:
            gateway = self._gateways[gateway_id] = _Gateway(expires_at)
        gateway.expires_at = expires_at
        if gateway.inbox is None:
            gateway.inbox = _Inbox(self._inbox_limit)

    async def close_inbox(self, gateway_id: str) -> None:
        self._check_ready()
        gateway = self._live(gateway_id)
        if gateway is not None:
            self._drop_inbox(gateway_id, gateway)

    async def read_inbox(
        self, gateway_id: str, max_count: int, timeout_s: float
    ) -> list[InboxMessage]:
        """As `Broker.read_inbox`; raises `BrokerUnavailable` once the inbox is gone.

        Gone means closed, never opened, or expired after a missed heartbeat: the
        gateway must `open_inbox` again and rebind its users and rooms.
        """
        self._check_ready()
        gateway = self._live(gateway_id)
        inbox = gateway.inbox if gateway is not None else None
        if inbox is None:
            raise BrokerUnavailable(f"the inbox of {gateway_id} is gone; open it again")
        if not inbox.messages:
            inbox.event.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await inbox.event.wait()
            except TimeoutError:
                return []
            self._check_ready()
        count = min(max_count, len(inbox.messages))
        return [inbox.messages.popleft() for _ in range(count)]

    def _deliver(self, gateway_id: str, message: InboxMessage) -> None:
        gateway = self._live(gateway_id)
        inbox = gateway.inbox if gateway is not None else None
        if inbox is None:
            self.stats.inbox_dropped += 1  # the gateway is gone; nobody could read it
            return
        if len(inbox.messages) == inbox.messages.maxlen:
            self.stats.inbox_overflow += 1
        inbox.messages.append(message)
        inbox.event.set()

    async def send_to_gateway(self, gateway_id: str, message: InboxMessage) -> None:
        self._check_ready()
        self._deliver(gateway_id, message)

    async def send_to_user(self, user: str, message: InboxMessage) -> None:
        self._check_ready()
        for gateway_id in list(self._user_gateways.get(user, ())):
            self._deliver(gateway_id, message)

    async def publish_room(self, room: str, message: InboxMessage) -> None:
        self._check_ready()
        for gateway_id in list(self._room_gateways.get(room, ())):
            self._deliver(gateway_id, message)

    async def bind_user(self, gateway_id: str, user: str) -> None:
        """Bind a live gateway; a dead one's binding would vanish at once, so none is made."""
        self._check_ready()
        gateway = self._live(gateway_id)
        if gateway is not None:
            gateway.users.add(user)
            self._user_gateways.setdefault(user, set()).add(gateway_id)

    async def unbind_user(self, gateway_id: str, user: str) -> None:
        self._check_ready()
        gateway = self._live(gateway_id)
        if gateway is not None:
            gateway.users.discard(user)
            _discard(self._user_gateways, user, gateway_id)

    async def bind_room(self, gateway_id: str, room: str) -> None:
        self._check_ready()
        gateway = self._live(gateway_id)
        if gateway is not None:
            gateway.rooms.add(room)
            self._room_gateways.setdefault(room, set()).add(gateway_id)

    async def unbind_room(self, gateway_id: str, room: str) -> None:
        self._check_ready()
        gateway = self._live(gateway_id)
        if gateway is not None:
            gateway.rooms.discard(room)
            _discard(self._room_gateways, room, gateway_id)

    # -- state store ----------------------------------------------------------------

    async def room_join(self, room: str, member: Member) -> None:
        """Add a member of a live gateway; a dead gateway's member is left out."""
        self._check_ready()
        gateway = self._live(member.gateway)
        if gateway is not None:
            gateway.members.add((room, member))
            self._members.setdefault(room, set()).add(member)

    async def room_leave(self, room: str, member: Member) -> None:
        self._check_ready()
        gateway = self._live(member.gateway)
        if gateway is not None:
            gateway.members.discard((room, member))
            _discard(self._members, room, member)

    async def room_members(self, room: str) -> list[Member]:
        self._check_ready()
        for gateway_id in {member.gateway for member in self._members.get(room, ())}:
            self._live(gateway_id)  # purges the members of an expired gateway
        return sorted(self._members.get(room, ()))

    async def forget_gateway(self, gateway_id: str) -> None:
        self._check_ready()
        gateway = self._gateways.get(gateway_id)
        if gateway is not None:
            self._drop_members(gateway)

    async def once(self, key: str, ttl_s: float) -> bool:
        self._check_ready()
        now = self._clock()
        expiry = self._once_expiry
        while expiry and expiry[0][0] <= now:
            expires_at, old = heapq.heappop(expiry)
            if self._once.get(old) == expires_at:
                del self._once[old]
        if key in self._once:
            return False
        self._once[key] = now + ttl_s
        heapq.heappush(expiry, (now + ttl_s, key))
        return True


def _discard(index: dict[str, set[T]], key: str, value: T) -> None:
    """Remove `value` from `index[key]`, and the key once its set is empty."""
    values = index.get(key)
    if values is None:
        return
    values.discard(value)
    if not values:
        del index[key]

"""The Redis Streams backend (`redis://`, `rediss://`): `Broker` and `StateStore` in one.

Data (key names in `redis_keys`, the atomic operations in `redis_scripts`, the
connection, timeouts and command batching in `redis_link`):

- a route is a stream read through one consumer group; each worker is a consumer.
  A counter next to the stream holds its backlog (undelivered + pending): publish
  checks it and XADDs in one script (the publishes of one flush to one route are
  one call), ack and dead letters lower it. Streams are trimmed with `XTRIM MINID`
  below the oldest entry a group has not acknowledged, at most once a second per
  route, piggybacked on acks;
- fetch blocks on XREADGROUP, which returns at once whatever is there; when a
  reclaim is due (every `visibility_timeout_s` / 2 at most), one script first
  reclaims entries idle past `visibility_timeout_s` (XAUTOCLAIM) and reads new
  ones. Extend, ack and dead_letter act only on entries the consumer still holds
  (same owner, same delivery count). A vanished group (Redis lost its data) is
  recreated, with backoff;
- a gateway's inbox is a stream that expires with its liveness key, read by a
  background task into a bounded buffer (the replies of one flush to one gateway
  are one script call); user bindings and room members are zsets
  of `member -> expiry` that the heartbeat refreshes through a per-gateway index.
  Room pushes are pub/sub, at-most-once: one subscription per room per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from portao.broker import redis_scripts as scripts
from portao.broker.base import DeadLetter, Delivery, Member
from portao.broker.redis_keys import (
    ENVELOPE_FIELD,
    ERROR_FIELD,
    GROUP,
    INBOX_FIELD,
    Keys,
    index_entry,
)
from portao.broker.redis_link import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    MAX_BLOCK_S,
    Lane,
    NoGroup,
    RedisLink,
    jitter,
    script_call,
)
from portao.config import Settings
from portao.envelope import Envelope, InboxMessage, decode_envelope, decode_inbox, encode
from portao.errors import BrokerError, BrokerUnavailable, EnvelopeError, QueueFull, UnknownRoute

log = logging.getLogger("portao.broker")

#: Inbox streams are capped (approximately) so a gateway that stopped reading
#: cannot fill Redis; its heartbeat would have to outlive a very long stall.
INBOX_MAX_ENTRIES = 100_000
#: Inbox messages buffered in this process before the stream reader pauses.
INBOX_BUFFER = 10_000
#: Entries taken from an inbox stream per read.
INBOX_READ_COUNT = 500
#: A route's stream is trimmed at most this often (per process).
TRIM_INTERVAL_S = 1.0
#: Routes (publish) and gateways (send_to_gateway) whose script call is kept; the
#: cache starts over past this many.
MAX_CACHED_CALLS = 10_000
#: Consumers holding nothing and idle this long are removed from their group.
STALE_CONSUMER_MS = 3_600_000
#: Delay before recreating a vanished consumer group again: doubles up to MAX.
REGROUP_MIN_S = 0.1
REGROUP_MAX_S = 5.0


class StreamEntry(msgspec.Struct, frozen=True, gc=False):
    """`Delivery.handle` of this backend: the entry's route and stream id."""

    route: str
    entry_id: str


class _Inbox:
    """What this process read from a gateway's inbox stream and room channels."""

    __slots__ = ("closed", "drained", "messages", "readable", "reader", "rooms")

    def __init__(self) -> None:
        self.messages: deque[InboxMessage] = deque()
        self.readable = asyncio.Event()
        self.drained = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.rooms: set[str] = set()
        self.closed = False

    def push(self, messages: Iterable[InboxMessage]) -> None:
        self.messages.extend(messages)
        if self.messages:
            self.readable.set()

    def close(self) -> None:
        """Stop the reader and wake every `read_inbox` waiting on this inbox."""
        self.closed = True
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        self.readable.set()
        self.drained.set()


class RedisBroker:
    """`Broker` and `StateStore` on Redis Streams (see the module docstring)."""

    def __init__(self, url: str, settings: Settings) -> None:
        self._link = RedisLink(url)
        self._keys = Keys(settings.prefix)
        self._visibility_ms = max(1, round(settings.visibility_timeout_s * 1000))
        self._reclaim_every_s = min(max(settings.visibility_timeout_s / 2, 0.05), MAX_BLOCK_S)
        self._ttl_ms = max(1, round(settings.presence_ttl_s * 1000))
        self._max_queue = settings.max_queue_length

        self._block_lane: Lane | None = None  # a worker's blocking reads, made on first use
        self._pubsub: Any = None  # redis-py PubSub, made on first use
        self._listener: asyncio.Task[None] | None = None

        self._known_routes: set[str] = set()
        # Script calls kept per route and per gateway: the hot path builds no key names.
        self._publishing: dict[str, tuple[tuple[Any, ...], Callable[[Any], None], bool]] = {}
        self._sending: dict[str, tuple[Any, ...]] = {}
        self._registered: set[str] = set()
        self._turn = 0
        self._next_reclaim = 0.0
        self._cursors: dict[str, str] = {}  # XAUTOCLAIM position per route
        self._next_trim: dict[str, float] = {}
        self._regroup_delay_s = 0.0

        self._inboxes: dict[str, _Inbox] = {}
        self._room_holders: dict[str, set[str]] = {}
        self._subscribed: set[str] = set()
        self._sub_waiters: dict[str, list[asyncio.Future[None]]] = {}

    def __repr__(self) -> str:
        return f"RedisBroker({self._link.where}, prefix={self._keys.prefix!r})"

    # -- link -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the link; reconnecting in the background is the link's job."""
        await self._link.open()

    async def aclose(self) -> None:
        """Stop every task of this object, then close the link."""
        if not self._link.is_open:
            return
        tasks = [self._listener] if self._listener else []
        for inbox in self._inboxes.values():
            inbox.close()
            if inbox.reader is not None:
                tasks.append(inbox.reader)
        self._inboxes.clear()
        self._room_holders.clear()
        self._subscribed.clear()
        self._listener = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None
        await self._link.aclose()

    def is_ready(self) -> bool:
        return self._link.is_ready()

    # -- route registry -----------------------------------------------------------------

    async def register_routes(self, routes: Iterable[str]) -> None:
        """Record the routes and create their groups (reading from the stream's start)."""
        routes = sorted(set(routes))
        if not routes:
            return
        keys = [self._keys.routes]
        for route in routes:
            keys += [self._keys.queue(route), self._keys.backlog(route)]
        await self._link.eval(scripts.REGISTER, keys, [GROUP, *routes])
        self._registered.update(routes)
        self._known_routes.update(routes)

    async def _check_routes(self, routes: Sequence[str]) -> None:
        unknown = [route for route in routes if route not in self._known_routes]
        if not unknown:
            return
        found = await self._link.submit("SMISMEMBER", self._keys.routes, *unknown)
        for route, is_member in zip(unknown, found, strict=True):
            if not is_member:
                raise UnknownRoute(f"no worker registered route {route!r}")
            self._known_routes.add(route)

    # -- gateway side: publish --------------------------------------------------------

    def publish(self, envelope: Envelope) -> asyncio.Future[None]:
        """Queue the envelope for the next batch now; the future ends with its answer."""
        route = envelope.route
        publishing = self._publishing.get(route)
        if publishing is None or (publishing[2] and route in self._known_routes):
            if len(self._publishing) >= MAX_CACHED_CALLS:
                self._publishing.clear()  # clients may name any route
            publishing = self._publishing[route] = self._publishing_to(route)
        call, finish, _ = publishing
        try:
            return self._link.submit_share(call, (encode(envelope),), scripts.PUBLISH, finish)
        except BrokerError as exc:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    def _publishing_to(self, route: str) -> tuple[tuple[Any, ...], Callable[[Any], None], bool]:
        """The script call publishing on `route`, what turns its result into an answer,
        and whether it checks the registry (until the route is known to be registered)."""
        check = route not in self._known_routes
        call = script_call(
            scripts.PUBLISH,
            [self._keys.routes, self._keys.queue(route), self._keys.backlog(route)],
            [route, self._max_queue, 1 if check else 0],
        )

        def finish(result: int) -> None:
            if result == 0:
                raise UnknownRoute(f"no worker registered route {route!r}")
            if result == -1:
                raise QueueFull(f"route {route!r} holds {self._max_queue} messages")
            self._known_routes.add(route)

        return call, finish, check

    # -- worker side ----------------------------------------------------------------------

    async def fetch(
        self, consumer: str, routes: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """Reclaim expired claims (when due) and read new entries; block up to `timeout_s`."""
        self._link.check_ready()
        await self._check_routes(routes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not routes or max_count < 1:
            await asyncio.sleep(max(0.0, timeout_s))
            return []
        start = self._turn % len(routes)
        self._turn += 1
        routes = [*routes[start:], *routes[:start]]
        while True:
            await self._link.wait_ready(deadline)
            remaining = deadline - loop.time()
            # A blocking read returns at once what is there: the script (one more
            # round trip) is for reclaiming, when due, and for not waiting at all.
            if loop.time() >= self._next_reclaim or remaining <= 0:
                taken = await self._sweep(consumer, routes, max_count, deadline)
                remaining = deadline - loop.time()
                if taken or remaining <= 0:
                    return taken
            taken = await self._block(
                consumer, routes, max_count, min(remaining, self._reclaim_every_s), deadline
            )
            if taken or loop.time() >= deadline:
                return taken

    async def _sweep(
        self, consumer: str, routes: list[str], max_count: int, deadline: float
    ) -> list[Delivery]:
        """One script: reclaim (when due) and read without blocking, up to max_count."""
        now = asyncio.get_running_loop().time()
        min_idle = 0
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every_s
            min_idle = self._visibility_ms
        flat, missing, cursors = await self._link.eval(
            scripts.FETCH,
            [self._keys.queue(route) for route in routes],
            [GROUP, consumer, max_count, min_idle, *(self._cursors.get(r, "0-0") for r in routes)],
        )
        self._cursors.update(zip(routes, (c.decode() for c in cursors), strict=True))
        if missing:
            await self._regroup([routes[i - 1] for i in missing], deadline)
        else:
            self._regroup_delay_s = 0.0
        raw = [
            (routes[flat[i] - 1], flat[i + 1].decode(), flat[i + 2], int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]
        return await self._deliveries(consumer, raw)

    async def _block(
        self, consumer: str, routes: list[str], max_count: int, block_s: float, deadline: float
    ) -> list[Delivery]:
        """XREADGROUP with BLOCK: wakes on the first new entry of any route."""
        keys = [self._keys.queue(route) for route in routes]
        by_key = {key.encode(): route for key, route in zip(keys, routes, strict=True)}
        block_ms = max(1, round(block_s * 1000))
        if self._block_lane is None:
            self._block_lane = self._link.lane()
        command = ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", max_count,
                   "BLOCK", block_ms, "STREAMS", *keys, *(">" for _ in keys))  # fmt: skip
        try:
            [reply] = await self._block_lane.read([command], block_s + self._link.timeout_s)
        except NoGroup:
            await self._regroup(routes, deadline)
            return []
        raw = [
            (by_key[key], entry_id.decode(), _field(fields, ENVELOPE_FIELD), 1)
            for key, entries in reply or ()
            for entry_id, fields in entries
        ]
        if len(raw) > max_count:
            # Several routes had entries at once: give the surplus back.
            await self._release(consumer, raw[max_count:])
            raw = raw[:max_count]
        return await self._deliveries(consumer, raw)

    async def _release(self, consumer: str, raw: list[tuple[str, str, bytes, int]]) -> None:
        by_route: dict[str, list[str]] = {}
        for route, entry_id, _, _ in raw:
            by_route.setdefault(route, []).append(entry_id)
        await asyncio.gather(
            *(
                self._link.submit_script(
                    scripts.RELEASE,
                    [self._keys.queue(route)],
                    [GROUP, consumer, self._visibility_ms + 1000, *ids],
                )
                for route, ids in by_route.items()
            )
        )

    async def _deliveries(
        self, consumer: str, raw: list[tuple[str, str, bytes, int]]
    ) -> list[Delivery]:
        """Decode entries; one that is not an envelope goes to the dead letters."""
        out: list[Delivery] = []
        for route, entry_id, payload, deliveries in raw:
            try:
                envelope = decode_envelope(payload)
            except EnvelopeError as exc:
                log.warning("route %s: entry %s is not an envelope: dead-lettered", route, entry_id)
                await self._dead_letter(consumer, route, entry_id, deliveries, payload, str(exc))
                continue
            out.append(Delivery(envelope, deliveries, StreamEntry(route, entry_id)))
        return out

    async def _regroup(self, routes: Iterable[str], deadline: float) -> None:
        """Recreate vanished consumer groups and re-register routes, with backoff."""
        delay = self._regroup_delay_s
        self._regroup_delay_s = min(max(delay * 2, REGROUP_MIN_S), REGROUP_MAX_S)
        if delay:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.sleep(max(0.0, min(jitter(delay), remaining)))
        wanted = set(routes) | self._registered
        log.warning("redis %s: consumer group missing; recreating for %s", self._link.where, wanted)
        await self.register_routes(wanted)

    async def extend(self, consumer: str, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Reset the idle time of held entries; returns the ones this consumer lost."""
        held, foreign = _by_handle(deliveries)
        if not held:
            return foreign
        routes = sorted({entry.route for _, entry in held})
        index = {route: i + 1 for i, route in enumerate(routes)}
        args: list[Any] = [GROUP, consumer]
        for delivery, entry in held:
            args += [index[entry.route], entry.entry_id, delivery.deliveries]
        kept = await self._link.eval(
            scripts.EXTEND, [self._keys.queue(route) for route in routes], args
        )
        return foreign + [d for (d, _), ok in zip(held, kept, strict=True) if not ok]

    async def ack(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Ack held entries in one script; trims the routes whose turn has come."""
        held, _ = _by_handle(deliveries)
        if not held:
            return
        routes = sorted({entry.route for _, entry in held})
        index = {route: i + 1 for i, route in enumerate(routes)}
        keys: list[str] = []
        for route in routes:
            keys += [self._keys.queue(route), self._keys.backlog(route)]
        args: list[Any] = [GROUP, consumer]
        for delivery, entry in held:
            args += [index[entry.route], entry.entry_id, delivery.deliveries]
        acked = self._link.submit_script(scripts.ACK, keys, args)
        now = asyncio.get_running_loop().time()
        trims = []
        for route in routes:
            if now >= self._next_trim.get(route, 0.0):
                self._next_trim[route] = now + TRIM_INTERVAL_S
                trims.append(
                    self._link.submit_script(
                        scripts.TRIM, [self._keys.queue(route)], [STALE_CONSUMER_MS]
                    )
                )
        first, *rest = await asyncio.gather(acked, *trims, return_exceptions=True)
        for failed in rest:
            if isinstance(failed, BaseException):
                log.info("redis %s: trim skipped: %s", self._link.where, failed)
        if isinstance(first, BaseException):
            raise first

    async def dead_letter(self, consumer: str, delivery: Delivery, error: str) -> None:
        """Move a held entry to its route's dead letters with the error."""
        entry = delivery.handle
        if isinstance(entry, StreamEntry):
            await self._dead_letter(
                consumer,
                entry.route,
                entry.entry_id,
                delivery.deliveries,
                encode(delivery.envelope),
                error,
            )

    async def _dead_letter(
        self,
        consumer: str,
        route: str,
        entry_id: str,
        deliveries: int,
        payload: bytes,
        error: str,
    ) -> None:
        await self._link.eval(
            scripts.DEAD_LETTER,
            [self._keys.queue(route), self._keys.backlog(route), self._keys.dead_letters(route)],
            [GROUP, consumer, entry_id, deliveries, payload, error, self._max_queue],
        )

    async def dead_letters(self, route: str, limit: int = 100) -> list[DeadLetter]:
        """Oldest first; an entry that is not an envelope is left out."""
        entries = await self._link.submit(
            "XRANGE", self._keys.dead_letters(route), "-", "+", "COUNT", max(1, limit)
        )
        out: list[DeadLetter] = []
        for _, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            try:
                envelope = decode_envelope(fields.get(ENVELOPE_FIELD, b""))
            except EnvelopeError:
                continue
            out.append(DeadLetter(envelope, fields.get(ERROR_FIELD, b"").decode(errors="replace")))
        return out[:limit]

    # -- inboxes ---------------------------------------------------------------------------

    async def open_inbox(self, gateway_id: str) -> None:
        """Start liveness and the inbox reader; an inbox the broker forgot starts over."""
        was_alive = await self._heartbeat(gateway_id)
        inbox = self._inboxes.get(gateway_id)
        if inbox is not None and not was_alive:
            await self._forget_inbox(gateway_id, unsubscribe=False)
            inbox = None
        if inbox is None:
            inbox = self._inboxes[gateway_id] = _Inbox()
            inbox.reader = asyncio.create_task(
                self._read_stream(gateway_id, inbox), name=f"portao-redis-inbox-{gateway_id}"
            )

    async def close_inbox(self, gateway_id: str) -> None:
        """Delete the inbox, liveness and user bindings of this gateway."""
        self._link.check_ready()
        await self._forget_inbox(gateway_id, unsubscribe=True)
        await self._link.eval(
            scripts.DROP_INDEX,
            [
                self._keys.gateway_users(gateway_id),
                self._keys.inbox(gateway_id),
                self._keys.alive(gateway_id),
            ],
            [self._keys.user_prefix],
        )

    async def _forget_inbox(self, gateway_id: str, *, unsubscribe: bool) -> None:
        """Drop this process's side of an inbox: reader, buffer, room bindings."""
        inbox = self._inboxes.pop(gateway_id, None)
        if inbox is None:
            return
        inbox.close()
        for room in inbox.rooms:
            holders = self._room_holders.get(room)
            if holders is not None:
                holders.discard(gateway_id)
                if not holders:
                    del self._room_holders[room]
                    if unsubscribe:
                        with contextlib.suppress(BrokerError):
                            await self._unsubscribe(room)

    async def read_inbox(
        self, gateway_id: str, max_count: int, timeout_s: float
    ) -> list[InboxMessage]:
        """As `Broker.read_inbox`; raises `BrokerUnavailable` once the inbox is gone.

        Gone means closed, never opened, or forgotten by Redis (liveness lapsed, or
        Redis lost its data): the gateway must `open_inbox` again and rebind.
        """
        inbox = self._inboxes.get(gateway_id)
        if not self._link.is_open or inbox is None:
            raise BrokerUnavailable(f"the inbox of {gateway_id} is gone; open it again")
        if not inbox.messages:
            inbox.readable.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await inbox.readable.wait()
            except TimeoutError:
                return []
            if inbox.closed:
                raise BrokerUnavailable(f"the inbox of {gateway_id} is gone; open it again")
        count = min(max_count, len(inbox.messages))
        taken = [inbox.messages.popleft() for _ in range(count)]
        if len(inbox.messages) < INBOX_BUFFER:
            inbox.drained.set()
        return taken

    async def _read_stream(self, gateway_id: str, inbox: _Inbox) -> None:
        """Background: move the inbox stream into the buffer, trimming what was read.

        Each read also checks the liveness key: once Redis forgot the gateway, the
        inbox is closed so that `read_inbox` tells the gateway to open it again.
        """
        key, alive = self._keys.inbox(gateway_id), self._keys.alive(gateway_id)
        last, trim_to = b"0-0", None
        delay = BACKOFF_MIN_S
        block_ms = round(MAX_BLOCK_S * 1000)
        lane = self._link.lane()
        try:
            while True:
                while len(inbox.messages) >= INBOX_BUFFER:
                    inbox.drained.clear()
                    await inbox.drained.wait()
                commands: list[tuple[Any, ...]] = [
                    ("EXISTS", alive),
                    ("XREAD", "COUNT", INBOX_READ_COUNT, "BLOCK", block_ms, "STREAMS", key, last),
                ]
                if trim_to is not None:
                    commands.insert(0, ("XTRIM", key, "MINID", _next_id(trim_to)))
                try:
                    await self._link.wait_ready(None)
                    *_, is_alive, reply = await lane.read(
                        commands, MAX_BLOCK_S + self._link.timeout_s
                    )
                except BrokerError as exc:
                    log.debug("redis %s: inbox read failed: %s", self._link.where, exc)
                    await asyncio.sleep(jitter(delay))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                delay = BACKOFF_MIN_S
                trim_to = None
                messages: list[InboxMessage] = []
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        last = trim_to = entry_id
                        try:
                            messages.append(decode_inbox(_field(fields, INBOX_FIELD)))
                        except EnvelopeError as exc:
                            log.warning("inbox %s: dropped entry %s: %s", gateway_id, entry_id, exc)
                inbox.push(messages)
                if not is_alive:
                    log.warning(
                        "redis %s: inbox %s was forgotten by Redis", self._link.where, gateway_id
                    )
                    await self._forget_inbox(gateway_id, unsubscribe=False)
                    return
        finally:
            self._link.drop_lane(lane)

    async def heartbeat(self, gateway_id: str) -> None:
        """Keep the gateway's inbox, bindings and members alive for presence_ttl_s."""
        if not await self._heartbeat(gateway_id) and gateway_id in self._inboxes:
            log.warning("redis %s: inbox %s had lapsed; reopen it", self._link.where, gateway_id)
            await self._forget_inbox(gateway_id, unsubscribe=False)

    async def _heartbeat(self, gateway_id: str) -> bool:
        """True when the gateway was still alive before this beat."""
        was_alive = await self._link.eval(
            scripts.HEARTBEAT,
            [
                self._keys.alive(gateway_id),
                self._keys.inbox(gateway_id),
                self._keys.gateway_users(gateway_id),
                self._keys.gateway_members(gateway_id),
            ],
            [self._ttl_ms, self._keys.user_prefix, self._keys.members_prefix],
        )
        return bool(was_alive)

    # -- direct messages and bindings ----------------------------------------------------

    async def send_to_gateway(self, gateway_id: str, message: InboxMessage) -> None:
        """XADD to a live gateway's inbox; a gone gateway's message is dropped."""
        call = self._sending.get(gateway_id)
        if call is None:
            if len(self._sending) >= MAX_CACHED_CALLS:
                self._sending.clear()
            call = self._sending[gateway_id] = script_call(
                scripts.SEND,
                [self._keys.alive(gateway_id), self._keys.inbox(gateway_id)],
                [INBOX_MAX_ENTRIES],
            )
        await self._link.submit_share(call, (encode(message),), scripts.SEND)

    async def send_to_user(self, user: str, message: InboxMessage) -> None:
        await self._link.eval(
            scripts.SEND_TO_USER,
            [self._keys.user(user)],
            [encode(message), INBOX_MAX_ENTRIES, self._keys.alive_prefix, self._keys.inbox_prefix],
        )

    async def bind_user(self, gateway_id: str, user: str) -> None:
        await self._link.eval(
            scripts.BIND,
            [
                self._keys.alive(gateway_id),
                self._keys.user(user),
                self._keys.gateway_users(gateway_id),
            ],
            [gateway_id, index_entry(user, gateway_id)],
        )

    async def unbind_user(self, gateway_id: str, user: str) -> None:
        await self._link.eval(
            scripts.UNBIND,
            [self._keys.user(user), self._keys.gateway_users(gateway_id)],
            [gateway_id, index_entry(user, gateway_id)],
        )

    # -- rooms: pub/sub --------------------------------------------------------------------

    async def bind_room(self, gateway_id: str, room: str) -> None:
        """Subscribe to the room's channel (once per process) and route it locally."""
        self._link.check_ready()
        inbox = self._inboxes.get(gateway_id)
        if inbox is None:
            return  # not open here: nothing could read the pushes
        if room not in self._subscribed:
            await self._subscribe(room)
        self._room_holders.setdefault(room, set()).add(gateway_id)
        inbox.rooms.add(room)

    async def unbind_room(self, gateway_id: str, room: str) -> None:
        self._link.check_ready()
        inbox = self._inboxes.get(gateway_id)
        if inbox is not None:
            inbox.rooms.discard(room)
        holders = self._room_holders.get(room)
        if holders is None:
            return
        holders.discard(gateway_id)
        if not holders:
            del self._room_holders[room]
            await self._unsubscribe(room)

    async def publish_room(self, room: str, message: InboxMessage) -> None:
        """PUBLISH on the room's channel: every gateway with members gets it once, or not."""
        await self._link.submit("PUBLISH", self._keys.room_channel(room), encode(message))

    async def _subscribe(self, room: str) -> None:
        """SUBSCRIBE and wait for Redis to confirm, so a publish right after is seen."""
        if self._pubsub is None:
            self._pubsub = self._link.client.pubsub()
        pubsub = self._pubsub
        channel = self._keys.room_channel(room)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._sub_waiters.setdefault(room, [])
        waiters.append(confirmed)
        try:
            await self._link.run(lambda _: pubsub.subscribe(channel), self._link.timeout_s)
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen(), name="portao-redis-rooms")
            async with asyncio.timeout(self._link.timeout_s):
                await confirmed
        except TimeoutError:
            raise BrokerUnavailable(f"redis did not confirm the subscription to {room}") from None
        finally:
            waiters.remove(confirmed)
            if not waiters:
                del self._sub_waiters[room]

    async def _unsubscribe(self, room: str) -> None:
        pubsub = self._pubsub
        self._subscribed.discard(room)
        channel = self._keys.room_channel(room)
        await self._link.run(lambda _: pubsub.unsubscribe(channel), self._link.timeout_s)

    async def _listen(self) -> None:
        """Background: read the pub/sub connection; redis-py resubscribes on reconnect."""
        pubsub = self._pubsub
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._link.wait_ready(None)
                message = await self._link.run(
                    lambda _: pubsub.get_message(timeout=MAX_BLOCK_S),
                    MAX_BLOCK_S + self._link.timeout_s,
                )
            except BrokerError as exc:
                log.debug("redis %s: room channel read failed: %s", self._link.where, exc)
                await asyncio.sleep(jitter(delay))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_MIN_S
            if message is not None:
                self._on_channel_message(message)

    def _on_channel_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        room = channel.removeprefix(self._keys.room_channel_prefix)
        if message["type"] == "subscribe":
            self._subscribed.add(room)
            for waiter in self._sub_waiters.get(room, ()):
                if not waiter.done():
                    waiter.set_result(None)
            return
        if message["type"] != "message":
            return
        holders = self._room_holders.get(room)
        if not holders:
            return
        try:
            push = decode_inbox(message["data"])
        except EnvelopeError as exc:
            log.warning("room %s: dropped a message: %s", room, exc)
            return
        for gateway_id in holders:
            inbox = self._inboxes.get(gateway_id)
            if inbox is not None and len(inbox.messages) < INBOX_BUFFER:
                inbox.push([push])

    # -- state store ----------------------------------------------------------------------

    async def room_join(self, room: str, member: Member) -> None:
        """Add a member of a live gateway; it expires with the gateway's liveness."""
        await self._link.eval(
            scripts.BIND,
            [
                self._keys.alive(member.gateway),
                self._keys.members(room),
                self._keys.gateway_members(member.gateway),
            ],
            [_encode_member(member), index_entry(room, _encode_member(member))],
        )

    async def room_leave(self, room: str, member: Member) -> None:
        await self._link.eval(
            scripts.UNBIND,
            [self._keys.members(room), self._keys.gateway_members(member.gateway)],
            [_encode_member(member), index_entry(room, _encode_member(member))],
        )

    async def room_members(self, room: str) -> list[Member]:
        encoded = await self._link.eval(scripts.ROOM_MEMBERS, [self._keys.members(room)], [])
        return sorted(_decode_member(raw) for raw in encoded)

    async def forget_gateway(self, gateway_id: str) -> None:
        await self._link.eval(
            scripts.DROP_INDEX,
            [self._keys.gateway_members(gateway_id)],
            [self._keys.members_prefix],
        )

    async def once(self, key: str, ttl_s: float) -> bool:
        """SET NX PX: True for the caller that took the key."""
        taken = await self._link.submit(
            "SET", self._keys.once(key), b"1", "NX", "PX", max(1, round(ttl_s * 1000))
        )
        return bool(taken)


def _by_handle(
    deliveries: Sequence[Delivery],
) -> tuple[list[tuple[Delivery, StreamEntry]], list[Delivery]]:
    """Split deliveries into this backend's entries and foreign ones (never held)."""
    held: list[tuple[Delivery, StreamEntry]] = []
    foreign: list[Delivery] = []
    for delivery in deliveries:
        if isinstance(delivery.handle, StreamEntry):
            held.append((delivery, delivery.handle))
        else:
            foreign.append(delivery)
    return held, foreign


def _encode_member(member: Member) -> str:
    return f"{member.gateway}\0{member.conn}\0{member.user}"


def _decode_member(raw: bytes) -> Member:
    gateway, conn, user = raw.decode().split("\0", 2)
    return Member(gateway, int(conn), user)


def _field(fields: list[bytes] | None, name: bytes) -> bytes:
    """A field of a stream entry (`[name, value, ...]` as Redis sends it); b"" if absent."""
    if fields:
        if fields[0] == name:  # entries written here have one field
            return fields[1]
        for i in range(2, len(fields) - 1, 2):
            if fields[i] == name:
                return fields[i + 1]
    return b""


def _next_id(entry_id: bytes) -> bytes:
    """The smallest stream id after `entry_id` (for XTRIM MINID)."""
    ms, _, seq = entry_id.partition(b"-")
    return ms + b"-" + str(int(seq) + 1).encode()

"""`Broker` on RabbitMQ (`amqp://`, `amqps://`), through aiormq.

aiormq rather than aio-pika: portao keeps its own reconnect loop (a delivery tag
dies with its channel, which aio-pika's robust objects would hide) and reads the
delivery tags, confirms and returns directly; aio-pika would only add an object per
message on top of the same aiormq calls.

- **Route registry.** A route is registered when its queue exists (`register_routes`
  declares it; see `amqp_topology`). Envelopes are published through the default
  exchange with `mandatory`: a route with no queue comes back as a return, never
  counted as accepted, and the gateway answers `unknown_route` with no extra round
  trip and no cache to go stale.
- **Publisher confirms** on every publish, on one shared channel: each publish awaits
  only its own confirm, so concurrent publishes from many tasks are all in flight at
  once. A nack means the quorum queue refused the message past `x-max-length`
  (`QueueFull`); a lost link or a confirm not seen within the operation timeout is
  `BrokerUnavailable`, so nothing unconfirmed is reported as accepted.
- **Workers** consume with manual acks and `prefetch = worker_concurrency`; `fetch`
  hands out what the broker pushed (`amqp_consumer`). `deliveries` is the quorum
  queue's `x-delivery-count` + 1. AMQP has no visibility timeout: the broker takes
  messages back only when their channel closes. So a dead worker's messages return
  when its connection closes, a frozen one's when the broker misses its heartbeats
  (`LinkTimeouts`), and within one process a consumer that let a claim lapse
  (`visibility_timeout_s` without `extend`) is released: its channel is closed, all
  it held goes back (`fetch` wakes up to do it). A delivery whose channel closed is
  lost to its holder: `extend` reports it, `ack` skips its dead tag.
- **Delivery limit.** `x-delivery-limit = max_attempts`: a worker sees the delivery
  past its last attempt and dead-letters it, answering the caller; a message whose
  worker died on that one too is dead-lettered by the broker into `P.spent.<route>`,
  which workers also consume (reported with `deliveries > max_attempts`).
- **Dead letters.** `dead_letter` publishes the envelope to `P.dlq.<route>` with its
  error in a header (confirmed), then acks it. `dead_letters` browses that queue with
  `basic.get` on a channel of its own, then closes the channel: the broker puts the
  messages back where they were, so nothing is consumed for good.
- **Inboxes** are durable queues expiring `presence_ttl_s` after their gateway
  stopped consuming; replies and `push_conn` go to them by name, user and room pushes
  through the `P.users` / `P.rooms` bindings. Replies and user pushes are persistent;
  room pushes are not (at-most-once). `heartbeat` renews a local lease: a gateway
  that stops beating loses its inbox and bindings on its next call, as on the other
  backends (a dead one's inbox is the server's to expire).
- **Bounds.** `x-max-length` counts ready messages: unacknowledged ones are bounded
  apart, by each consumer's prefetch (`amqp_topology`).
- **Link loss.** `is_ready()` is False while the link reconnects (with backoff and
  jitter); every call then raises `BrokerUnavailable`. On reconnect the broker
  re-declares its exchanges and route queues, re-creates its inboxes with their
  bindings (if they expired meanwhile) and restarts its consumers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, Literal

import aiormq.abc
from aiormq.exceptions import (
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from pamqp.commands import Basic

from portao.broker.amqp_consumer import Consumer, Handle, Received
from portao.broker.amqp_link import LINK_ERRORS, AmqpLink, LinkTimeouts, open_channel, translate
from portao.broker.amqp_topology import ERROR_HEADER, INBOX_PREFETCH, Topology
from portao.broker.base import DeadLetter, Delivery
from portao.config import Settings
from portao.envelope import Envelope, InboxMessage, decode_envelope, decode_inbox, encode
from portao.errors import BrokerUnavailable, EnvelopeError, QueueFull, UnknownRoute

log = logging.getLogger("portao.broker")

PERSISTENT = 2
TRANSIENT = 1

#: What the broker answered a publish: confirmed, returned unroutable, or refused.
Outcome = Literal["confirmed", "returned", "nacked"]


class AmqpBroker:
    """Message transport on RabbitMQ (see the module docstring)."""

    def __init__(self, url: str, settings: Settings) -> None:
        self._topology = Topology.from_settings(settings)
        self._prefetch = settings.worker_concurrency
        self._claim_s = settings.visibility_timeout_s
        self._ttl_s = settings.presence_ttl_s
        self._timeouts = LinkTimeouts.from_settings(settings)
        self._link = AmqpLink(url, self._timeouts, self._restore)
        self._routes: set[str] = set()  # declared or seen: re-declared after a reconnect
        self._workers: dict[str, Consumer] = {}
        self._inboxes: dict[str, Consumer] = {}
        self._bindings: dict[str, set[tuple[str, str]]] = {}  # gateway -> (exchange, key)
        self._leases: dict[str, float] = {}  # gateway -> loop time its liveness lapses

    def __repr__(self) -> str:
        return f"AmqpBroker({self._link.safe_url!r}, prefix={self._topology.prefix!r})"

    # -- link -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (`BrokerUnavailable` if the first attempt fails); then stay up."""
        await self._link.start()

    async def aclose(self) -> None:
        consumers = [*self._workers.values(), *self._inboxes.values()]
        self._workers.clear()
        self._inboxes.clear()
        for consumer in consumers:
            with suppress(BrokerUnavailable):
                await consumer.stop()
        await self._link.aclose()

    def is_ready(self) -> bool:
        return self._link.is_up()

    def _operation(self, what: str) -> AbstractAsyncContextManager[None]:
        return translate(what, self._timeouts.operation_s)

    async def _restore(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Run on every (re)connect before the link reports ready."""
        t = self._topology
        admin = await self._link.admin(connection)
        for exchange in (t.users, t.rooms, t.dlx):
            await admin.exchange_declare(exchange, exchange_type="direct", durable=True)
        for route in self._routes:
            await self._declare_route(connection, route)
        for gateway_id in self._inboxes:
            await self._declare_queue(connection, t.inbox(gateway_id), t.inbox_args())
            admin = await self._link.admin(connection)
            for exchange, key in self._bindings.get(gateway_id, ()):
                await admin.queue_bind(t.inbox(gateway_id), exchange, routing_key=key, nowait=True)
        for inbox in self._inboxes.values():
            await inbox.start(connection)
        for worker in self._workers.values():
            try:
                await worker.start(connection)
            except BrokerUnavailable as exc:  # its next fetch tries again
                log.warning("consumer %s not restored: %s", worker.name, exc)

    async def _declare_queue(
        self, connection: aiormq.abc.AbstractConnection, name: str, arguments: dict[str, Any]
    ) -> None:
        """Declare a durable queue; one that exists with other arguments is kept.

        Queue arguments cannot change in place (a policy can): refusing to start
        over them would lock every worker out, so the existing queue wins.
        """
        admin = await self._link.admin(connection)
        try:
            await admin.queue_declare(
                name, durable=True, arguments=arguments, timeout=self._timeouts.operation_s
            )
        except ChannelPreconditionFailed as exc:
            log.warning("queue %s exists with other arguments, kept as is: %s", name, exc)

    async def _declare_route(self, connection: aiormq.abc.AbstractConnection, route: str) -> None:
        t = self._topology
        await self._declare_queue(connection, t.route_queue(route), t.route_queue_args(route))
        await self._declare_queue(connection, t.dead_queue(route), t.dead_queue_args())
        await self._declare_queue(connection, t.spent_queue(route), t.spent_queue_args())
        admin = await self._link.admin(connection)
        await admin.queue_bind(t.spent_queue(route), t.dlx, routing_key=route)

    # -- route registry -------------------------------------------------------------

    async def register_routes(self, routes: Iterable[str]) -> None:
        connection = self._link.connection()
        for route in routes:
            async with self._operation(f"declaring the queues of route {route}"):
                await self._declare_route(connection, route)
            self._routes.add(route)

    async def _check_routes(self, routes: Iterable[str]) -> None:
        """`UnknownRoute` unless every route's queue exists (passive declare, cached)."""
        connection = self._link.connection()
        for route in routes:
            if route in self._routes:
                continue
            async with self._operation("checking a route queue"):
                admin = await self._link.admin(connection)
                try:
                    await admin.queue_declare(self._topology.route_queue(route), passive=True)
                except ChannelNotFoundEntity:
                    raise UnknownRoute(f"no worker registered route {route!r}") from None
            self._routes.add(route)

    # -- publishing -----------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        route = envelope.route
        properties = Basic.Properties(delivery_mode=PERSISTENT, message_id=envelope.id)
        outcome = await self._publish(
            "", self._topology.route_queue(route), encode(envelope), properties
        )
        if outcome == "returned":
            raise UnknownRoute(f"no worker registered route {route!r}")
        if outcome == "nacked":
            raise await self._refusal(route)

    async def _refusal(self, route: str) -> QueueFull | BrokerUnavailable:
        """Why RabbitMQ nacked a publish. A nack carries no reason: it is a full queue
        (reject-publish), or a quorum queue that cannot take messages now (seen right
        after it was declared, before its leader is up). The queue's depth tells."""
        queue = self._topology.route_queue(route)
        async with self._operation("checking why a publish was refused"):
            admin = await self._link.admin(self._link.connection())
            declared = await admin.queue_declare(queue, passive=True)
        limit = self._topology.route_queue_args(route)["x-max-length"]
        if (declared.message_count or 0) >= limit:
            return QueueFull(f"route {route!r} is at max_queue_length")
        return BrokerUnavailable(f"RabbitMQ refused a message for route {route!r} "
                                 f"with {declared.message_count} waiting (queue not available)")

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        *,
        mandatory: bool = True,
    ) -> Outcome:
        """Publish and await the broker's answer; a lost link is `BrokerUnavailable`."""
        async with self._operation("opening the publishing channel"):
            channel = await self._link.publisher()
        try:
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=self._timeouts.operation_s,
                wait=False,  # do not hold the channel until our frames hit the socket
            )
        except PublishError:
            return "returned"
        except DeliveryError:
            return "nacked"
        except LINK_ERRORS as exc:
            raise BrokerUnavailable(f"RabbitMQ: no confirm for {routing_key}: {exc!r}") from exc
        return "confirmed"

    async def _send(self, exchange: str, key: str, message: InboxMessage, mode: int) -> None:
        """Inbox traffic: nobody there (no inbox, no binding) is not an error."""
        properties = Basic.Properties(delivery_mode=mode)
        outcome = await self._publish(exchange, key, encode(message), properties, mandatory=False)
        if outcome != "confirmed":
            raise BrokerUnavailable(f"RabbitMQ refused a message for {key} ({outcome})")

    async def send_to_gateway(self, gateway_id: str, message: InboxMessage) -> None:
        await self._send("", self._topology.inbox(gateway_id), message, PERSISTENT)

    async def send_to_user(self, user: str, message: InboxMessage) -> None:
        await self._send(self._topology.users, user, message, PERSISTENT)

    async def publish_room(self, room: str, message: InboxMessage) -> None:
        await self._send(self._topology.rooms, room, message, TRANSIENT)

    # -- worker side ----------------------------------------------------------------

    async def fetch(
        self, consumer: str, routes: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """As `Broker.fetch`; waiting wakes up to release consumers with lapsed claims."""
        t = self._topology
        worker = self._workers.get(consumer)
        if worker is None:
            worker = Consumer(
                consumer, self._prefetch, self._link.fail, self._timeouts.operation_s, self._claim_s
            )
            self._workers[consumer] = worker
        new = [r for r in routes if t.route_queue(r) not in worker.queues]
        if new:
            await self._check_routes(new)
            await worker.add([q for r in new for q in (t.route_queue(r), t.spent_queue(r))])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            wake_at = min(deadline, await self._release_lapsed(loop.time()))
            if not worker.is_running():
                await worker.start(self._link.connection())
            received = await worker.take(max_count, max(0.0, wake_at - loop.time()))
            if received or loop.time() >= deadline:
                break
        deliveries: list[Delivery] = []
        for item in received:
            delivery = await self._delivery(worker, item)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def _release_lapsed(self, now: float) -> float:
        """Release every consumer with a lapsed claim; when the next claim lapses.

        Such a consumer is taken for dead (frozen, or lost track of its messages):
        all it held goes back to the queues for the others, as the visibility
        timeout promises. Other processes' consumers are the broker's business: it
        takes their messages back when their connection closes or its heartbeat
        times out.
        """
        next_lapse = math.inf
        for worker in list(self._workers.values()):
            lapse_at = worker.claims_lapse_at()
            if lapse_at is None:
                continue
            if lapse_at > now:
                next_lapse = min(next_lapse, lapse_at)
                continue
            log.warning(
                "consumer %s let a claim lapse (no extend within %.1f s): releasing all it holds",
                worker.name,
                self._claim_s,
            )
            await worker.stop()
        return next_lapse

    async def _delivery(self, worker: Consumer, received: Received) -> Delivery | None:
        """Decode a delivery; one that is no envelope is logged and acked away."""
        try:
            envelope = decode_envelope(received.message.body)
        except EnvelopeError as exc:
            log.error("dropping an undecodable message from %s: %s", received.queue, exc)
            await worker.ack([received.handle])
            return None
        spent = received.queue == self._topology.spent_queue(envelope.route)
        headers = received.message.header.properties.headers
        return Delivery(envelope, self._topology.deliveries(headers, spent=spent), received.handle)

    def _held(
        self, consumer: str, deliveries: Iterable[Delivery]
    ) -> tuple[Consumer | None, list[Handle]]:
        """The consumer, and the handles of `deliveries` it still holds."""
        worker = self._workers.get(consumer)
        if worker is None:
            return None, []
        handles = [d.handle for d in deliveries if isinstance(d.handle, Handle)]
        return worker, [h for h in handles if worker.is_live(h)]

    async def extend(self, consumer: str, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Renew the claims still held; lost are those of a closed or released channel."""
        worker, live = self._held(consumer, deliveries)
        if worker is not None:
            worker.extend(live)
        return [d for d in deliveries if d.handle not in live]

    async def ack(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        worker, live = self._held(consumer, deliveries)
        if worker is not None:
            await worker.ack(live)

    async def dead_letter(self, consumer: str, delivery: Delivery, error: str) -> None:
        worker, live = self._held(consumer, [delivery])
        if worker is None or not live:
            return  # the claim is lost: the message is back in its queue
        properties = Basic.Properties(delivery_mode=PERSISTENT, headers={ERROR_HEADER: error})
        route = delivery.envelope.route
        outcome = await self._publish(
            "", self._topology.dead_queue(route), encode(delivery.envelope), properties
        )
        if outcome != "confirmed":
            raise BrokerUnavailable(f"the dead-letter queue of {route!r}: {outcome}")
        await worker.ack(live)

    async def dead_letters(self, route: str, limit: int = 100) -> list[DeadLetter]:
        """Browse the dead-letter queue: get up to `limit`, then return them all."""
        connection = self._link.connection()
        out: list[DeadLetter] = []
        async with self._operation("reading dead letters"):
            channel = await open_channel(connection, confirms=False)
            try:
                while len(out) < limit:
                    message = await channel.basic_get(
                        self._topology.dead_queue(route), timeout=self._timeouts.operation_s
                    )
                    if not isinstance(message.delivery, Basic.GetOk):
                        break
                    headers = message.header.properties.headers or {}
                    error = headers.get(ERROR_HEADER)
                    out.append(DeadLetter(decode_envelope(message.body), str(error or "")))
            except ChannelNotFoundEntity:
                return []
            finally:
                if not channel.is_closed:
                    await channel.close()
        return out

    # -- gateway side ---------------------------------------------------------------

    async def open_inbox(self, gateway_id: str) -> None:
        """Create the inbox (a lapsed one starts over empty) and start consuming it."""
        await self._drop_if_lapsed(gateway_id)
        connection = self._link.connection()
        t = self._topology
        async with self._operation("declaring an inbox"):
            await self._declare_queue(connection, t.inbox(gateway_id), t.inbox_args())
        self._renew(gateway_id)
        inbox = self._inboxes.get(gateway_id)
        if inbox is None:
            inbox = Consumer(
                f"inbox {gateway_id}", INBOX_PREFETCH, self._link.fail, self._timeouts.operation_s
            )
            self._inboxes[gateway_id] = inbox
            await inbox.add([t.inbox(gateway_id)])
        if not inbox.is_running():
            await inbox.start(connection)

    async def read_inbox(
        self, gateway_id: str, max_count: int, timeout_s: float
    ) -> list[InboxMessage]:
        """As `Broker.read_inbox`; `BrokerUnavailable` once the inbox is gone.

        Gone means closed, never opened, or lapsed after a missed heartbeat: the
        gateway must `open_inbox` again and rebind its users and rooms.
        """
        await self._drop_if_lapsed(gateway_id)
        self._link.connection()
        inbox = self._inboxes.get(gateway_id)
        if inbox is None:
            raise BrokerUnavailable(f"the inbox of {gateway_id} is gone; open it again")
        received = await inbox.take(max_count, timeout_s)
        messages: list[InboxMessage] = []
        for item in received:
            try:
                messages.append(decode_inbox(item.message.body))
            except EnvelopeError as exc:
                log.error("gateway %s: dropping an undecodable inbox message: %s", gateway_id, exc)
        await inbox.ack(item.handle for item in received)
        return messages

    async def close_inbox(self, gateway_id: str) -> None:
        await self._drop_inbox(gateway_id)

    async def heartbeat(self, gateway_id: str) -> None:
        """Renew this gateway's liveness: local bookkeeping, nothing goes to the server.

        The server expires an inbox `presence_ttl_s` after its last consumer left (a
        dead gateway's); a live gateway that stopped beating loses its inbox and
        bindings here, on its next call, as on the other backends.
        """
        if gateway_id in self._leases:
            await self._drop_if_lapsed(gateway_id)
        if gateway_id in self._inboxes:
            self._renew(gateway_id)

    def _renew(self, gateway_id: str) -> None:
        self._leases[gateway_id] = asyncio.get_running_loop().time() + self._ttl_s

    async def _drop_if_lapsed(self, gateway_id: str) -> None:
        lapse_at = self._leases.get(gateway_id)
        if lapse_at is not None and lapse_at <= asyncio.get_running_loop().time():
            log.info("gateway %s missed its heartbeat: dropping its inbox and bindings", gateway_id)
            await self._drop_inbox(gateway_id)

    async def _drop_inbox(self, gateway_id: str) -> None:
        """Stop consuming the inbox and delete it, bindings and all."""
        connection = self._link.connection()
        inbox = self._inboxes.pop(gateway_id, None)
        self._bindings.pop(gateway_id, None)
        self._leases.pop(gateway_id, None)
        if inbox is not None:
            await inbox.stop()
        async with self._operation("deleting an inbox"):
            admin = await self._link.admin(connection)
            await admin.queue_delete(self._topology.inbox(gateway_id))

    async def bind_user(self, gateway_id: str, user: str) -> None:
        await self._bind(gateway_id, self._topology.users, user)

    async def unbind_user(self, gateway_id: str, user: str) -> None:
        await self._unbind(gateway_id, self._topology.users, user)

    async def bind_room(self, gateway_id: str, room: str) -> None:
        await self._bind(gateway_id, self._topology.rooms, room)

    async def unbind_room(self, gateway_id: str, room: str) -> None:
        await self._unbind(gateway_id, self._topology.rooms, room)

    async def _bind(self, gateway_id: str, exchange: str, key: str) -> None:
        """Bind the inbox (kept to re-bind after a reconnect); a gone inbox is no error."""
        await self._drop_if_lapsed(gateway_id)
        connection = self._link.connection()
        if gateway_id in self._inboxes:
            self._bindings.setdefault(gateway_id, set()).add((exchange, key))
        async with self._operation("binding an inbox"):
            admin = await self._link.admin(connection)
            try:
                await admin.queue_bind(self._topology.inbox(gateway_id), exchange, routing_key=key)
            except ChannelNotFoundEntity:
                log.info("no inbox for gateway %s: %s binding not made", gateway_id, exchange)

    async def _unbind(self, gateway_id: str, exchange: str, key: str) -> None:
        await self._drop_if_lapsed(gateway_id)
        connection = self._link.connection()
        self._bindings.get(gateway_id, set()).discard((exchange, key))
        async with self._operation("unbinding an inbox"):
            admin = await self._link.admin(connection)
            with suppress(ChannelNotFoundEntity):
                inbox = self._topology.inbox(gateway_id)
                await admin.queue_unbind(inbox, exchange, routing_key=key)

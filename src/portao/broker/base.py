"""The seams between gateways, workers and a broker backend.

`Broker` moves messages: route queues (gateway → worker) with ack, claim extension,
reclaim and dead letters; per-gateway inboxes (worker → gateway); user and room
bindings that decide which inboxes a push reaches. `StateStore` keeps what needs a
store with expiry: room member lists and `ctx.once` keys. Redis and memory implement
both; RabbitMQ implements `Broker` and takes its `StateStore` from `--state`.

Liveness: a gateway calls `heartbeat(gateway_id)` on both every `heartbeat_s`. Its
inbox, user bindings and room memberships vanish once no heartbeat came for
`presence_ttl_s` (a killed gateway leaves nothing behind for long).

Every method that talks to a server raises only `portao.errors.BrokerError`
subclasses: `BrokerUnavailable` when the server did not confirm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from portao.envelope import Envelope, InboxMessage


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a worker.

    `deliveries` is how many times the broker has handed this message out, this
    time included (1 on first delivery; more after a dead worker's reclaim).
    `handle` is the backend's own reference (stream entry id, delivery tag).
    """

    envelope: Envelope
    deliveries: int
    handle: object


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message whose attempts are spent, with the last error it raised."""

    envelope: Envelope
    error: str


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One connection in a room: which gateway holds it, its number, its user."""

    gateway: str
    conn: int
    user: str


@runtime_checkable
class Broker(Protocol):
    """Message transport between gateways and workers."""

    async def connect(self) -> None:
        """Open the link; retries in the background belong to the backend."""

    async def aclose(self) -> None:
        """Close the link and stop every background task of this object."""

    def is_ready(self) -> bool:
        """True while the link is up (readiness)."""

    # -- route registry -------------------------------------------------------

    async def register_routes(self, routes: Iterable[str]) -> None:
        """Record routes a worker serves. Kept, not expiring."""

    # -- gateway side ---------------------------------------------------------

    def publish(self, envelope: Envelope) -> Awaitable[None]:
        """Queue an envelope on its route; the awaitable ends once the broker accepted it.

        Not a coroutine method so that a backend may hand back a future (Redis
        does: the publish is queued for the next batch at once), sparing the
        gateway a task per message; `async def` implementations fit as well.

        Raises `UnknownRoute` for a route never registered, `QueueFull` when the
        route's backlog (undelivered plus pending) is at `max_queue_length`,
        `BrokerUnavailable` when acceptance was not confirmed.
        """

    async def open_inbox(self, gateway_id: str) -> None:
        """Create this gateway's inbox (and start its liveness)."""

    async def read_inbox(
        self, gateway_id: str, max_count: int, timeout_s: float
    ) -> list[InboxMessage]:
        """Wait up to `timeout_s` for inbox messages and room pushes; [] on timeout.

        Direct messages (replies, user and connection pushes, joins) come in the
        order they were sent and survive a short outage; room pushes are
        at-most-once.
        """

    async def close_inbox(self, gateway_id: str) -> None:
        """Remove the inbox and every binding of this gateway (clean stop)."""

    async def heartbeat(self, gateway_id: str) -> None:
        """Keep this gateway's inbox and bindings alive for `presence_ttl_s`."""

    async def bind_user(self, gateway_id: str, user: str) -> None:
        """Route `push_user(user)` to this gateway (first local connection of user)."""

    async def unbind_user(self, gateway_id: str, user: str) -> None:
        """Undo `bind_user` (last local connection of user closed)."""

    async def bind_room(self, gateway_id: str, room: str) -> None:
        """Route room pushes for `room` to this gateway (first local member)."""

    async def unbind_room(self, gateway_id: str, room: str) -> None:
        """Undo `bind_room` (last local member left)."""

    # -- worker side ----------------------------------------------------------

    async def fetch(
        self, consumer: str, routes: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """Wait up to `timeout_s` for messages on `routes`; [] on timeout.

        Includes messages reclaimed from consumers that held them longer than
        `visibility_timeout_s` without extending. A message is never handed to two
        consumers while its holder keeps extending it.
        """

    async def extend(self, consumer: str, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Extend the claim on `deliveries`; returns those this consumer lost."""

    async def ack(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Remove finished messages from their queues (batched)."""

    async def dead_letter(self, consumer: str, delivery: Delivery, error: str) -> None:
        """Move a message whose attempts are spent to its route's dead-letter queue."""

    async def dead_letters(self, route: str, limit: int = 100) -> list[DeadLetter]:
        """Oldest first: what the dead-letter queue of `route` holds."""

    async def send_to_gateway(self, gateway_id: str, message: InboxMessage) -> None:
        """Write to one gateway's inbox (replies, `push_conn`, joins)."""

    async def send_to_user(self, user: str, message: InboxMessage) -> None:
        """Write to the inbox of every gateway bound to `user`."""

    async def publish_room(self, room: str, message: InboxMessage) -> None:
        """Fan out to every gateway bound to `room` (at-most-once)."""


@runtime_checkable
class StateStore(Protocol):
    """Room member lists and once-keys, with expiry tied to gateway liveness."""

    async def connect(self) -> None:
        """Open the link."""

    async def aclose(self) -> None:
        """Close the link."""

    async def heartbeat(self, gateway_id: str) -> None:
        """Keep the members held by this gateway alive for `presence_ttl_s`."""

    async def room_join(self, room: str, member: Member) -> None:
        """Add a connection to a room (idempotent)."""

    async def room_leave(self, room: str, member: Member) -> None:
        """Remove a connection from a room (idempotent)."""

    async def room_members(self, room: str) -> list[Member]:
        """Live members of `room`, sorted; members of dead gateways are left out."""

    async def forget_gateway(self, gateway_id: str) -> None:
        """Remove every member held by this gateway (clean stop)."""

    async def once(self, key: str, ttl_s: float) -> bool:
        """Take `key` for `ttl_s`: True the first time, False while it is held."""

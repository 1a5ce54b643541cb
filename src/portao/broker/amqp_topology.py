"""Names and arguments of every RabbitMQ object portao declares (no I/O).

Per prefix `P`:

    queue     P.q.<route>       durable quorum queue of a route's envelopes; its
                                existence *is* the route registry (see below)
    queue     P.dlq.<route>     durable classic queue of dead letters (error in a header)
    queue     P.spent.<route>   durable quorum queue of what the delivery limit dead-lettered
    queue     P.inbox.<gw>      durable classic queue of one gateway, expiring unused
    exchange  P.users           direct: routing key user -> inboxes of gateways holding it
    exchange  P.rooms           direct: routing key room -> inboxes of gateways with members
    exchange  P.dlx             direct: the route queues' dead-letter exchange -> P.spent.*

Envelopes and replies go through the default exchange (routing key = queue name), so
no binding has to be kept for them. Publishing an envelope with the `mandatory` flag
makes the registry check free: a route never registered has no queue, the broker
returns the message, and the gateway answers `unknown_route`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

from portao.config import Settings

#: Header that carries a dead letter's last error.
ERROR_HEADER = "x-portao-error"

#: Inbox messages a gateway's consumer may hold before it reads them: a bound on the
#: memory a fast worker fleet can push into a gateway ahead of its reads.
INBOX_PREFETCH = 1000


@dataclass(frozen=True, slots=True)
class Topology:
    """Object names under one prefix, and the arguments they are declared with."""

    prefix: str
    max_queue_length: int
    max_attempts: int
    presence_ttl_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            settings.prefix,
            settings.max_queue_length,
            settings.max_attempts,
            settings.presence_ttl_s,
        )

    @property
    def users(self) -> str:
        return f"{self.prefix}.users"

    @property
    def rooms(self) -> str:
        return f"{self.prefix}.rooms"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    def route_queue(self, route: str) -> str:
        return f"{self.prefix}.q.{route}"

    def dead_queue(self, route: str) -> str:
        return f"{self.prefix}.dlq.{route}"

    def spent_queue(self, route: str) -> str:
        return f"{self.prefix}.spent.{route}"

    def inbox(self, gateway_id: str) -> str:
        return f"{self.prefix}.inbox.{gateway_id}"

    def route_queue_args(self, route: str) -> dict[str, Any]:
        """A quorum queue that refuses publishes past the bound and caps redeliveries.

        Quorum queues accept one message past `x-max-length` (the check runs before
        the enqueue), hence the `- 1`; a burst of concurrent publishes can overshoot
        a little more, since publishers learn of the full queue asynchronously. The
        bound counts ready messages: unacknowledged ones are bounded apart by the
        consumers' prefetch. `x-delivery-limit = max_attempts` lets a worker see the
        delivery past its last attempt (and dead-letter it with an answer to the
        caller); only a message whose worker died on that one too is dead-lettered by
        the broker, into `P.spent.<route>`, which the workers consume as well.
        """
        return {
            "x-queue-type": "quorum",
            "x-max-length": max(0, self.max_queue_length - 1),
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.max_attempts,
            "x-dead-letter-exchange": self.dlx,
            "x-dead-letter-routing-key": route,
            "x-dead-letter-strategy": "at-least-once",
        }

    def dead_queue_args(self) -> dict[str, Any]:
        """Classic, so a browse (get, then return on channel close) keeps the order.

        Bounded like the memory broker's dead letters: the oldest go first.
        """
        return {"x-max-length": self.max_queue_length, "x-overflow": "drop-head"}

    def spent_queue_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"}

    def inbox_args(self) -> dict[str, Any]:
        """Expires `presence_ttl_s` after its gateway stopped consuming it.

        So it outlives a short outage (replies wait in it) and vanishes, bindings
        included, once its gateway is gone. A gateway that stops reading loses its
        oldest messages past the bound; its callers then get `timeout`.
        """
        return {
            "x-expires": max(1, ceil(self.presence_ttl_s * 1000)),
            "x-max-length": self.max_queue_length,
            "x-overflow": "drop-head",
        }

    def deliveries(self, headers: dict[str, Any] | None, *, spent: bool) -> int:
        """How many times a message has been handed out, this time included.

        A quorum queue counts returns in `x-delivery-count`. A message from the spent
        queue was handed out `max_attempts + 1` times by its route queue already.
        """
        count = (headers or {}).get("x-delivery-count", 0)
        returned = count if isinstance(count, int) else 0
        if spent:
            return self.max_attempts + 2 + returned
        return returned + 1

"""What a handler sees of the world: who asked, and how to reach connections and rooms.

One `Context` per handling (a retry gets a fresh one with the next `attempt`). Data
given to the push methods is encoded to JSON here, once, and travels as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from portao.broker.base import Broker, Member, StateStore
from portao.envelope import Envelope, Join, Leave, Push
from portao.names import is_valid_name

ONCE_TTL_S = 86400.0


@dataclass(frozen=True, slots=True)
class ConnAddr:
    """Where a client connection lives: its gateway process and number there."""

    gateway: str
    conn: int


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not is_valid_name(name):
        raise ValueError(f"{kind} name {name!r} must match [A-Za-z0-9_.:-]{{1,128}}")
    return name


def encode_json(data: Any) -> bytes:
    """JSON bytes for a reply or push; a value JSON cannot hold is a TypeError."""
    try:
        return msgspec.json.encode(data)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"value is not JSON-encodable: {exc}") from None


class Context:
    """The message being handled and the broker operations a handler may use."""

    __slots__ = (
        "_broker", "_conn", "_envelope", "_state", "attempt", "deadline", "id", "route", "user"
    )  # fmt: skip

    def __init__(self, envelope: Envelope, attempt: int, broker: Broker, state: StateStore) -> None:
        self.id = envelope.id
        self.attempt = attempt
        self.user = envelope.user
        self.route = envelope.route
        self.deadline = envelope.deadline
        self._envelope = envelope
        self._conn: ConnAddr | None = None  # made when first asked for (most handlers never do)
        self._broker = broker
        self._state = state

    @property
    def conn(self) -> ConnAddr:
        """The caller's connection."""
        if self._conn is None:
            self._conn = ConnAddr(self._envelope.gateway, self._envelope.conn)
        return self._conn

    def __repr__(self) -> str:
        return (
            f"Context(id={self.id!r}, route={self.route!r}, user={self.user!r}, "
            f"attempt={self.attempt})"
        )

    async def push_user(self, user: str, route: str, data: Any) -> None:
        """Push to every connection of `user`, on whichever gateways hold them."""
        user = _check_name("user", user)
        push = Push(route=_check_name("route", route), data=encode_json(data), user=user)
        await self._broker.send_to_user(user, push)

    async def push_conn(self, addr: ConnAddr, route: str, data: Any) -> None:
        """Push to one connection (e.g. `ctx.conn`, or a member from `room_members`)."""
        push = Push(route=_check_name("route", route), data=encode_json(data), conn=addr.conn)
        await self._broker.send_to_gateway(addr.gateway, push)

    async def publish_room(self, room: str, route: str, data: Any) -> None:
        """Push to every member of `room`; at-most-once (pub/sub, no replay)."""
        room = _check_name("room", room)
        push = Push(route=_check_name("route", route), data=encode_json(data), room=room)
        await self._broker.publish_room(room, push)

    async def join(
        self, room: str, conn: ConnAddr | None = None, *, user: str | None = None
    ) -> None:
        """Add a connection (default: the caller's) to `room`.

        The member list is written first, then the gateway is told through its
        ordered inbox, so the join takes effect before this handler's reply. Another
        connection needs its `user` (from `room_members`, say).
        """
        member = self._member(conn, user)
        room = _check_name("room", room)
        await self._state.room_join(room, member)
        await self._broker.send_to_gateway(
            member.gateway, Join(conn=member.conn, room=room, user=member.user)
        )

    async def leave(
        self, room: str, conn: ConnAddr | None = None, *, user: str | None = None
    ) -> None:
        """Remove a connection (default: the caller's) from `room`; idempotent."""
        member = self._member(conn, user)
        room = _check_name("room", room)
        await self._state.room_leave(room, member)
        await self._broker.send_to_gateway(
            member.gateway, Leave(conn=member.conn, room=room, user=member.user)
        )

    async def room_members(self, room: str) -> list[Member]:
        """Live connections in `room`, sorted."""
        return await self._state.room_members(_check_name("room", room))

    async def once(self, key: str, ttl_s: float = ONCE_TTL_S) -> bool:
        """True the first time `key` is taken on this route within `ttl_s`.

        Guard an effect with it so a redelivered message does not repeat it.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"once key must be a non-empty string, not {key!r}")
        return await self._state.once(f"{self.route}:{key}", ttl_s)

    def _member(self, conn: ConnAddr | None, user: str | None) -> Member:
        if conn is None or conn == self.conn:
            conn, user = self.conn, self.user
        elif user is None:
            raise ValueError("joining or leaving another connection needs its user=")
        return Member(conn.gateway, conn.conn, _check_name("user", user))

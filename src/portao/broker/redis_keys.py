"""Every Redis key, stream and channel name of the Redis backend, all under the prefix.

One place for names (as arq does), so the Lua scripts and the Python side never
disagree. `{p}` is `settings.prefix`:

    {p}:routes               set      registered routes (kept, never expiring)
    {p}:q:{route}            stream   the route's queue; consumer group `GROUP`
    {p}:backlog:{route}      string   undelivered + pending entries of the queue
    {p}:dlq:{route}          stream   dead letters, capped at max_queue_length
    {p}:alive:{gateway}      string   the gateway's liveness (PX presence_ttl)
    {p}:inbox:{gateway}      stream   the gateway's inbox; expires with its liveness
    {p}:user:{user}          zset     gateway id -> expiry (server ms)
    {p}:members:{room}       zset     encoded member -> expiry (server ms)
    {p}:gwusers:{gateway}    set      index of the gateway's user bindings
    {p}:gwmembers:{gateway}  set      index of the room members the gateway holds
    {p}:once:{key}           string   `ctx.once` keys (PX ttl)
    {p}:room:{room}          channel  room fan-out (pub/sub, at-most-once)

An index entry is `name NUL member`: the heartbeat refreshes `member` in the zset
`<zset prefix>name`, so one script keeps every binding of a gateway alive.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The consumer group every worker of a route reads through.
GROUP = "workers"

#: Field names inside stream entries.
ENVELOPE_FIELD = b"e"
ERROR_FIELD = b"error"
INBOX_FIELD = b"m"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str

    @property
    def routes(self) -> str:
        return f"{self.prefix}:routes"

    def queue(self, route: str) -> str:
        return f"{self.prefix}:q:{route}"

    def backlog(self, route: str) -> str:
        return f"{self.prefix}:backlog:{route}"

    def dead_letters(self, route: str) -> str:
        return f"{self.prefix}:dlq:{route}"

    @property
    def alive_prefix(self) -> str:
        return f"{self.prefix}:alive:"

    def alive(self, gateway_id: str) -> str:
        return self.alive_prefix + gateway_id

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}:inbox:"

    def inbox(self, gateway_id: str) -> str:
        return self.inbox_prefix + gateway_id

    @property
    def user_prefix(self) -> str:
        return f"{self.prefix}:user:"

    def user(self, user: str) -> str:
        return self.user_prefix + user

    @property
    def members_prefix(self) -> str:
        return f"{self.prefix}:members:"

    def members(self, room: str) -> str:
        return self.members_prefix + room

    def gateway_users(self, gateway_id: str) -> str:
        return f"{self.prefix}:gwusers:{gateway_id}"

    def gateway_members(self, gateway_id: str) -> str:
        return f"{self.prefix}:gwmembers:{gateway_id}"

    def once(self, key: str) -> str:
        return f"{self.prefix}:once:{key}"

    def room_channel(self, room: str) -> str:
        return f"{self.prefix}:room:{room}"

    @property
    def room_channel_prefix(self) -> str:
        return f"{self.prefix}:room:"

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of this prefix."""
        return f"{self.prefix}:*"


def index_entry(name: str, member: str) -> str:
    """An index entry: which zset (`name` after its prefix) holds `member`."""
    return f"{name}\0{member}"

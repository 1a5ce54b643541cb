"""The gateway process: listeners, connections, reply dispatch, shutdown.

Owns every task it starts: the inbox reader, the heartbeat, the call-deadline
ticker and the short-lived publish/bind tasks. Shutdown follows one fixed order
(DESIGN.md §3.5): stop accepting → `bye shutdown` to everyone → drain calls in
flight up to `drain_timeout_s` → `shutdown` errors to what is left → close
connections → close the inbox and the broker links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from asyncio import Future
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from portao.admin.histogram import LatencyHistogram
from portao.broker.base import Broker, Member, StateStore
from portao.config import Settings
from portao.envelope import (
    ErrorReply,
    Join,
    Leave,
    Push,
    Reply,
    new_gateway_id,
)
from portao.errors import BrokerError, ErrorCode, UnknownRoute
from portao.gateway.connection import CLOSE_GRACE_S, ClientConnection, FarDeadlines
from portao.gateway.listeners import ListenSpec, open_server, parse_listen
from portao.routing.pending import PendingCall, PendingCalls
from portao.session.actions import Authenticated, JoinRoom, LeaveRoom, Publish
from portao.session.auth import TokenVerifier
from portao.session.lifecycle import Limits, State
from portao.wire import messages as wire
from portao.worker.heap import release_heap, settle_heap

log = logging.getLogger("portao.gateway")

#: Call deadlines are checked this often (the `timeout` answer is this precise).
DEADLINE_TICK_S = 0.05
INBOX_BATCH = 1000
INBOX_WAIT_S = 1.0
#: A failure that repeats is logged at most once per cause this often, with a count.
REPEAT_LOG_INTERVAL_S = 5.0


@dataclass(slots=True)
class GatewayStats:
    """Counters for the metrics endpoint and the tests (read when scraped)."""

    opened: int = 0
    closed: int = 0
    rejected_overloaded: int = 0
    slow_consumers: int = 0
    timeouts: int = 0
    late_replies: int = 0
    dropped_pushes: int = 0
    publish_failures: int = 0
    close_reasons: dict[str, int] = field(default_factory=dict)  # closed connections by reason
    messages_in: dict[tuple[str, str], int] = field(default_factory=dict)  # (op, route)
    messages_out: dict[tuple[str, str], int] = field(default_factory=dict)  # (op, route)
    errors: dict[str, int] = field(default_factory=dict)  # errors the gateway sent, by code
    call_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    publish_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    inbox_read_at: float = 0.0  # monotonic time the inbox reader last got an answer
    _close_codes: dict[int, ErrorCode] = field(default_factory=dict)

    def count_close(self, code: ErrorCode, conn_id: int) -> None:
        """A connection is being closed with `bye code` (counted once it is gone)."""
        self._close_codes[conn_id] = code

    def count_closed(self, conn_id: int, draining: bool) -> str:
        """Count a connection gone; its reason: a bye code, `shutdown` or `client`."""
        self.closed += 1
        code = self._close_codes.pop(conn_id, None)
        reason = code.value if code is not None else "shutdown" if draining else "client"
        self.close_reasons[reason] = self.close_reasons.get(reason, 0) + 1
        return reason

    def count_in(self, op: str, route: str = "") -> None:
        key = (op, route)
        self.messages_in[key] = self.messages_in.get(key, 0) + 1

    def count_out(self, op: str, route: str = "") -> None:
        key = (op, route)
        self.messages_out[key] = self.messages_out.get(key, 0) + 1

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class RepeatLog:
    """Warnings for failures that come in bursts: the first of a cause is logged at
    once, later ones are counted and logged as one line per `REPEAT_LOG_INTERVAL_S`
    with their count and the last reason (never a message body)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._counts: dict[str, int] = {}  # cause -> failures not logged yet
        self._quiet_until: dict[str, float] = {}  # cause -> monotonic end of its quiet time
        self._reasons: dict[str, str] = {}  # cause -> the last failure's reason

    def failed(self, cause: str, reason: str) -> None:
        self._counts[cause] = self._counts.get(cause, 0) + 1
        self._reasons[cause] = reason
        now = time.monotonic()
        until = self._quiet_until.get(cause)
        if until is None or now >= until:
            self._report(cause)
        elif self._counts[cause] == 1:  # the first failure of this quiet time
            asyncio.get_running_loop().call_later(until - now, self._report, cause)

    def _report(self, cause: str) -> None:
        count = self._counts.pop(cause, 0)
        if not count:
            return
        self._quiet_until[cause] = time.monotonic() + REPEAT_LOG_INTERVAL_S
        log.warning(
            "%s failed (%s) %d time%s since the last report; last: %s",
            self._what, cause, count, "" if count == 1 else "s", self._reasons.pop(cause),
        )


class Gateway:
    """Holds client connections and forwards their requests to the broker."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        state: StateStore,
        verifier: TokenVerifier,
        *,
        listen: list[str] | None = None,
        reuse_port: bool = False,
        gateway_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.state = state
        self._own_state = not _same(state, broker)  # a separate store (RabbitMQ + Redis)
        self.verifier = verifier
        self.id = gateway_id or new_gateway_id()
        self.specs: list[ListenSpec] = [
            parse_listen(u, settings) for u in (listen or settings.listen)
        ]
        self.reuse_port = reuse_port
        self.limits = Limits.from_settings(settings)
        self.max_connections = settings.effective_max_connections
        self.pending = PendingCalls()
        self.stats = GatewayStats()
        self._publish_failures = RepeatLog("publish")
        self.conns: dict[int, ClientConnection] = {}
        self.far_deadlines = FarDeadlines()
        self._queued: list[ClientConnection] = []  # connections holding queued messages
        # user -> its connection ids: one id as a bare int (most users have one
        # connection; a set costs an idle connection 216 bytes), more in a set.
        self.users: dict[str, int | set[int]] = {}
        self.rooms: dict[str, set[int]] = {}
        self.servers: list[asyncio.Server] = []
        self._next_conn = 0
        self._bound_users: set[str] = set()
        self._bound_rooms: set[str] = set()
        self._binding_lock = asyncio.Lock()
        self._tasks: set[Future[Any]] = set()  # tasks, and publishes in flight
        self._loops: list[asyncio.Task[None]] = []
        self._attached = False  # the inbox was opened once (see `start`)
        self._draining = False
        self._drained = asyncio.Event()
        self._changed = asyncio.Event()  # a call, publish or connection ended

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Attach to the broker (connect, open the inbox), start listening.

        A broker that cannot be reached yet is an outage that began first (DESIGN.md
        §3.4): the gateway listens anyway, is not ready, answers new work
        `unavailable`, and the inbox loop attaches with backoff and jitter.
        """
        unreachable: BrokerError | None = None
        try:
            await self._reattach()
        except BrokerError as exc:
            unreachable = exc
        self._loops = [
            asyncio.create_task(self._inbox_loop(unreachable), name="gateway-inbox"),
            asyncio.create_task(self._heartbeat_loop(), name="gateway-heartbeat"),
            asyncio.create_task(self._deadline_loop(), name="gateway-deadlines"),
        ]
        for spec in self.specs:
            server = await open_server(
                spec, self._protocol_factory(spec), reuse_port=self.reuse_port
            )
            self.servers.append(server)
            log.info("listening on %s", spec.url, extra={"gateway": self.id})
        settle_heap()

    def _protocol_factory(self, spec: ListenSpec) -> Callable[[], ClientConnection]:
        codec_factory = spec.codec_factory()
        return lambda: ClientConnection(self, codec_factory)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener, in `--listen` order."""
        out = []
        for server in self.servers:
            host, port = server.sockets[0].getsockname()[:2]
            out.append((host, port))
        return out

    def is_ready(self) -> bool:
        return not self._draining and self._attached and self.broker.is_ready()

    async def drain(self) -> None:
        """Graceful shutdown; returns when every connection is closed."""
        if self._draining:
            await self._drained.wait()
            return
        self._draining = True
        for server in self.servers:
            server.close()
        retry_after_ms = int(1000 + random.random() * 2000)
        for conn in list(self.conns.values()):
            conn.start_draining(retry_after_ms)
            self.close_if_answered(conn)
        await self._wait_until(
            lambda: not self.pending and not self._publishing(), self.settings.drain_timeout_s
        )
        for call in self.pending.drain():
            left = self.conns.get(call.conn)
            if left is not None:
                self.stats.count_error(ErrorCode.SHUTDOWN.value)
                left.send_payload(
                    wire.encode_error(ErrorCode.SHUTDOWN, "drain deadline reached", call.client_id)
                )
        for conn in list(self.conns.values()):
            conn.close()
        await self._wait_until(lambda: not self.conns, CLOSE_GRACE_S + 0.5)
        self._drained.set()

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait for `predicate` to hold, re-checked whenever calls or connections end."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def aclose(self) -> None:
        """Stop every task and release the broker side (after `drain`)."""
        for server in self.servers:
            server.close()
        self.far_deadlines.close()
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()
        try:
            if self._attached:  # else there is no inbox to remove
                await self.broker.close_inbox(self.id)
                await self.state.forget_gateway(self.id)
        except BrokerError as exc:
            log.warning("could not remove the inbox cleanly: %s", exc)
        if self._own_state:
            await self.state.aclose()
        await self.broker.aclose()
        release_heap()

    def _publishing(self) -> bool:
        return any(c.in_flight for c in self.conns.values())

    def close_if_answered(self, conn: ClientConnection) -> None:
        """Close a connection that is draining, or half-closed by its client, once
        nothing it asked for is still awaiting an answer."""
        if (
            (self._draining or conn.read_eof)
            and conn.in_flight == 0
            and self.pending.count(conn.conn_id) == 0
        ):
            conn.close()

    # -- connections --------------------------------------------------------------

    def admit(self, conn: ClientConnection) -> bool:
        """Register a new connection, or refuse it past the cap or while draining."""
        if self._draining or len(self.conns) >= self.max_connections:
            self.stats.rejected_overloaded += 1
            return False
        self._next_conn += 1
        conn.conn_id = self._next_conn
        self.conns[conn.conn_id] = conn
        self.stats.opened += 1
        log.info("connection open", extra={"gateway": self.id, "conn": conn.conn_id})
        return True

    def forget(self, conn: ClientConnection) -> None:
        """The socket is gone: drop its calls, memberships and user binding."""
        if self.conns.pop(conn.conn_id, None) is None:
            return
        self._changed.set()
        reason = self.stats.count_closed(conn.conn_id, self._draining)
        self.pending.drop_connection(conn.conn_id)
        session = conn.session
        log.info(
            "connection closed",
            extra={"gateway": self.id, "conn": conn.conn_id, "reason": reason,
                   "user": session.user if session is not None else None},
        )
        if session is None or session.user is None:
            return
        user = session.user
        rooms = session.take_rooms()
        for room in rooms:
            self._local_leave(room, conn.conn_id)
        _index_discard(self.users, user, conn.conn_id)
        self._spawn(self._cleanup(user, conn.conn_id, rooms))

    async def _cleanup(self, user: str, conn_id: int, rooms: list[str]) -> None:
        try:
            for room in rooms:
                await self.state.room_leave(room, Member(self.id, conn_id, user))
            await self._sync_bindings(users=[user], rooms=rooms)
        except BrokerError as exc:
            log.info("cleanup of conn %d deferred to expiry: %s", conn_id, exc)

    # -- requests (called by connections) -----------------------------------------

    def publish(self, conn: ClientConnection, action: Publish) -> None:
        """Hand the envelope to the broker; answered from `_published`, no task needed
        when the broker hands back a future."""
        conn.in_flight += 1
        published = asyncio.ensure_future(self.broker.publish(action.envelope))
        self._tasks.add(published)
        published.add_done_callback(partial(self._published, conn, action, time.monotonic()))

    def _published(
        self, conn: ClientConnection, action: Publish, started: float, published: Future[None]
    ) -> None:
        self._tasks.discard(published)
        envelope = action.envelope
        conn.in_flight -= 1
        self._changed.set()
        try:
            if published.cancelled():  # the gateway is closing
                return
            error = published.exception()
            if error is None:
                self.stats.publish_latency.observe(time.monotonic() - started)
                self.stats.count_in(envelope.kind, envelope.route)
                if envelope.kind == "send" and action.client_id is not None:
                    self.stats.count_out("ack")
                    conn.send_payload(wire.encode_ack(action.client_id))
                return
            if not isinstance(error, BrokerError):
                raise error
            self.stats.publish_failures += 1
            self.stats.count_error(error.code.value)
            # The route a client asked for is its input: never in the logs.
            reason = "no worker registered the route" if isinstance(error, UnknownRoute) \
                else str(error)
            self._publish_failures.failed(error.code.value, reason)
            # A call already answered `timeout` gets nothing more; anything else is
            # told the broker did not take it (never dropped silently).
            if envelope.kind == "call" and self.pending.pop(envelope.id, conn.conn_id) is None:
                return
            conn.send_payload(
                wire.encode_error(error.code, _broker_message(error), action.client_id)
            )
        finally:
            self.close_if_answered(conn)

    def authenticated(self, conn: ClientConnection, action: Authenticated) -> None:
        self.stats.count_in("auth")
        user = action.user
        _index_add(self.users, user, conn.conn_id)
        if user in self._bound_users:
            conn.send_payload(wire.encode_ok(user, action.client_id))
            return
        self._answer_later(conn, self._bind_user_then_ok(conn, user, action))

    async def _bind_user_then_ok(
        self, conn: ClientConnection, user: str, action: Authenticated
    ) -> None:
        try:
            await self._sync_bindings(users=[user])
        except BrokerError as exc:
            # The user is authenticated; pushes to it may miss until the next auth.
            log.warning("bind_user failed: %s", exc, extra={"conn": conn.conn_id})
        conn.send_payload(wire.encode_ok(user, action.client_id))

    def join_room(self, conn: ClientConnection, action: JoinRoom) -> None:
        self.stats.count_in("sub")
        self._answer_later(conn, self._join_room(conn, action))

    async def _join_room(self, conn: ClientConnection, action: JoinRoom) -> None:
        session = conn.session
        assert session is not None
        assert session.user is not None
        member = Member(self.id, conn.conn_id, session.user)
        try:
            await self.state.room_join(action.room, member)
            if session.state is not State.OPEN and session.state is not State.DRAINING:
                await self.state.room_leave(action.room, member)
                return
            self._local_join(action.room, conn)
            await self._sync_bindings(rooms=[action.room])
        except BrokerError as exc:
            conn.send_payload(wire.encode_error(exc.code, _broker_message(exc), action.client_id))
            return
        conn.send_payload(wire.encode_ok(session.user, action.client_id))

    def leave_room(self, conn: ClientConnection, action: LeaveRoom) -> None:
        self.stats.count_in("unsub")
        self._answer_later(conn, self._leave_room(conn, action))

    async def _leave_room(self, conn: ClientConnection, action: LeaveRoom) -> None:
        session = conn.session
        assert session is not None
        assert session.user is not None
        self._local_leave(action.room, conn.conn_id)
        session.discard_room(action.room)
        try:
            await self.state.room_leave(action.room, Member(self.id, conn.conn_id, session.user))
            await self._sync_bindings(rooms=[action.room])
        except BrokerError as exc:
            conn.send_payload(wire.encode_error(exc.code, _broker_message(exc), action.client_id))
            return
        conn.send_payload(wire.encode_ok(session.user, action.client_id))

    def _local_join(self, room: str, conn: ClientConnection) -> None:
        assert conn.session is not None
        conn.session.add_room(room)
        self.rooms.setdefault(room, set()).add(conn.conn_id)

    def _local_leave(self, room: str, conn_id: int) -> None:
        members = self.rooms.get(room)
        if members is not None:
            members.discard(conn_id)
            if not members:
                del self.rooms[room]

    async def _sync_bindings(
        self, *, users: Iterable[str] = (), rooms: Iterable[str] = ()
    ) -> None:
        """Make the broker's bindings match the local tables.

        One lock serializes bind/unbind, and each decision is taken after the lock
        is held, so a join racing a leave always ends in the state the tables hold.
        """
        async with self._binding_lock:
            for user in users:
                wanted = user in self.users
                if wanted and user not in self._bound_users:
                    await self.broker.bind_user(self.id, user)
                    self._bound_users.add(user)
                elif not wanted and user in self._bound_users:
                    self._bound_users.discard(user)
                    await self.broker.unbind_user(self.id, user)
            for room in rooms:
                wanted = room in self.rooms
                if wanted and room not in self._bound_rooms:
                    await self.broker.bind_room(self.id, room)
                    self._bound_rooms.add(room)
                elif not wanted and room in self._bound_rooms:
                    self._bound_rooms.discard(room)
                    await self.broker.unbind_room(self.id, room)

    async def _reattach(self) -> None:
        """Connect if never connected, open the inbox (again) and restore every
        binding and room membership.

        After an outage longer than `presence_ttl_s` (or a broker restarted without
        its data) the broker has forgotten this gateway; its connections have not.
        """
        await self.broker.connect()  # both: no-op once connected
        if self._own_state:
            await self.state.connect()
        await self.broker.open_inbox(self.id)
        await self._heartbeat_once()
        async with self._binding_lock:
            self._bound_users.clear()
            self._bound_rooms.clear()
        await self._sync_bindings(users=list(self.users), rooms=list(self.rooms))
        for room, conn_ids in list(self.rooms.items()):
            for conn_id in list(conn_ids):
                conn = self.conns.get(conn_id)
                if conn is not None and conn.session is not None and conn.session.user:
                    await self.state.room_join(room, Member(self.id, conn_id, conn.session.user))
        self._attached = True

    # -- replies and pushes ---------------------------------------------------------

    async def _inbox_loop(self, unreachable: BrokerError | None) -> None:
        """Read replies and pushes; attach again after failures (first, if `start`
        could not: `unreachable`), with backoff and jitter."""
        backoff = 0.1
        failures = 0
        if unreachable is not None:
            failures = 2
            backoff = await self._pause(backoff, unreachable)
        while True:
            try:
                if failures >= 2:
                    attached = self._attached
                    await self._reattach()
                    log.info(
                        "inbox reattached" if attached else "broker reached: inbox open, ready",
                        extra={"gateway": self.id},
                    )
                messages = await self.broker.read_inbox(self.id, INBOX_BATCH, INBOX_WAIT_S)
            except BrokerError as exc:
                failures += 1
                backoff = await self._pause(backoff, exc)
                continue
            backoff = 0.1
            failures = 0
            self.stats.inbox_read_at = time.monotonic()
            for message in messages:
                if isinstance(message, Join | Leave):
                    self._flush_queued()  # what came before leaves before the await
                    await self._membership(message)
                else:
                    self._dispatch(message)
            self._flush_queued()

    async def _pause(self, backoff: float, exc: BrokerError) -> float:
        """Log the failure, wait about `backoff` (with jitter); the next backoff."""
        log.warning(
            "%s, retrying in %.1fs: %s",
            "inbox read failed" if self._attached else "cannot reach the broker; not ready",
            backoff, exc, extra={"gateway": self.id},
        )
        await asyncio.sleep(backoff * (0.5 + random.random()))
        return min(backoff * 2, 5.0)

    def _dispatch(self, message: Reply | ErrorReply | Push) -> None:
        match message:
            case Reply(ref=ref, conn=conn_id, data=data):
                call = self._take_pending(ref, conn_id)
                if call is not None:
                    self.stats.count_out("reply")
                    self._deliver(conn_id, wire.encode_reply(call.client_id, data))
            case ErrorReply(ref=ref, conn=conn_id, code=code, message=text):
                call = self._take_pending(ref, conn_id)
                if call is not None:
                    self.stats.count_error(code)
                    self._deliver(conn_id, wire.encode_error(code, text, call.client_id))
            case Push(route=route, data=data, conn=conn_id, user=user, room=room):
                self.stats.count_out("push", route)
                payload = wire.encode_push(route, data, room)
                if conn_id is not None:
                    self._deliver(conn_id, payload)
                elif user is not None:
                    for target in _index_get(self.users, user):
                        self._deliver(target, payload)
                elif room is not None:
                    for target in list(self.rooms.get(room, ())):
                        self._deliver(target, payload)

    async def _membership(self, message: Join | Leave) -> None:
        match message:
            case Join(conn=conn_id, room=room, user=user):
                await self._apply_join(conn_id, room, user)
            case Leave(conn=conn_id, room=room):
                conn = self.conns.get(conn_id)
                if conn is not None and conn.session is not None:
                    conn.session.discard_room(room)
                self._local_leave(room, conn_id)
                await self._guarded(self._sync_bindings(rooms=[room]))

    async def _apply_join(self, conn_id: int, room: str, user: str) -> None:
        conn = self.conns.get(conn_id)
        if conn is None or conn.session is None or conn.session.state is State.CLOSED:
            await self._guarded(self.state.room_leave(room, Member(self.id, conn_id, user)))
            return
        self._local_join(room, conn)
        await self._guarded(self._sync_bindings(rooms=[room]))

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except BrokerError as exc:
            log.warning("broker bookkeeping failed: %s", exc)

    def _take_pending(self, ref: str, conn_id: int) -> PendingCall | None:
        call = self.pending.pop(ref, conn_id)
        if call is None:
            self.stats.late_replies += 1
            return None
        # The call started at its deadline less the call timeout (no clock kept per call).
        self.stats.call_latency.observe(time.time() - call.deadline + self.settings.call_timeout_s)
        return call

    def _deliver(self, conn_id: int, payload: bytes) -> None:
        """Queue a message for a connection; `_flush_queued` writes it (one write per
        connection however many messages a batch has for it)."""
        conn = self.conns.get(conn_id)
        if conn is None:
            self.stats.dropped_pushes += 1
            return
        if conn.queue_payload(payload):
            self._queued.append(conn)

    def _flush_queued(self) -> None:
        self._changed.set()  # calls were answered (or dropped): drain may be done
        queued = self._queued
        for conn in queued:
            conn.flush_queued()
            self.close_if_answered(conn)
        queued.clear()

    # -- timers ---------------------------------------------------------------------

    async def _deadline_loop(self) -> None:
        while True:
            await asyncio.sleep(DEADLINE_TICK_S)
            for call in self.pending.expire(time.time()):
                self.stats.timeouts += 1
                self.stats.count_error(ErrorCode.TIMEOUT.value)
                self._deliver(
                    call.conn,
                    wire.encode_error(
                        ErrorCode.TIMEOUT, "no answer before the call's deadline", call.client_id
                    ),
                )
            self._flush_queued()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self._attached:  # else the inbox loop is attaching
                await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        try:
            await self.broker.heartbeat(self.id)
            if self._own_state:
                await self.state.heartbeat(self.id)
        except BrokerError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _answer_later(self, conn: ClientConnection, work: Coroutine[Any, Any, None]) -> None:
        """Run `work`, which answers a request of `conn`: counted in flight until done,
        so a drain or a half-close waits for its answer."""
        conn.in_flight += 1
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(partial(self._answered, conn))

    def _answered(self, conn: ClientConnection, task: Future[None]) -> None:
        self._tasks.discard(task)
        conn.in_flight -= 1
        self._changed.set()
        self.close_if_answered(conn)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _index_add(index: dict[str, int | set[int]], key: str, conn_id: int) -> None:
    held = index.get(key)
    if held is None:
        index[key] = conn_id
    elif isinstance(held, int):
        if held != conn_id:
            index[key] = {held, conn_id}
    else:
        held.add(conn_id)


def _index_discard(index: dict[str, int | set[int]], key: str, conn_id: int) -> None:
    held = index.get(key)
    if isinstance(held, int):
        if held == conn_id:
            del index[key]
    elif held is not None:
        held.discard(conn_id)
        if len(held) == 1:
            index[key] = held.pop()


def _index_get(index: dict[str, int | set[int]], key: str) -> tuple[int, ...]:
    held = index.get(key)
    if held is None:
        return ()
    return (held,) if isinstance(held, int) else tuple(held)


def _same(a: object, b: object) -> bool:
    return a is b


def _broker_message(exc: BrokerError) -> str:
    match exc.code:
        case ErrorCode.UNKNOWN_ROUTE:
            return str(exc) or "no worker serves this route"
        case ErrorCode.OVERLOADED:
            return "the route's queue is full"
        case _:
            return "the broker did not confirm the message; retry what is safe to repeat"

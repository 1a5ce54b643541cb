"""The asyncio client of wire protocol v1, used by tests, the CLI and applications.

One connection per `Client`, over `tcp://`, `tcp+len://`, `ws://H:P/path` or their
TLS twins (`tls://`, `tls+len://`, `wss://`); WebSocket links use websockets' asyncio
client. The client owns one supervisor task: it reads frames through its link, hands
each answer to the request waiting for its `id` (ids are ints counting up), queues
pushes (bounded: the oldest is dropped and counted when nobody reads them), and
records the gateway's `bye`. With `reconnect=True` it re-dials after the link drops,
with exponential backoff capped at 5 s plus jitter, then re-authenticates and rejoins
its rooms; requests in flight when a link drops fail with `ConnectionClosed` (the
caller decides whether a retry is safe), and new requests wait for the next link.

    async with await connect("tcp://127.0.0.1:7878", token=token) as client:
        print(await client.call("echo", {"x": 1}))
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import json
import logging
import random
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import msgspec
from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.exceptions import InvalidHandshake

from portao.errors import ConnectionClosed, ErrorCode, RequestError
from portao.wire.events import BadMessage, FrameError
from portao.wire.framing import STREAM_CODECS, FrameCodec
from portao.wire.messages import decode_server_message

log = logging.getLogger("portao.client")
# websockets' own logger, held at WARNING: its DEBUG lines would print `auth` frames.
_ws_log = logging.getLogger("portao.client.websocket")
_ws_log.setLevel(logging.WARNING)

READ_BYTES: Final = 65536
#: Bye codes after which re-dialling cannot help: the token is the problem.
FINAL_BYE_CODES: Final = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN})

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Push:
    """A server-initiated message; `room` is set when it was sent to a room."""

    route: str
    data: Any = field(repr=False)
    room: str | None = None


@dataclass(slots=True)
class Backoff:
    """Delays between reconnection attempts: doubling from `base_s`, capped, jittered.

    Sans-I/O: it computes delays, the caller sleeps. `jitter` is the largest extra
    fraction added, so many clients dropped at once do not return in lockstep.
    """

    base_s: float = 0.1
    cap_s: float = 5.0
    jitter: float = 0.2
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def next_delay_s(self) -> float:
        """The delay before the next attempt (and count this attempt)."""
        delay = min(self.cap_s, self.base_s * 2.0**self.attempt)
        self.attempt += 1
        return delay * (1.0 + self.jitter * self.rand())

    def reset(self) -> None:
        """A link came up: the next outage starts again from `base_s`."""
        self.attempt = 0


_WS_SCHEMES: Final = ("ws", "wss")
SCHEMES: Final = (*STREAM_CODECS, *_WS_SCHEMES)


@dataclass(frozen=True, slots=True)
class _Address:
    url: str
    host: str
    port: int
    scheme: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Address:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            schemes = ", ".join(f"{s}://" for s in SCHEMES)
            raise ValueError(f"unsupported URL {url!r}: the client speaks {schemes}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"URL {url!r} needs a host and a port")
        context = None
        if parts.scheme.startswith("tls") or parts.scheme == "wss":
            context = ssl_context or ssl.create_default_context()
        return cls(url, parts.hostname, parts.port, parts.scheme, context)


class _Link(abc.ABC):
    """One connection to the gateway, replaced on every reconnect.

    Subclasses carry messages over a byte stream with a codec, or over WebSocket.
    """

    def __init__(self) -> None:
        self.is_closed = False
        self.bye: dict[str, Any] | None = None

    @staticmethod
    async def open(address: _Address, max_frame_bytes: int, timeout_s: float) -> _Link:
        """Dial `address`; OSError or TimeoutError when the gateway cannot be reached."""
        if address.scheme in _WS_SCHEMES:
            return await _WsLink.open(address, max_frame_bytes, timeout_s)
        return await _StreamLink.open(address, max_frame_bytes, timeout_s)

    def closed_error(self) -> ConnectionClosed:
        """What requests on this link fail with once it is gone."""
        if self.bye is not None:
            return ConnectionClosed(str(self.bye.get("code")), str(self.bye.get("message", "")))
        return ConnectionClosed(None, "connection lost")

    @abc.abstractmethod
    async def send(self, payload: bytes) -> None:
        """Send one message (a JSON payload); ConnectionClosed once the link is gone."""

    @abc.abstractmethod
    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are: framing included on a stream, one text message on ws."""

    @abc.abstractmethod
    def payloads(self) -> AsyncIterator[bytes]:
        """Each message the gateway sends, until the link ends."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection (bounded in time)."""


class _StreamLink(_Link):
    """TCP or TLS with a wire codec: newline or length-prefixed JSON."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: FrameCodec
    ) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self.codec = codec

    @classmethod
    async def open(cls, address: _Address, max_frame_bytes: int, timeout_s: float) -> _Link:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, ssl=address.ssl_context, limit=READ_BYTES
            )
        return cls(reader, writer, STREAM_CODECS[address.scheme](max_frame_bytes))

    async def send(self, payload: bytes) -> None:
        await self.send_raw(self.codec.send_frame(payload))

    async def send_raw(self, data: bytes) -> None:
        if self.is_closed:
            raise self.closed_error()
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(None, f"connection lost: {exc}") from None

    async def payloads(self) -> AsyncIterator[bytes]:
        codec = self.codec
        while not codec.is_closed:
            codec.receive_data(await self.reader.read(READ_BYTES))
            for event in codec.events_received():
                if isinstance(event, FrameError):
                    log.warning("gateway broke the framing: %s", event.message)
                else:
                    yield event.payload

    async def aclose(self) -> None:
        self.is_closed = True
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


class _WsLink(_Link):
    """WebSocket (`ws://`, `wss://`): one JSON object per text message."""

    def __init__(self, ws: WsConnection) -> None:
        super().__init__()
        self.ws = ws

    @classmethod
    async def open(cls, address: _Address, max_frame_bytes: int, timeout_s: float) -> _Link:
        try:
            ws = await ws_connect(
                address.url,
                ssl=address.ssl_context,
                open_timeout=timeout_s,
                max_size=max_frame_bytes,
                compression=None,
                proxy=None,
                logger=_ws_log,
            )
        except InvalidHandshake as exc:
            # The gateway answered, but not as a WebSocket endpoint: refused, not down.
            raise ConnectionRefusedError(f"WebSocket handshake refused: {exc}") from None
        return cls(ws)

    async def send(self, payload: bytes) -> None:
        await self.send_raw(payload)

    async def send_raw(self, data: bytes) -> None:
        if self.is_closed:
            raise self.closed_error()
        try:
            await self.ws.send(data, text=True)
        except WsClosed as exc:
            raise ConnectionClosed(None, f"connection lost: {exc}") from None

    async def payloads(self) -> AsyncIterator[bytes]:
        try:
            while True:
                message = await self.ws.recv(decode=False)
                yield message if isinstance(message, bytes) else message.encode()
        except WsClosed:
            return

    async def aclose(self) -> None:
        self.is_closed = True
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.ws.close()


_CLOSED: Final = object()  # queued once the client is closed for good, wakes readers


class Client:
    """A connection to a portao gateway. Build it with `connect()`."""

    def __init__(
        self,
        link: _Link,
        address: _Address,
        *,
        max_frame_bytes: int,
        connect_timeout_s: float,
        request_timeout_s: float,
        max_queued: int,
        reconnect: bool,
        backoff: Backoff,
    ) -> None:
        self.user: str | None = None
        #: The gateway's last `bye`, once one was received.
        self.bye: dict[str, Any] | None = None
        #: Pushes (and unmatched messages) dropped because nobody read them in time.
        self.dropped = 0
        self._link = link
        self._address = address
        self._max_frame_bytes = max_frame_bytes
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._reconnect = reconnect
        self._backoff = backoff
        self._ids = itertools.count(1)
        self._pending: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self._pushes: asyncio.Queue[Push | object] = asyncio.Queue(max_queued)
        self._unmatched: asyncio.Queue[dict[str, Any] | object] = asyncio.Queue(max_queued)
        self._token: str | None = None
        self._rooms: set[str] = set()
        self._link_up = asyncio.Event()
        self._link_up.set()
        self._closed_error: ConnectionClosed | None = None
        self._closing = False
        self._supervisor = asyncio.create_task(self._supervise(link), name="portao-client")

    # -- public API -------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """True once the client will never carry another request."""
        return self._closed_error is not None

    async def auth(self, token: str) -> str:
        """Authenticate (or refresh the token); returns the user. Raises RequestError."""
        answer = self._expect(await self._request({"op": "auth", "token": token}), "ok")
        self.user = str(answer["user"])
        self._token = token
        return self.user

    async def call(self, route: str, data: Any = None, *, timeout_s: float | None = None) -> Any:
        """Call `route` and return the worker's reply data. Raises RequestError."""
        message = {"op": "call", "route": route, "data": data}
        return self._expect(await self._request(message, timeout_s), "reply").get("data")

    async def send(self, route: str, data: Any = None, *, ack: bool = True) -> None:
        """Send to `route`; with `ack`, return once the broker accepted it."""
        message = {"op": "send", "route": route, "data": data}
        if ack:
            self._expect(await self._request(message), "ack")
        else:
            await self._send_frame(_encode(message))

    async def sub(self, room: str) -> None:
        """Join `room` (rejoined after a reconnect)."""
        self._expect(await self._request({"op": "sub", "room": room}), "ok")
        self._rooms.add(room)

    async def unsub(self, room: str) -> None:
        """Leave `room`."""
        self._expect(await self._request({"op": "unsub", "room": room}), "ok")
        self._rooms.discard(room)

    async def ping(self) -> None:
        """Round trip to the gateway."""
        self._expect(await self._request({"op": "ping"}), "pong")

    async def next_push(self, timeout_s: float | None = None) -> Push:
        """The next push; raises ConnectionClosed once closed and drained."""
        item = await self._next(self._pushes, timeout_s)
        assert isinstance(item, Push)
        return item

    async def pushes(self) -> AsyncIterator[Push]:
        """Every push until the client is closed."""
        while True:
            try:
                yield await self.next_push()
            except ConnectionClosed:
                return

    async def request_raw(
        self, message: dict[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Send any message and return the answer carrying its `id`, error or not.

        An `id` is added when the message has none. An answer the gateway cannot tie
        to the id (an invalid id, a duplicate) arrives through `recv_raw` instead.
        """
        return await self._request(dict(message), timeout_s)

    async def _send_frame(self, payload: bytes) -> None:
        """Send one payload, framed by the link's codec, expecting no answer."""
        link = await self._wait_link()
        await link.send(payload)

    async def send_raw(self, payload: bytes) -> None:
        """Write bytes as they are, framing included (for abuse tests)."""
        link = await self._wait_link()
        await link.send_raw(payload)

    async def recv_raw(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next message no request was waiting for: errors without an id, `bye`…"""
        item = await self._next(self._unmatched, timeout_s)
        assert isinstance(item, dict)
        return item

    async def aclose(self) -> None:
        """Close the connection and stop the client's task."""
        self._reconnect = False
        self._closing = True
        self._supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- requests ---------------------------------------------------------------

    @staticmethod
    def _expect(answer: dict[str, Any], op: str) -> dict[str, Any]:
        if answer.get("op") == "error":
            raise RequestError(str(answer.get("code")), str(answer.get("message", "")))
        if answer.get("op") != op:
            raise RequestError(ErrorCode.BAD_FRAME, f"expected `{op}`, got {answer!r:.80}")
        return answer

    async def _request(
        self, message: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s or self._request_timeout_s):
            link = await self._wait_link()
            return await self._request_on(link, message)

    async def _request_on(self, link: _Link, message: dict[str, Any]) -> dict[str, Any]:
        id = message.setdefault("id", next(self._ids))
        if id in self._pending:
            raise ValueError(f"id {id!r} is already pending")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[id] = future
        try:
            await link.send(_encode(message))
            return await future
        finally:
            del self._pending[id]

    async def _wait_link(self) -> _Link:
        """The current link, waiting through a reconnection."""
        await self._link_up.wait()
        self._raise_if_closed()
        return self._link

    def _raise_if_closed(self) -> None:
        if self._closed_error is not None:
            # A fresh exception each time: one instance raised again and again
            # would grow its traceback without bound.
            raise ConnectionClosed(self._closed_error.code, self._closed_error.message)

    async def _next(self, queue: asyncio.Queue[Any], timeout_s: float | None) -> object:
        async with asyncio.timeout(timeout_s):
            item = await queue.get()
        if item is _CLOSED:
            queue.put_nowait(_CLOSED)  # every later reader sees it too
            self._raise_if_closed()
        return item

    # -- the supervisor task ----------------------------------------------------

    async def _supervise(self, link: _Link) -> None:
        """Read each link until it drops; re-dial while `reconnect` holds."""
        final: ConnectionClosed | None = None  # None: closed by aclose()
        try:
            while True:
                reader = asyncio.create_task(self._read(link), name="portao-client-read")
                try:
                    if link is not self._link:
                        self._link = link
                        await self._rejoin(link)
                        self._link_up.set()
                        self._backoff.reset()
                    await reader
                except ConnectionClosed:
                    pass  # the link dropped during the rejoin: dial again
                finally:
                    reader.cancel()
                    await asyncio.wait([reader])
                    self._link_up.clear()
                    await link.aclose()
                    self._fail_pending(self._drop_error(link))
                if not self._should_redial(link):
                    final = self._drop_error(link)
                    break
                link = await self._redial(link)
        except RequestError as exc:
            final = ConnectionClosed(exc.code, f"token refused on reconnect: {exc.message}")
        finally:
            self._close_for_good(final or self._drop_error(None))

    def _drop_error(self, link: _Link | None) -> ConnectionClosed:
        """Why requests on `link` failed: closed by us, or the link's own end."""
        if self._closing or link is None:
            return ConnectionClosed(None, "client closed")
        return link.closed_error()

    def _should_redial(self, link: _Link) -> bool:
        if not self._reconnect:
            return False
        return link.bye is None or link.bye.get("code") not in FINAL_BYE_CODES

    async def _redial(self, dropped: _Link) -> _Link:
        retry_after_ms = (dropped.bye or {}).get("retry_after_ms")
        first_delay_s = retry_after_ms / 1000 if isinstance(retry_after_ms, int) else 0.0
        await asyncio.sleep(first_delay_s + self._backoff.next_delay_s())
        while True:
            try:
                return await _Link.open(
                    self._address, self._max_frame_bytes, self._connect_timeout_s
                )
            except (OSError, TimeoutError) as exc:
                delay_s = self._backoff.next_delay_s()
                log.info(
                    "reconnect to %s failed (%s); retry in %.2f s", self._address.host, exc, delay_s
                )
                await asyncio.sleep(delay_s)

    async def _rejoin(self, link: _Link) -> None:
        """Re-authenticate and rejoin rooms on a new link, before anyone else uses it.

        A refused token ends the client (RequestError); any other trouble is the
        link's (ConnectionClosed), so the supervisor dials again.
        """
        if self._token is not None:
            answer = await self._timed_request_on(link, {"op": "auth", "token": self._token})
            if answer.get("op") != "ok":
                if answer.get("code") in FINAL_BYE_CODES:
                    self._expect(answer, "ok")
                raise ConnectionClosed(answer.get("code"), "auth failed while rejoining")
            self.user = str(answer["user"])
        for room in sorted(self._rooms):
            answer = await self._timed_request_on(link, {"op": "sub", "room": room})
            if answer.get("op") != "ok":
                log.warning("room %s not rejoined: %s", room, answer.get("code"))
                self._rooms.discard(room)

    async def _timed_request_on(self, link: _Link, message: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._request_timeout_s):
                return await self._request_on(link, message)
        except TimeoutError:
            raise ConnectionClosed(None, "no answer while rejoining") from None

    async def _read(self, link: _Link) -> None:
        """Dispatch every message of the link until it ends."""
        try:
            async for payload in link.payloads():
                self._dispatch(link, decode_server_message(payload))
        except (ConnectionError, OSError) as exc:
            log.info("connection lost: %s", exc)
        finally:
            link.is_closed = True

    def _dispatch(self, link: _Link, message: dict[str, Any] | BadMessage) -> None:
        if isinstance(message, BadMessage):
            log.warning("undecodable message from the gateway: %s", message.message)
            return
        op = message["op"]
        if op == "push":
            route, room = message.get("route"), message.get("room")
            if isinstance(route, str) and (room is None or isinstance(room, str)):
                self._queue(self._pushes, Push(route, message.get("data"), room))
                return
        elif op == "bye":
            link.bye = self.bye = message
        id = message.get("id")
        future = self._pending.get(id) if isinstance(id, int | str) else None
        if future is not None and not future.done():
            future.set_result(message)
            return
        self._queue(self._unmatched, message)

    def _queue(self, queue: asyncio.Queue[Any], item: object) -> None:
        if queue.full():
            queue.get_nowait()
            self.dropped += 1
        queue.put_nowait(item)

    def _take_queued(self) -> list[Push | dict[str, Any]]:
        """Empty both queues without waiting (what arrived but was not read yet)."""
        taken: list[Push | dict[str, Any]] = []
        for queue in (self._pushes, self._unmatched):
            while not queue.empty():
                item = queue.get_nowait()
                if not isinstance(item, Push | dict):
                    queue.put_nowait(item)  # the closed marker stays last
                    break
                taken.append(item)
        return taken

    def _fail_pending(self, error: ConnectionClosed) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionClosed(error.code, error.message))

    def _close_for_good(self, error: ConnectionClosed) -> None:
        self._closed_error = error
        self._fail_pending(error)
        self._link_up.set()  # wake waiters: they see the closed error
        for queue in (self._pushes, self._unmatched):
            self._queue(queue, _CLOSED)


async def connect(
    url: str,
    *,
    token: str | None = None,
    max_frame_bytes: int = 65536,
    connect_timeout_s: float = 10.0,
    request_timeout_s: float = 60.0,
    max_queued: int = 10_000,
    reconnect: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> Client:
    """Dial a gateway and authenticate with `token` when given.

    URLs: `tcp://H:P`, `tcp+len://H:P`, `ws://H:P/path` and their TLS twins `tls://`,
    `tls+len://`, `wss://` (verified with `ssl_context`, or the system's CAs).

    `request_timeout_s` bounds every request that does not pass its own timeout
    (the gateway's `call_timeout_s` answers first by default). Raises OSError or
    TimeoutError when the gateway cannot be reached, RequestError when `token` is
    refused.
    """
    address = _Address.parse(url, ssl_context)
    link = await _Link.open(address, max_frame_bytes, connect_timeout_s)
    client = Client(
        link,
        address,
        max_frame_bytes=max_frame_bytes,
        connect_timeout_s=connect_timeout_s,
        request_timeout_s=request_timeout_s,
        max_queued=max_queued,
        reconnect=reconnect,
        backoff=Backoff(),
    )
    if token is not None:
        try:
            await client.auth(token)
        except BaseException:
            await client.aclose()
            raise
    return client


# -- the interactive client (`portao client`) ------------------------------------

USAGE: Final = (
    "commands: call ROUTE [JSON] | send ROUTE [JSON] | sub ROOM | unsub ROOM | auth TOKEN"
    " | ping | raw JSON | help | quit"
)
HELP: Final = """\
call ROUTE [JSON]  call a route; prints its reply (or error)
send ROUTE [JSON]  send to a route; prints the broker's ack
sub ROOM           join a room; its pushes print as they arrive
unsub ROOM         leave a room
auth TOKEN         authenticate, or refresh the token
ping               a round trip to the gateway
raw JSON           send a message as it is; its answer prints as it comes
help               this list
quit               leave (so does end of input)"""
_STDIN_LINES_AHEAD: Final = 64


async def run_interactive(
    client: Client, stdin: TextIO, stdout: TextIO, notes: TextIO | None = None
) -> int:
    """Run commands read from `stdin`, one per line; print answers and pushes as JSON.

    Each answer, each push and each message no command waited for (a `bye`, the
    answer to a `raw` message) is one JSON line on `stdout`, as it arrives; a line
    that is not a command gets a `client_error` line. Commands run one at a time.
    `help` writes the list of commands to `notes` (plain text; default `stdout`).
    Returns 0 at EOF or `quit`, 1 when the connection closed for good.
    """

    def emit(message: dict[str, Any]) -> None:
        stdout.write(_encode(message).decode() + "\n")
        stdout.flush()

    async with asyncio.TaskGroup() as tasks:
        printers = [
            tasks.create_task(_print_pushes(client, emit)),
            tasks.create_task(_print_unmatched(client, emit)),
        ]
        try:
            async for line in _lines(stdin):
                command = _parse_command(line)
                if isinstance(command, str):
                    emit({"op": "client_error", "message": command})
                elif command.get("op") == "quit":
                    break
                elif command.get("op") == "help":
                    (notes or stdout).write(HELP + "\n")
                    (notes or stdout).flush()
                elif not await _run_command(client, command, emit):
                    return 1
            # A round trip, so answers to `raw` messages sent before EOF are in.
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await client.ping()
            return 0
        finally:
            for printer in printers:
                printer.cancel()
            for item in client._take_queued():
                emit(_push_message(item) if isinstance(item, Push) else item)


def _parse_command(line: str) -> dict[str, Any] | str:
    """The request a command line stands for, `{}` for nothing, or an error text."""
    words = line.split(maxsplit=2)
    if not words or words[0].startswith("#"):
        return {}
    verb, args = words[0], words[1:]
    try:
        match verb, args:
            case (("call" | "send"), [route, *data]):
                return {"op": verb, "route": route, "data": json.loads(data[0]) if data else None}
            case (("sub" | "unsub"), [room]):
                return {"op": verb, "room": room}
            case "auth", [token]:
                return {"op": "auth", "token": token}
            case (("ping" | "quit" | "help"), []):
                return {"op": verb}
            case "raw", [_, *_]:
                message = json.loads(line.split(maxsplit=1)[1])
                if not isinstance(message, dict):
                    return "raw needs a JSON object"
                return {"op": "raw", "message": message}
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    return f"cannot parse {line.strip()[:60]!r}; {USAGE}"


async def _run_command(
    client: Client, command: dict[str, Any], emit: Callable[[dict[str, Any]], None]
) -> bool:
    """Run one parsed command and print its answer; False once the client is closed."""
    try:
        if command.get("op") == "raw":
            await client._send_frame(_encode(command["message"]))  # answer: _print_unmatched
        elif command:
            emit(await client.request_raw(command))
    except ConnectionClosed as exc:
        emit({"op": "closed", "code": exc.code, "message": exc.message})
        return False
    except TimeoutError:
        emit({"op": "client_error", "message": "no answer in time"})
    return True


async def _print_pushes(client: Client, emit: Callable[[dict[str, Any]], None]) -> None:
    async for push in client.pushes():
        emit(_push_message(push))


def _push_message(push: Push) -> dict[str, Any]:
    message = {"op": "push", "route": push.route, "data": push.data}
    return message if push.room is None else {**message, "room": push.room}


async def _print_unmatched(client: Client, emit: Callable[[dict[str, Any]], None]) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            emit(await client.recv_raw())


async def _lines(stdin: TextIO) -> AsyncIterator[str]:
    """Lines of a blocking text stream, read ahead by a daemon thread.

    A thread, because a terminal, a pipe and a regular file all block on read and
    asyncio cannot watch a regular file; a daemon, because a read blocked on a
    terminal cannot be interrupted and must not hold up the process's exit.
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    room = threading.Semaphore(_STDIN_LINES_AHEAD)

    def pump() -> None:
        try:
            for line in iter(stdin.readline, ""):
                room.acquire()
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (OSError, ValueError, RuntimeError):
            pass  # stdin or the loop closed under us
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="portao-client-stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        room.release()
        yield line

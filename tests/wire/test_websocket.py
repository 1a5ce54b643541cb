"""Sans-I/O tests of the WebSocket codec: bytes in, bytes out, against websockets' client.

The peer is websockets' own sans-I/O `ClientProtocol`, so every byte the codec
writes is parsed by a real implementation, and every byte it reads was built by one.
"""

from __future__ import annotations

import logging
import tracemalloc

import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED
from websockets.typing import Origin
from websockets.uri import parse_uri

from portao.errors import ErrorCode
from portao.wire.events import Frame as PortaoFrame
from portao.wire.events import FrameError, FrameEvent
from portao.wire.websocket import WebSocketCodec, WsOptions, close_code_for

LIMIT = 64
_CLIENT_LOG = logging.getLogger("tests.websocket.client")
_CLIENT_LOG.setLevel(logging.WARNING)


class Peer:
    """A browser-like client and the codec under test, wired by hand."""

    def __init__(
        self,
        codec: WebSocketCodec,
        url: str = "ws://gw.test/",
        *,
        origin: str | None = None,
        deflate: bool = False,
    ) -> None:
        self.codec = codec
        self.client = ClientProtocol(
            parse_uri(url),
            origin=Origin(origin) if origin else None,
            extensions=enable_client_permessage_deflate(None) if deflate else None,
            max_size=None,
            logger=_CLIENT_LOG,  # the client's own DEBUG lines would show the URL
        )

    def client_bytes(self) -> bytes:
        return b"".join(self.client.data_to_send())

    def handshake_bytes(self) -> bytes:
        self.client.send_request(self.client.connect())
        return self.client_bytes()

    def feed(self, *chunks: bytes) -> list[FrameEvent]:
        for chunk in chunks:
            self.codec.receive_data(chunk)
        return self.codec.events_received()

    def to_client(self, *written: bytes) -> list[object]:
        """Deliver messages the gateway wrote, then the codec's own bytes; what the client got.

        The order the gateway keeps: it writes the codec's own bytes right after each
        call that makes them, so they follow the messages written before that call.
        """
        self.client.receive_data(b"".join(written) + self.codec.data_to_send())
        return list(self.client.events_received())

    def open(self) -> Response:
        assert self.feed(self.handshake_bytes()) == []
        [response] = self.to_client()
        assert isinstance(response, Response)
        assert response.status_code == 101
        return response

    def send_text(self, data: bytes, fin: bool = True) -> bytes:
        self.client.send_text(data, fin=fin)
        return self.client_bytes()


def opened(max_frame_bytes: int = LIMIT, **options: object) -> Peer:
    peer = Peer(WebSocketCodec(max_frame_bytes, WsOptions(**options)))  # type: ignore[arg-type]
    peer.open()
    return peer


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def closes_with(peer: Peer, events: list[object]) -> Close:
    [frame] = [e for e in events if isinstance(e, Frame) and e.opcode is Opcode.CLOSE]
    close = Close.parse(frame.data)
    return close


# -- handshake and messages ------------------------------------------------------


def test_handshake_then_messages_both_ways() -> None:
    peer = opened()
    assert peer.feed(peer.send_text(b'{"op":"ping"}')) == [PortaoFrame(b'{"op":"ping"}')]
    [frame] = peer.to_client(peer.codec.send_frame(b'{"op":"pong"}'))
    assert isinstance(frame, Frame)
    assert frame.opcode is Opcode.TEXT
    assert frame.data == b'{"op":"pong"}'


def test_handshake_and_messages_one_byte_at_a_time() -> None:
    peer = Peer(WebSocketCodec(LIMIT))
    wire = peer.handshake_bytes()
    assert peer.feed(*bytewise(wire)) == []
    [response] = peer.to_client()
    assert isinstance(response, Response)
    assert response.status_code == 101
    data = peer.send_text(b'{"a":1}') + peer.send_text(b'{"b":"\xc3\xa9"}')
    assert peer.feed(*bytewise(data)) == [PortaoFrame(b'{"a":1}'), PortaoFrame(b'{"b":"\xc3\xa9"}')]


def test_messages_pipelined_behind_the_handshake_and_trailing_bytes() -> None:
    peer = Peer(WebSocketCodec(LIMIT))
    wire = peer.handshake_bytes()
    peer.client.state = peer.client.state.OPEN  # a client that does not wait for 101
    first, second = peer.send_text(b"[1]"), peer.send_text(b"[2]")
    assert peer.feed(wire + first + second[:3]) == [PortaoFrame(b"[1]")]
    assert peer.feed(second[3:]) == [PortaoFrame(b"[2]")]


def test_fragmented_text_message_is_reassembled() -> None:
    peer = opened()
    data = peer.send_text(b'{"x":', fin=False)
    peer.client.send_continuation(b'"\xc3', fin=False)  # UTF-8 split across frames
    peer.client.send_continuation(b'\xa9"}', fin=True)
    data += peer.client_bytes()
    assert peer.feed(data) == [PortaoFrame(b'{"x":"\xc3\xa9"}')]


def test_nothing_is_sent_before_the_handshake() -> None:
    codec = WebSocketCodec(LIMIT)
    assert codec.send_frame(b"{}") == b""
    assert codec.next_deadline(100.0) is None
    codec.send_close(ErrorCode.UNAUTHORIZED)
    assert codec.data_to_send() == b""
    assert not codec.awaits_close_frame


def test_url_token_is_taken_once_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    peer = Peer(WebSocketCodec(LIMIT), "ws://gw.test/?room=a&token=s3cr3t-token")
    peer.open()
    assert peer.codec.take_url_token() == "s3cr3t-token"
    assert peer.codec.take_url_token() is None
    assert "s3cr3t" not in caplog.text


def test_no_token_in_url() -> None:
    peer = opened()
    assert peer.codec.take_url_token() is None


# -- refused handshakes ----------------------------------------------------------


def refused(peer: Peer) -> tuple[Response, list[FrameEvent]]:
    events = peer.feed(peer.handshake_bytes())
    [response] = peer.to_client()
    assert isinstance(response, Response)
    assert peer.codec.is_closed
    return response, events


def test_other_path_is_404() -> None:
    response, events = refused(Peer(WebSocketCodec(LIMIT, WsOptions(path="/ws")), "ws://h/x"))
    assert response.status_code == 404
    assert events == [
        FrameError(ErrorCode.BAD_REQUEST, "WebSocket handshake refused (404 Not Found)", True)
    ]


def test_path_matches_without_query() -> None:
    peer = Peer(WebSocketCodec(LIMIT, WsOptions(path="/ws")), "ws://h/ws?token=t")
    peer.open()


@pytest.mark.parametrize(
    ("origin", "status"),
    [("https://chat.example", 101), (None, 101), ("https://evil.example", 403)],
)
def test_origin_allowlist(origin: str | None, status: int) -> None:
    codec = WebSocketCodec(LIMIT, WsOptions(origins=("https://chat.example",)))
    peer = Peer(codec, origin=origin)
    peer.feed(peer.handshake_bytes())
    [response] = peer.to_client()
    assert isinstance(response, Response)
    assert response.status_code == status


def test_any_origin_without_allowlist() -> None:
    peer = Peer(WebSocketCodec(LIMIT), origin="https://anywhere.example")
    peer.open()


def test_not_http_at_all() -> None:
    codec = WebSocketCodec(LIMIT)
    codec.receive_data(b'{"op":"auth"}\r\n\r\n')
    assert codec.events_received() == [
        FrameError(ErrorCode.BAD_REQUEST, "not a WebSocket handshake", True)
    ]
    assert codec.is_closed


def test_plain_http_get_is_refused() -> None:
    codec = WebSocketCodec(LIMIT)
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    [event] = codec.events_received()
    assert isinstance(event, FrameError)
    assert event.fatal
    assert codec.data_to_send().startswith(b"HTTP/1.1 426 Upgrade Required\r\n")


# -- fatal input: bye first, then the close frame ---------------------------------


def fatal(peer: Peer, data: bytes) -> tuple[FrameError, Close, list[object]]:
    [event] = peer.feed(data)
    assert isinstance(event, FrameError)
    assert event.fatal
    assert not peer.codec.is_open
    bye = peer.codec.send_frame(b'{"op":"bye"}')  # still written: the close is held
    peer.codec.send_close(event.code)
    events = peer.to_client(bye)
    # the bye arrives first, then the close frame
    first = events[0]
    assert isinstance(first, Frame)
    assert first.data == b'{"op":"bye"}'
    assert peer.codec.send_frame(b"{}") == b""
    return event, closes_with(peer, events), events


def test_binary_message_closes_1003() -> None:
    peer = opened()
    peer.client.send_binary(b"\x00\x01")
    event, close, _ = fatal(peer, peer.client_bytes())
    assert event.code is ErrorCode.BAD_FRAME
    assert close.code == 1003


def test_bad_utf8_closes_1007() -> None:
    peer = opened()
    event, close, _ = fatal(peer, peer.send_text(b'{"a":"\xff"}'))
    assert event == FrameError(ErrorCode.BAD_FRAME, "text message is not valid UTF-8", True)
    assert close.code == 1007


def test_message_over_the_limit_closes_1009() -> None:
    peer = opened()
    assert peer.feed(peer.send_text(b"x" * LIMIT)) == [PortaoFrame(b"x" * LIMIT)]
    event, close, _ = fatal(peer, peer.send_text(b"x" * (LIMIT + 1)))
    assert event == FrameError(ErrorCode.TOO_LARGE, f"message over {LIMIT} bytes", True)
    assert close.code == 1009


def test_fragments_over_the_limit_close_1009() -> None:
    peer = opened()
    data = peer.send_text(b"x" * 40, fin=False)
    peer.client.send_continuation(b"y" * 40, fin=True)
    event, close, _ = fatal(peer, data + peer.client_bytes())
    assert event.code is ErrorCode.TOO_LARGE
    assert close.code == 1009


def test_protocol_error_closes_1002() -> None:
    peer = opened()
    unmasked = Frame(Opcode.TEXT, b"{}").serialize(mask=False)  # clients must mask
    event, close, _ = fatal(peer, unmasked)
    assert event.code is ErrorCode.BAD_FRAME
    assert close.code == 1002


def test_valid_messages_before_a_fatal_one_are_kept() -> None:
    peer = opened()
    data = peer.send_text(b"[1]")
    peer.client.send_binary(b"x")
    data += peer.client_bytes() + peer.send_text(b"[2]")
    events = peer.feed(data)
    assert events[0] == PortaoFrame(b"[1]")
    assert len(events) == 2
    assert isinstance(events[1], FrameError)


# -- closing handshakes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "close_code"),
    [
        (ErrorCode.UNAUTHORIZED, 1008),
        (ErrorCode.FORBIDDEN, 1008),
        (ErrorCode.SHUTDOWN, 1001),
        (ErrorCode.IDLE_TIMEOUT, 1000),
        (ErrorCode.OVERLOADED, 1013),
        (ErrorCode.SLOW_CONSUMER, 1013),
        (ErrorCode.TOO_LARGE, 1009),
        (ErrorCode.RATE_LIMITED, 1011),
        (None, 1000),
    ],
)
def test_server_close_codes(code: ErrorCode | None, close_code: int) -> None:
    assert close_code_for(code) == close_code
    peer = opened()
    peer.codec.send_close(code)
    close = closes_with(peer, peer.to_client())
    assert close.code == close_code
    assert close.reason == (code.value if code else "")
    assert peer.codec.awaits_close_frame
    assert not peer.codec.is_closed
    # the client echoes the close frame: now TCP may close
    assert peer.feed(peer.client_bytes()) == []
    assert peer.codec.is_closed
    assert not peer.codec.awaits_close_frame


def test_client_close_is_echoed() -> None:
    peer = opened()
    peer.client.send_close(1000, "bye")
    assert peer.feed(peer.client_bytes()) == []
    assert peer.codec.is_closed
    close = closes_with(peer, peer.to_client())
    assert close == Close(1000, "bye")
    assert peer.codec.send_frame(b"{}") == b""


def test_eof_ends_without_events() -> None:
    peer = opened()
    assert peer.feed(b"") == []
    assert peer.codec.is_closed
    assert peer.codec.data_to_send() == b""
    assert peer.feed(peer.send_text(b"{}")) == []


def test_client_ping_is_answered() -> None:
    peer = opened()
    peer.client.send_ping(b"hi")
    assert peer.feed(peer.client_bytes()) == []
    [pong] = peer.to_client()
    assert isinstance(pong, Frame)
    assert pong.opcode is Opcode.PONG
    assert pong.data == b"hi"


# -- keepalive ---------------------------------------------------------------------


def test_ping_every_interval_and_close_when_silent() -> None:
    peer = opened(ping_interval_s=20.0, ping_timeout_s=20.0)
    codec = peer.codec
    assert codec.next_deadline(1000.0) == 1020.0
    codec.on_deadline(1010.0)  # early: nothing
    assert codec.data_to_send() == b""
    codec.on_deadline(1020.0)
    [ping] = peer.to_client()
    assert isinstance(ping, Frame)
    assert ping.opcode is Opcode.PING
    assert codec.next_deadline(1020.0) == 1040.0
    assert peer.feed(peer.client_bytes()) == []  # websockets' client answered: pong
    codec.on_deadline(1040.0)  # heard: a new ping, no event
    assert codec.events_received() == []
    assert [type(e) for e in peer.to_client()] == [Frame]
    codec.on_deadline(1060.0)  # nothing heard since that ping
    assert codec.events_received() == [
        FrameError(ErrorCode.IDLE_TIMEOUT, "no answer to a ping in 20 s", True)
    ]


def test_any_message_counts_as_an_answer() -> None:
    peer = opened(ping_interval_s=5.0, ping_timeout_s=2.0)
    codec = peer.codec
    assert codec.next_deadline(0.0) == 5.0
    codec.on_deadline(5.0)
    assert codec.next_deadline(5.0) == 7.0
    peer.feed(peer.send_text(b"{}"))
    codec.on_deadline(7.0)
    assert codec.events_received() == []
    assert codec.next_deadline(7.0) == 10.0


# -- compression ---------------------------------------------------------------------


def test_compression_off_by_default() -> None:
    peer = Peer(WebSocketCodec(LIMIT), deflate=True)
    response = peer.open()
    assert "Sec-WebSocket-Extensions" not in response.headers
    assert peer.client.extensions == []


def test_compression_on_round_trip() -> None:
    peer = Peer(WebSocketCodec(1024, WsOptions(compression=True)), deflate=True)
    response = peer.open()
    assert response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
    message = b'{"text":"' + b"ab" * 300 + b'"}'
    wire = peer.send_text(message)
    assert len(wire) < len(message) // 4
    assert peer.feed(wire) == [PortaoFrame(message)]
    [frame] = peer.to_client(peer.codec.send_frame(message))
    assert isinstance(frame, Frame)
    assert frame.data == message


def test_compressed_bomb_is_refused_without_inflating_it() -> None:
    """50 MB of zeros deflate to ~50 KB; the limit stops inflating at 64 KiB."""
    limit = 65536
    peer = Peer(WebSocketCodec(limit, WsOptions(compression=True)), deflate=True)
    peer.open()
    bomb = peer.send_text(b"0" * 50_000_000)  # the client's deflate compresses it
    assert len(bomb) < limit
    tracemalloc.start()
    try:
        [event] = peer.feed(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert event == FrameError(ErrorCode.TOO_LARGE, f"message over {limit} bytes", True)
    assert peak < 2_000_000
    peer.codec.send_close(event.code)
    assert closes_with(peer, peer.to_client()).code == 1009
    assert peer.client.state is not CLOSED or peer.client.close_code == 1009

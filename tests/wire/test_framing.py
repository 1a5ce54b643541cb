"""Byte-exact tests of the stream codecs: whole, byte by byte, many frames per chunk."""

from __future__ import annotations

import struct

import pytest

from portao.errors import ErrorCode
from portao.wire.events import Frame, FrameError, FrameEvent
from portao.wire.framing import STREAM_CODECS, LengthPrefixCodec, NewlineCodec

TOO_LARGE = FrameError(ErrorCode.TOO_LARGE, "frame over 16 bytes", fatal=False)
TOO_LARGE_FATAL = FrameError(ErrorCode.TOO_LARGE, "frame over 16 bytes", fatal=True)


def feed(codec: NewlineCodec | LengthPrefixCodec, *chunks: bytes) -> list[FrameEvent]:
    for chunk in chunks:
        codec.receive_data(chunk)
    return codec.events_received()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def frames(*payloads: bytes) -> list[FrameEvent]:
    return [Frame(p) for p in payloads]


# -- newline -------------------------------------------------------------------


def test_newline_whole_frame() -> None:
    assert feed(NewlineCodec(16), b'{"op":"ping"}\n') == frames(b'{"op":"ping"}')


def test_newline_one_byte_at_a_time() -> None:
    codec = NewlineCodec(16)
    assert feed(codec, *bytewise(b'{"a":1}\n{"b":2}\n')) == frames(b'{"a":1}', b'{"b":2}')
    assert codec.buffered_bytes == 0


def test_newline_many_frames_per_chunk_and_trailing_bytes() -> None:
    codec = NewlineCodec(16)
    assert feed(codec, b"a\nbb\nccc\ndd") == frames(b"a", b"bb", b"ccc")
    assert codec.buffered_bytes == 2
    assert feed(codec, b"d\n") == frames(b"ddd")


def test_newline_partial_then_many() -> None:
    assert feed(NewlineCodec(16), b"ab", b"c\nd\ne") == frames(b"abc", b"d")


def test_newline_crlf_and_blank_lines() -> None:
    got = feed(NewlineCodec(16), b"\n\r\n  \n{}\r\n\t\r\n[]\n")
    assert got == frames(b"{}", b"[]")


def test_newline_strips_one_cr_only() -> None:
    assert feed(NewlineCodec(16), b"x\r\r\n") == frames(b"x\r")


def test_newline_limit_counts_payload_only() -> None:
    exact = b"x" * 16
    assert feed(NewlineCodec(16), exact + b"\r\n", exact + b"\n") == frames(exact, exact)
    assert feed(NewlineCodec(16), exact + b"y\n") == [TOO_LARGE]


def test_newline_limit_counts_payload_only_bytewise() -> None:
    exact = b"x" * 16
    codec = NewlineCodec(16)
    assert feed(codec, *bytewise(exact + b"\r\n")) == frames(exact)
    assert feed(codec, *bytewise(exact + b"yz\n")) == [TOO_LARGE]


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_newline_oversized_frame_skipped_then_good_frame(split: int) -> None:
    codec = NewlineCodec(16)
    data = b"x" * 10_000 + b"\n" + b'{"op":"ping"}\n'
    events: list[FrameEvent] = []
    for i in range(0, len(data), split):
        codec.receive_data(data[i : i + split])
        assert codec.buffered_bytes <= 17
        events += codec.events_received()
    assert events == [TOO_LARGE, Frame(b'{"op":"ping"}')]
    assert not codec.is_closed


def test_newline_oversized_tail_is_dropped_not_buffered() -> None:
    codec = NewlineCodec(16)
    assert feed(codec, b"ok\n" + b"y" * 100) == [Frame(b"ok"), TOO_LARGE]
    assert codec.buffered_bytes == 0
    assert feed(codec, b"y" * 100, b"yy\nz\n") == frames(b"z")


def test_newline_buffered_part_plus_long_line_in_next_chunk() -> None:
    codec = NewlineCodec(16)
    assert feed(codec, b"x" * 10, b"x" * 10 + b"\nok\n") == [TOO_LARGE, Frame(b"ok")]


def test_newline_eof_drops_partial_frame_and_closes() -> None:
    codec = NewlineCodec(16)
    assert feed(codec, b"a\npartial", b"") == frames(b"a")
    assert codec.is_closed
    assert codec.buffered_bytes == 0
    assert feed(codec, b"late\n") == []


def test_newline_send_frame() -> None:
    codec = NewlineCodec(16)
    assert codec.send_frame(b'{"op":"pong"}') == b'{"op":"pong"}\n'
    assert codec.data_to_send() == b""


def test_newline_send_frame_keeps_one_payload_one_line() -> None:
    codec = NewlineCodec(64)
    wire = codec.send_frame(b'{"data":[1,\n2]}')
    assert wire == b'{"data":[1, 2]}\n'
    assert feed(codec, wire) == frames(b'{"data":[1, 2]}')


# -- length prefix ---------------------------------------------------------------


def lp(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_len_whole_frame() -> None:
    assert feed(LengthPrefixCodec(16), lp(b'{"op":"ping"}')) == frames(b'{"op":"ping"}')


def test_len_one_byte_at_a_time() -> None:
    codec = LengthPrefixCodec(16)
    assert feed(codec, *bytewise(lp(b"abc") + lp(b"de"))) == frames(b"abc", b"de")
    assert codec.buffered_bytes == 0


def test_len_many_frames_per_chunk_and_trailing_bytes() -> None:
    codec = LengthPrefixCodec(16)
    data = lp(b"a") + lp(b"bb") + lp(b"ccc") + lp(b"dddd")
    assert feed(codec, data[:-2]) == frames(b"a", b"bb", b"ccc")
    assert codec.buffered_bytes == 6
    assert feed(codec, data[-2:] + lp(b"e")[:3]) == frames(b"dddd")
    assert feed(codec, lp(b"e")[3:]) == frames(b"e")


def test_len_split_inside_header() -> None:
    codec = LengthPrefixCodec(16)
    data = lp(b"abc") + lp(b"xyz")
    assert feed(codec, data[:2], data[2:9], data[9:]) == frames(b"abc", b"xyz")


def test_len_empty_payload_is_a_frame() -> None:
    assert feed(LengthPrefixCodec(16), lp(b"") + lp(b"x")) == frames(b"", b"x")


def test_len_limit_counts_payload_only() -> None:
    exact = b"x" * 16
    assert feed(LengthPrefixCodec(16), lp(exact)) == frames(exact)


@pytest.mark.parametrize("split", [1, 2, 5, 100])
def test_len_oversized_frame_is_fatal(split: int) -> None:
    codec = LengthPrefixCodec(16)
    data = lp(b"ok") + lp(b"x" * 17) + lp(b"never")
    events: list[FrameEvent] = []
    for i in range(0, len(data), split):
        codec.receive_data(data[i : i + split])
        events += codec.events_received()
    assert events == [Frame(b"ok"), TOO_LARGE_FATAL]
    assert codec.is_closed
    assert codec.buffered_bytes == 0


def test_len_huge_header_buffers_nothing() -> None:
    codec = LengthPrefixCodec(16)
    assert feed(codec, b"\xff\xff\xff\xff" + b"x" * 1000) == [TOO_LARGE_FATAL]
    assert codec.buffered_bytes == 0


def test_len_eof_drops_partial_frame_and_closes() -> None:
    codec = LengthPrefixCodec(16)
    assert feed(codec, lp(b"a") + lp(b"abc")[:5], b"") == frames(b"a")
    assert codec.is_closed
    assert feed(codec, lp(b"late")) == []


def test_len_send_frame() -> None:
    codec = LengthPrefixCodec(16)
    assert codec.send_frame(b"{}") == b"\x00\x00\x00\x02{}"
    assert codec.data_to_send() == b""


def test_len_buffer_never_holds_more_than_one_frame() -> None:
    codec = LengthPrefixCodec(16)
    data = lp(b"x" * 16) * 50 + lp(b"y" * 16)[:10]
    assert len(feed(codec, data)) == 50
    assert codec.buffered_bytes == 10


def test_stream_codecs_by_scheme() -> None:
    assert isinstance(STREAM_CODECS["tcp"](64), NewlineCodec)
    assert isinstance(STREAM_CODECS["tls"](64), NewlineCodec)
    assert isinstance(STREAM_CODECS["tcp+len"](64), LengthPrefixCodec)
    assert isinstance(STREAM_CODECS["tls+len"](64), LengthPrefixCodec)

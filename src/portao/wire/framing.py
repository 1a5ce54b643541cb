"""Stream framing codecs for `tcp://` and `tcp+len://` (and their TLS twins), sans-I/O.

A codec is fed bytes as they arrive (`receive_data`, `b""` for EOF) and hands back
`Frame`/`FrameError` events (`events_received`). Its buffer holds at most one partial
frame, so memory per connection is bounded by `max_frame_bytes` plus the framing, and
bytes are looked at once: a client dribbling a byte at a time costs linear work, not
a rescan of the buffer per byte. Parse failures are events, never exceptions; only
our own misuse (a payload too large for the length header) raises.

EOF in the middle of a frame drops the partial frame without an event: the peer is
gone, so there is nobody to tell.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from portao.errors import ErrorCode
from portao.wire.events import Frame, FrameError, FrameEvent

_HEADER = struct.Struct(">I")
_HEADER_BYTES = _HEADER.size
_MAX_LENGTH = 2**32 - 1


class FrameCodec(Protocol):
    """One connection's framing: bytes in, events out; payloads in, bytes out."""

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; `b""` means EOF."""

    def events_received(self) -> list[FrameEvent]:
        """Drain the frames and framing errors found so far."""

    def send_frame(self, payload: bytes) -> bytes:
        """The bytes to write so the peer receives `payload` as one frame."""

    def data_to_send(self) -> bytes:
        """Bytes the codec itself needs written (control frames); drained."""

    @property
    def is_closed(self) -> bool:
        """True after EOF or a fatal framing error: no more events will come."""


def _too_large(max_frame_bytes: int, fatal: bool) -> FrameError:
    return FrameError(ErrorCode.TOO_LARGE, f"frame over {max_frame_bytes} bytes", fatal)


class NewlineCodec:
    """Newline-delimited JSON: one payload per `\\n`-terminated line.

    A trailing `\\r` is stripped and blank lines are ignored, so `nc` and telnet work.
    A line over the limit is reported (non-fatal) and skipped: its bytes are dropped
    as they arrive, never buffered, until the next newline.
    """

    __slots__ = ("_buffer", "_closed", "_events", "_max_line", "_skipping", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        # A line may end in "\r" that is not part of the payload.
        self._max_line = max_frame_bytes + 1
        # The partial line so far; it never contains b"\n", so new data is the only
        # place a newline can be, and the buffer is never searched again. An empty
        # one is the shared b"" (and no event list either): idle connections are many.
        self._buffer: bytearray | bytes = b""
        self._skipping = False
        self._events: list[FrameEvent] | None = None
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the current partial line (bounded by the limit + 1)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        if not data:
            self._closed = True
            self._buffer = b""
            return
        start = 0
        if self._skipping or self._buffer:
            end = data.find(b"\n")
            if end < 0:
                self._extend(data)
                return
            if self._skipping:
                self._skipping = False
            elif len(self._buffer) + end > self._max_line:
                self._buffer = b""
                self._emit(_too_large(self.max_frame_bytes, fatal=False))
            else:
                self._buffer += data[:end]
                self._add_line(bytes(self._buffer))
                self._buffer = b""
            start = end + 1
        lines = (data[start:] if start else data).split(b"\n")
        tail = lines.pop()
        for line in lines:
            self._add_line(line)
        self._extend(tail)

    def _extend(self, partial: bytes) -> None:
        """Keep a partial line, or start skipping it once it is over the limit."""
        if self._skipping or not partial:
            return
        if len(self._buffer) + len(partial) > self._max_line:
            self._buffer = b""
            self._skipping = True
            self._emit(_too_large(self.max_frame_bytes, fatal=False))
            return
        if self._buffer:
            self._buffer += partial  # a bytearray: grows in place
        else:
            self._buffer = bytearray(partial)

    def _add_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_frame_bytes:
            self._emit(_too_large(self.max_frame_bytes, fatal=False))
        elif line and not line.isspace():
            self._emit(Frame(line))

    def _emit(self, event: FrameEvent) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def events_received(self) -> list[FrameEvent]:
        events, self._events = self._events, None
        return events if events is not None else []

    def send_frame(self, payload: bytes) -> bytes:
        # Inside valid JSON a raw newline can only be whitespace; turning it into a
        # space keeps one payload one line whatever produced it.
        if b"\n" in payload:
            payload = payload.replace(b"\n", b" ")
        return payload + b"\n"

    def data_to_send(self) -> bytes:
        return b""


class LengthPrefixCodec:
    """A 4-byte big-endian payload length, then the payload.

    A header announcing more than `max_frame_bytes` is fatal: the stream cannot be
    resynchronised without reading the whole frame, so the codec closes.
    """

    __slots__ = ("_buffer", "_closed", "_events", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        # The partial frame (header included); bounded by the header + the limit.
        self._buffer = bytearray()
        self._events: list[FrameEvent] = []
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the current partial frame (bounded by the limit + 4)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        if not data:
            self._closed = True
            self._buffer.clear()
            return
        view = memoryview(data)
        if self._buffer:
            rest = self._complete(view)
            if rest is None:
                return
            view = rest
        pos, end = 0, len(view)
        while end - pos >= _HEADER_BYTES:
            (length,) = _HEADER.unpack_from(view, pos)
            if not self._length_ok(length):
                return
            if end - pos - _HEADER_BYTES < length:
                break
            pos += _HEADER_BYTES
            self._events.append(Frame(bytes(view[pos : pos + length])))
            pos += length
        self._buffer += view[pos:]

    def _complete(self, view: memoryview) -> memoryview | None:
        """Finish the buffered frame from `view`; the unused rest, or None if short."""
        buffer = self._buffer
        if len(buffer) < _HEADER_BYTES:
            take = _HEADER_BYTES - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < _HEADER_BYTES:
                return None
            if not self._length_ok(_HEADER.unpack_from(buffer)[0]):
                return None
        total = _HEADER_BYTES + _HEADER.unpack_from(buffer)[0]
        take = total - len(buffer)
        buffer += view[:take]
        if len(buffer) < total:
            return None
        self._events.append(Frame(bytes(buffer[_HEADER_BYTES:])))
        buffer.clear()
        return view[take:]

    def _length_ok(self, length: int) -> bool:
        if length <= self.max_frame_bytes:
            return True
        self._events.append(_too_large(self.max_frame_bytes, fatal=True))
        self._buffer.clear()
        self._closed = True
        return False

    def events_received(self) -> list[FrameEvent]:
        events, self._events = self._events, []
        return events

    def send_frame(self, payload: bytes) -> bytes:
        if len(payload) > _MAX_LENGTH:
            raise ValueError(f"payload of {len(payload)} bytes does not fit a 4-byte length")
        return _HEADER.pack(len(payload)) + payload

    def data_to_send(self) -> bytes:
        return b""


#: The codec of each stream URL scheme (TLS wraps the same framing).
STREAM_CODECS: dict[str, Callable[[int], FrameCodec]] = {
    "tcp": NewlineCodec,
    "tls": NewlineCodec,
    "tcp+len": LengthPrefixCodec,
    "tls+len": LengthPrefixCodec,
}

"""One exception tree and the wire error codes.

    PortaoError
    ├── ConfigError              a setting is invalid (names the setting)
    ├── EnvelopeError            an envelope or inbox message could not be decoded
    ├── BrokerError              raised only by broker adapters, already translated
    │   ├── BrokerUnavailable    the broker did not confirm: client gets `unavailable`
    │   ├── QueueFull            the route's backlog is over its bound: `overloaded`
    │   └── UnknownRoute         no worker ever registered the route: `unknown_route`
    └── ClientError              raised by `portao.client`
        ├── ConnectionClosed     the gateway said `bye` or the socket closed
        └── RequestError         the gateway answered a request with `error`

Third-party exceptions (redis, aiormq, websockets) are translated into these at the
adapter that calls the library; nothing above the adapters catches library errors.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Error and bye codes of wire protocol v1 (DESIGN.md §1)."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    UNKNOWN_ROUTE = "unknown_route"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    HANDLER_ERROR = "handler_error"
    OVERLOADED = "overloaded"
    SLOW_CONSUMER = "slow_consumer"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"


#: WebSocket close code sent with a `bye` of each code (DESIGN.md §1).
WS_CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.IDLE_TIMEOUT: 1000,
    ErrorCode.SHUTDOWN: 1001,
    ErrorCode.BAD_FRAME: 1007,
    ErrorCode.UNAUTHORIZED: 1008,
    ErrorCode.FORBIDDEN: 1008,
    ErrorCode.TOO_LARGE: 1009,
    ErrorCode.OVERLOADED: 1013,
    ErrorCode.SLOW_CONSUMER: 1013,
}
WS_CLOSE_INTERNAL = 1011


class PortaoError(Exception):
    """Root of every exception portao raises on purpose."""


class ConfigError(PortaoError):
    """A setting has an invalid value; the message names the setting."""


class EnvelopeError(PortaoError):
    """Bytes from the broker are not a valid envelope of a version we speak."""


class BrokerError(PortaoError):
    """A broker operation failed; subclasses say how the client is answered."""

    code: ErrorCode = ErrorCode.UNAVAILABLE


class BrokerUnavailable(BrokerError):
    """The broker is unreachable or did not confirm the operation."""

    code = ErrorCode.UNAVAILABLE


class QueueFull(BrokerError):
    """The route's backlog (undelivered plus pending) is over `max_queue_length`."""

    code = ErrorCode.OVERLOADED


class UnknownRoute(BrokerError):
    """No worker has ever registered this route."""

    code = ErrorCode.UNKNOWN_ROUTE


class ClientError(PortaoError):
    """Raised by `portao.client`."""


class ConnectionClosed(ClientError):
    """The connection ended; `code` is the gateway's `bye` code when it sent one."""

    def __init__(self, code: str | None, message: str = "") -> None:
        super().__init__(f"{code or 'closed'}: {message}" if message else (code or "closed"))
        self.code = code
        self.message = message


class RequestError(ClientError):
    """The gateway answered a request with `error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

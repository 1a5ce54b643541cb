"""Log output: readable lines for a terminal, JSON lines for production.

Every record keeps the fields passed with `extra=` (`gateway`, `conn`, `reason`,
`user`, …): the console format appends them as `key=value`, the JSON format makes
them keys next to `ts`, `level`, `logger` and `msg`. portao never logs a token, a
secret or a message body; extra fields with such names are dropped here as a
second line of defence, and the `websockets` library's debug records (which echo
the request line, where a browser's `?token=` travels) are held at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from portao.config import Settings

#: Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
#: `extra=` keys never written, whatever a caller passes.
_NEVER = frozenset({"token", "secret", "jwt_secret", "password", "data", "body", "payload"})
#: Third-party loggers whose debug output may carry a token.
_QUIET = ("websockets",)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields, minus the ones that must never be written."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and key not in _NEVER and value is not None
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, pid, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        out.update(extra_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return line


def setup_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Send every record at `log_level` and above to `stream` (stderr) as configured."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json" else ConsoleFormatter()
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    # aiormq logs every failed dial at ERROR; portao's own warning says it, with the retry.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)

"""Logs: JSON lines with context fields; never a token, a secret or a message body."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from portao.config import Settings
from portao.logs import ConsoleFormatter, JsonFormatter, setup_logging
from portao.session.auth import mint_token
from tests.procs import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "log-test-secret-" + "s" * 32
CANARY = "zebra-canary-5f1c"  # a message body that must never reach a log


def record(msg: str, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("portao.gateway", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_context_and_drop_secret_fields() -> None:
    line = JsonFormatter().format(
        record("connection closed", conn=7, gateway="gw-1", reason="client", token="t0k", data="d")
    )
    out = json.loads(line)
    assert out["msg"] == "connection closed"
    assert (out["level"], out["logger"]) == ("info", "portao.gateway")
    assert (out["conn"], out["gateway"], out["reason"]) == (7, "gw-1", "client")
    assert out["ts"].endswith("+00:00")
    assert "token" not in out
    assert "data" not in out


def test_console_lines_append_context() -> None:
    line = ConsoleFormatter().format(record("connection open", conn=3, password="pw"))
    assert line.endswith("INFO portao.gateway: connection open conn=3")


def test_setup_logging_holds_websockets_debug_at_info() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("websockets").level)
    try:
        setup_logging(Settings(log_level="debug", log_format="json"), stream)
        logging.getLogger("websockets.server").debug("< GET /?token=abc HTTP/1.1")
        logging.getLogger("portao.x").debug("kept")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("websockets").setLevel(saved[2])
    assert "token=abc" not in stream.getvalue()
    assert json.loads(stream.getvalue())["msg"] == "kept"


class Line:
    """A blocking newline-JSON client."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def request(self, obj: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        answer: dict[str, Any] = json.loads(self.file.readline())
        return answer

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_logged(path: Path, needle: str, count: int, timeout_s: float = 10.0) -> None:
    """Wait until `needle` occurs `count` times in the log file."""
    deadline = time.monotonic() + timeout_s
    while path.read_text().count(needle) < count:
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.02)


def test_a_run_logs_connections_and_never_a_token_secret_or_body(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    env["PORTAO_JWT_SECRET"] = SECRET
    log_path = tmp_path / "stderr"
    with log_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "portao.cli", "run", "--listen", f"tcp://127.0.0.1:{port}",
             "--admin", "off", "--log-format", "json", "--log-level", "debug",
             "--max-attempts", "2", "--retry-delay-s", "0.01"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        token = mint_token(SECRET, "alice", rooms=["*"], now=time.time())
        client = Line(port)
        assert client.request({"op": "auth", "token": token})["op"] == "ok"
        body = {"text": CANARY}
        assert client.request({"op": "call", "id": 1, "route": "echo", "data": body})["data"] \
            == body
        assert client.request({"op": "call", "id": 2, "route": "fail", "data": body})["code"] \
            == "handler_error"
        assert client.request({"op": "send", "id": 3, "route": "echo", "data": body})["op"] \
            == "ack"
        assert client.request({"op": "call", "id": 4, "route": CANARY, "data": 1})["code"] \
            == "unknown_route"
        assert client.request({"op": "auth", "token": token + "x"})["code"] == "unauthorized"
        client.close()
        stranger = Line(port)
        assert stranger.request({"op": "auth", "token": "not-a-jwt-" + CANARY})["op"] == "error"
        stranger.close()
        wait_logged(log_path, '"connection closed"', 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    logged = log_path.read_text()
    for needle in (SECRET, token, token.split(".")[1], CANARY):
        assert needle not in logged
        assert needle not in stdout
    events = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert all({"ts", "level", "logger", "msg", "pid"} <= e.keys() for e in events)
    opened = [e for e in events if e["msg"] == "connection open"]
    closed = [e for e in events if e["msg"] == "connection closed"]
    # 1: wait_port's probe, 2: alice, 3: the stranger
    assert [e["conn"] for e in opened] == [1, 2, 3]
    assert sorted((e["conn"], e["reason"]) for e in closed) == [(n, "client") for n in (1, 2, 3)]
    assert all(e["gateway"].startswith("gw-") for e in opened + closed)
    assert [e.get("user") for e in sorted(closed, key=lambda e: e["conn"])] == [
        None, "alice", None,
    ]

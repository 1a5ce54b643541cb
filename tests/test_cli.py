"""The commands as a user runs them: real processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

SECRET = "cli-test-secret-" + "z" * 32
PORTAO = [sys.executable, "-m", "portao.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def portao(
    *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    full_env.update(env or {})
    return subprocess.run(
        [*PORTAO, *args], capture_output=True, text=True, env=full_env, timeout=60, **kw
    )


class LineClient:
    """A blocking newline-JSON client, like `nc` with a parser."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, obj: Any) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError
        out: dict[str, Any] = json.loads(line)
        return out

    def request(self, obj: Any) -> dict[str, Any]:
        self.send(obj)
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def run_process() -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """`portao run` on a free port; yields (process, port, first stdout lines)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    proc = subprocess.Popen(
        [*PORTAO, "run", "--listen", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
    with proc:
        try:
            yield proc, port, lines
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def test_run_prints_a_chat_page_link_that_carries_alices_token() -> None:
    admin = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    command = [*PORTAO, "run", "--listen", f"tcp://127.0.0.1:{free_port()}",
               "--admin", f"127.0.0.1:{admin}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().strip() for _ in range(3)]
            assert lines[2] == f"http://127.0.0.1:{admin}/?token={lines[1]}"
            with urllib.request.urlopen(lines[2], timeout=5) as page:
                assert b"new URLSearchParams(location.search)" in page.read()
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0


def test_run_prints_secret_and_token_then_two_users_chat(
    run_process: tuple[subprocess.Popen[str], int, list[str]],
) -> None:
    proc, port, lines = run_process
    assert lines[0].startswith("PORTAO_JWT_SECRET=")
    secret = lines[0].split("=", 1)[1]
    alice_token = lines[1]
    assert jwt.decode(alice_token, secret, algorithms=["HS256"])["sub"] == "alice"
    minted = portao("token", "--sub", "bob", "--rooms", "*", env={"PORTAO_JWT_SECRET": secret})
    assert minted.returncode == 0, minted.stderr
    bob_token = minted.stdout.strip().splitlines()[-1]

    alice, bob = LineClient(port), LineClient(port)
    try:
        assert alice.request({"op": "auth", "token": alice_token}) == {"op": "ok", "user": "alice"}
        assert bob.request({"op": "auth", "token": bob_token}) == {"op": "ok", "user": "bob"}
        for i, c in enumerate((alice, bob)):
            joined = c.request({"op": "call", "id": i, "route": "chat.join",
                                "data": {"room": "lobby"}})
            assert joined["data"] == {"room": "lobby", "joined": True}
        bob.send({"op": "call", "id": 5, "route": "chat.say",
                  "data": {"room": "lobby", "text": "hi alice"}})
        assert alice.recv() == {
            "op": "push",
            "route": "chat.message",
            "data": {"room": "lobby", "user": "bob", "text": "hi alice"},
            "room": "lobby",
        }
        who = alice.request({"op": "call", "id": 6, "route": "chat.who",
                             "data": {"room": "lobby"}})
        assert who["data"] == ["alice", "bob"]
        started = time.monotonic()
        failed = alice.request({"op": "call", "id": 7, "route": "fail", "data": None})
        assert failed["code"] == "handler_error"
        assert time.monotonic() - started < 5

        # SIGTERM: both get `bye shutdown`, the process exits 0.
        proc.send_signal(signal.SIGTERM)
        for c in (alice, bob):
            message = c.recv()
            while message["op"] != "bye":
                message = c.recv()
            assert message["code"] == "shutdown"
        assert proc.wait(timeout=20) == 0
    finally:
        alice.close()
        bob.close()
    assert proc.stderr is not None
    assert alice_token not in proc.stderr.read()  # the token never reaches the logs


def test_run_with_secret_in_env_prints_none(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    env["PORTAO_JWT_SECRET"] = SECRET
    with subprocess.Popen(
        [*PORTAO, "run", "--listen", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    ) as proc:
        out, err = _start_then_interrupt(proc, port)
    assert proc.returncode == 0
    assert SECRET not in out
    assert SECRET not in err
    assert "PORTAO_JWT_SECRET" not in out


def _start_then_interrupt(proc: subprocess.Popen[str], port: int) -> tuple[str, str]:
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "portao run did not start"
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_token_is_last_line_and_verifies() -> None:
    result = portao("token", "--sub", "carol", "--rooms", "a,b.*", "--ttl", "60",
                    env={"PORTAO_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip().splitlines()[-1], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol"
    assert claims["rooms"] == ["a", "b.*"]
    assert 55 <= claims["exp"] - time.time() <= 62


def test_token_errors_are_clear() -> None:
    no_secret = portao("token", "--sub", "carol")
    assert no_secret.returncode == 2
    assert "PORTAO_JWT_SECRET" in no_secret.stderr
    bad_sub = portao("token", "--sub", "bad name", env={"PORTAO_JWT_SECRET": SECRET})
    assert bad_sub.returncode == 2
    assert "Traceback" not in bad_sub.stderr


def test_config_show_masks_secret_and_layers_sources(tmp_path: Path) -> None:
    config = tmp_path / "portao.toml"
    config.write_text('max_frame_bytes = 2048\ncall_timeout_s = 3\nprefix = "fromfile"\n')
    result = portao(
        "config", "show", "--config", str(config), "--call-timeout-s", "7",
        env={"PORTAO_JWT_SECRET": SECRET, "PORTAO_PREFIX": "fromenv"},
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["max_frame_bytes"] == 2048  # file
    assert shown["prefix"] == "fromenv"  # env beats file
    assert shown["call_timeout_s"] == 7  # flag beats both
    assert SECRET not in result.stdout
    assert shown["jwt_secret"] == "**********"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--max-frame-bytes", "3"], {}, "max_frame_bytes"),
        ([], {"PORTAO_CALL_TIMEOUT_S": "-1"}, "call_timeout_s"),
        (["--rate-burst", "zero"], {}, "rate-burst"),
    ],
)
def test_bad_config_names_the_setting(args: list[str], env: dict[str, str], named: str) -> None:
    result = portao("config", "show", *args, env=env)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_gateway_refuses_memory_broker_and_needs_one() -> None:
    memory = portao("gateway", "--broker", "memory://", env={"PORTAO_JWT_SECRET": SECRET})
    assert memory.returncode != 0
    assert "memory://" in memory.stderr
    missing = portao("gateway", env={"PORTAO_JWT_SECRET": SECRET})
    assert missing.returncode != 0
    assert "--broker" in missing.stderr

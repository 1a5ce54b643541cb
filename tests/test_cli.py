"""The commands as a user runs them: real processes, real sockets, real signals."""

from __future__ import annotations

import asyncio
import contextlib
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
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from click.testing import CliRunner, Result

from portao.cli import main
from portao.client import connect
from portao.session.auth import mint_token
from tests.procs import free_port, wait_port

SECRET = "cli-test-secret-" + "z" * 32
#: `-P`: like the installed `portao` script, the current directory is not on sys.path.
PORTAO = [sys.executable, "-P", "-m", "portao.cli"]


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without PORTAO_* settings, plus `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    full_env.update(env or {})
    return full_env


def portao(
    *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTAO, *args], capture_output=True, text=True, env=clean_env(env), timeout=60, **kw
    )


@contextlib.contextmanager
def started(
    *args: str, env: dict[str, str] | None = None, **kw: Any
) -> Iterator[subprocess.Popen[str]]:
    """`portao ARGS` running, output piped; killed at exit if it still runs."""
    with subprocess.Popen(
        [*PORTAO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(env), **kw,
    ) as proc:  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


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
    with started("run", "--listen", f"tcp://127.0.0.1:{port}", "--admin", "off") as proc:
        assert proc.stdout is not None
        yield proc, port, [proc.stdout.readline().strip(), proc.stdout.readline().strip()]


def test_run_prints_a_chat_page_link_that_dials_its_websocket_listener() -> None:
    admin = free_port()
    # ws on port 0: the link must carry the port the listener got, not 7879.
    with started("run", "--listen", f"tcp://127.0.0.1:{free_port()}",
                 "--listen", "ws://127.0.0.1:0/", "--admin", f"127.0.0.1:{admin}") as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        page, _, query = lines[2].partition("?")
        assert page == f"http://127.0.0.1:{admin}/"
        params = parse_qs(query)
        assert params["token"] == [lines[1]]
        ws = urlsplit(params["ws"][0])
        assert (ws.scheme, ws.hostname, ws.path) == ("ws", "127.0.0.1", "/")
        assert ws.port not in (0, 7879)
        with urllib.request.urlopen(lines[2], timeout=5) as response:
            assert b'params.get("ws")' in response.read()

        async def as_alice() -> str | None:
            async with await connect(params["ws"][0], token=lines[1]) as client:
                return client.user

        assert asyncio.run(as_alice()) == "alice"
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_run_without_a_websocket_listener_prints_no_chat_link() -> None:
    port, admin = free_port(), free_port()
    with started("run", "--listen", f"tcp://127.0.0.1:{port}",
                 "--admin", f"127.0.0.1:{admin}") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("PORTAO_JWT_SECRET=")
        proc.stdout.readline()  # the token: a link would follow it at once
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert out == ""
    assert "no chat page link: the page needs a ws:// listener" in err


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


def test_run_with_secret_in_env_prints_none() -> None:
    port = free_port()
    with started("run", "--listen", f"tcp://127.0.0.1:{port}", "--admin", "off",
                 env={"PORTAO_JWT_SECRET": SECRET}) as proc:
        wait_port(port)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert SECRET not in out
    assert SECRET not in err
    assert "PORTAO_JWT_SECRET" not in out


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


APP_MODULE = """
from portao.worker.app import App

app = App("mine")
not_an_app = 42


@app.route("hello")
async def hello(ctx, data):
    return f"hello {data}"
"""


def test_run_finds_an_app_in_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "mymodule.py").write_text(APP_MODULE)
    port = free_port()
    with started("run", "mymodule:app", "--listen", f"tcp://127.0.0.1:{port}", "--admin", "off",
                 env={"PORTAO_JWT_SECRET": SECRET}, cwd=tmp_path) as proc:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        client = LineClient(port)
        try:
            token = mint_token(SECRET, "ana", now=time.time())
            assert client.request({"op": "auth", "token": token})["op"] == "ok"
            answer = client.request({"op": "call", "id": 1, "route": "hello", "data": "you"})
            assert answer["data"] == "hello you"
        finally:
            client.close()
        proc.terminate()
        assert proc.wait(timeout=20) == 0


@pytest.mark.parametrize(
    ("command", "app", "error"),
    [
        ("run", "nosuch:app", "Error: app 'nosuch:app': no module named 'nosuch'"),
        ("run", "mymodule:missing", "Error: app 'mymodule:missing': module 'mymodule' has no"),
        ("worker", "mymodule:not_an_app", "'not_an_app' is a int, not a portao App"),
    ],
)
def test_a_bad_app_is_a_clean_error(tmp_path: Path, command: str, app: str, error: str) -> None:
    (tmp_path / "mymodule.py").write_text(APP_MODULE)
    # The app is loaded before anything starts: the broker is never dialled.
    where = ["--broker", "redis://127.0.0.1:1/0"] if command == "worker" else ["--admin", "off"]
    result = portao(command, app, *where, cwd=tmp_path, env={"PORTAO_JWT_SECRET": SECRET})
    assert result.returncode == 2, result.stderr
    assert error in result.stderr
    assert "Traceback" not in result.stderr


PASSWORD = "s3cret-pw"
#: Commands that fail on a broker or state URL carrying PASSWORD, each in its own way.
LEAKY = [
    ["worker", "--broker", f"amqp://app:{PASSWORD}@127.0.0.1:5672/x"],  # --state missing
    ["worker", "--broker", f"mysql://app:{PASSWORD}@db/x"],  # unsupported scheme
    ["worker", "--broker", "amqp://guest:guest@127.0.0.1:1/", "--state", f"mysql://u:{PASSWORD}@h/"],
    ["config", "show", "--broker", f"amqp://app:{PASSWORD}@127.0.0.1:nope/x",
     "--state", f"redis://:{PASSWORD}@[::1/0"],  # malformed port, malformed host
]  # fmt: skip


def test_no_error_output_carries_a_password() -> None:
    env = clean_env({"PORTAO_JWT_SECRET": SECRET})
    runs = [subprocess.Popen([*PORTAO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for args in LEAKY]
    for args, proc in zip(LEAKY, runs, strict=True):
        with proc:
            out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, args
        assert PASSWORD not in out + err, args
        assert "Traceback" not in err, (args, err)
        assert err.splitlines()[-1].startswith("Error: "), (args, err)


@pytest.mark.parametrize("command", [
    ["gateway", "--broker", f"redis://:{PASSWORD}@127.0.0.1:1/0", "--listen", "tcp://127.0.0.1:0"],
    ["worker", "--broker", f"amqp://app:{PASSWORD}@127.0.0.1:1/x",
     "--state", f"redis://:{PASSWORD}@127.0.0.1:1/0"],
], ids=["gateway", "worker"])  # fmt: skip
def test_an_unreachable_broker_at_start_is_waited_out_without_leaking_passwords(
    command: list[str],
) -> None:
    """A broker down at start is an outage gateways and workers wait out, with backoff."""
    command = [*PORTAO, *command]
    env = clean_env({"PORTAO_JWT_SECRET": SECRET})
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "cannot reach the broker" in err
    assert PASSWORD not in out + err
    assert "Traceback" not in err
    assert " ERROR " not in err  # the retry is a warning, not an error per attempt


def busy_port() -> socket.socket:
    """A socket listening on a free port (close it when done)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_run_on_a_busy_port_is_a_clean_error() -> None:
    with busy_port() as busy:
        port = busy.getsockname()[1]
        # The second listener is the busy one: the message names that one.
        result = portao("run", "--listen", f"tcp://127.0.0.1:{free_port()}",
                        "--listen", f"ws://127.0.0.1:{port}/", "--admin", "off",
                        env={"PORTAO_JWT_SECRET": SECRET})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot listen on ws://127.0.0.1:{port}/: address already in use"
    )
    assert "Traceback" not in result.stderr


def test_gateway_on_a_busy_port_is_a_clean_error(redis_url: str, prefix: str) -> None:
    with busy_port() as busy:
        port = busy.getsockname()[1]
        result = portao("gateway", "--broker", redis_url, "--prefix", prefix,
                        "--listen", f"tcp://127.0.0.1:{port}", env={"PORTAO_JWT_SECRET": SECRET})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot listen on tcp://127.0.0.1:{port}: address already in use"
    )
    assert "Traceback" not in result.stderr


def test_client_without_a_gateway_is_a_clean_error() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    result = portao("client", url, input="")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"Error: cannot connect to {url}: connection refused"]


def test_client_says_where_it_is_and_helps() -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with started("run", "--listen", url, "--admin", "off", env={"PORTAO_JWT_SECRET": SECRET}):
        wait_port(port)
        token = mint_token(SECRET, "ana", now=time.time())
        with_token = portao("client", url, "--token", token, input="help\ncall echo 7\n")
        without = portao("client", url, input=f"auth {token}\ncall echo 8\n")
    assert with_token.returncode == 0, with_token.stderr
    assert f"connected to {url} as ana" in with_token.stderr
    for command in ("call ROUTE [JSON]", "sub ROOM", "auth TOKEN", "help", "quit"):
        assert command in with_token.stderr  # `help` lists the commands
    assert json.loads(with_token.stdout)["data"] == 7
    assert without.returncode == 0, without.stderr
    assert f"connected to {url} (not authenticated)" in without.stderr
    assert "portao token --sub NAME" in without.stderr  # the hint
    answers = [json.loads(line) for line in without.stdout.splitlines()]
    assert [a["op"] for a in answers] == ["ok", "reply"]


@pytest.fixture
def no_portao_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PORTAO_"):
            monkeypatch.delenv(key)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`portao ARGS` in this process: for help and settings, which open nothing."""
    return CliRunner().invoke(main, list(args), env=env)


def flags(help_text: str) -> set[str]:
    return {word.rstrip(",") for word in help_text.split() if word.startswith("--")}


@pytest.mark.usefixtures("no_portao_env")
def test_each_command_offers_the_settings_that_apply_to_it() -> None:
    texts = {c: invoke(*c.split(), "--help").output
             for c in ("run", "gateway", "worker", "token", "client", "bench rpc")}
    run, gateway, worker, token = (flags(texts[c]) for c in ("run", "gateway", "worker", "token"))
    server_only = {"--listen", "--ws-origins", "--tls-cert", "--tls-key", "--ws-compression",
                   "--max-frame-bytes", "--rate-burst", "--jwt-algorithm"}  # fmt: skip
    worker_only = {"--worker-concurrency", "--handler-timeout-s", "--retry-delay-s"}
    assert server_only <= gateway & run
    assert worker_only <= worker & run
    assert not (server_only | {"--processes"}) & worker
    assert not worker_only & gateway
    assert "--processes" in gateway
    assert not {"--broker", "--state", "--processes"} & run  # run is the memory broker
    assert {"--broker", "--state", "--prefix"} <= gateway & worker
    assert token == {"--sub", "--rooms", "--ttl", "--private-key", "--config",
                     "--jwt-secret-file", "--jwt-algorithm", "--help"}  # fmt: skip
    assert "--ttl SECONDS" in texts["token"]
    assert "--no-ws-compression" in gateway
    assert "tcp://127.0.0.1:7878" in texts["client"]  # the default URL
    bench = flags(texts["bench rpc"])
    assert "--jwt-secret-file" in bench
    assert "--jwt-secret" not in bench  # a flag would show the secret in `ps`
    assert invoke("worker", "--listen", "tcp://127.0.0.1:1").exit_code == 2


@pytest.mark.usefixtures("no_portao_env")
def test_help_shows_each_commands_real_defaults() -> None:
    one_line = {c: " ".join(invoke(c, "--help").output.split())
                for c in ("run", "gateway", "worker")}
    assert "tcp://127.0.0.1:7878, ws://127.0.0.1:7879" in one_line["run"]
    assert "[default: 127.0.0.1:7880]" in one_line["run"]
    assert "[default: tcp://0.0.0.0:7878]" in one_line["gateway"]
    assert one_line["gateway"].count("[default: off]") >= 2  # admin, ws-compression
    assert "[default: off]" in one_line["worker"]  # admin


@pytest.mark.usefixtures("no_portao_env")
def test_config_show_prints_what_a_command_runs_with() -> None:
    shown = {}
    for command in ("run", "gateway", "worker"):
        result = invoke("config", "show", command, "--log-level", "DEBUG")
        assert result.exit_code == 0, result.output
        shown[command] = json.loads(result.output)
    assert shown["run"]["listen"] == ["tcp://127.0.0.1:7878", "ws://127.0.0.1:7879"]
    assert shown["run"]["admin"] == "127.0.0.1:7880"
    assert "broker" not in shown["run"]
    assert shown["gateway"]["listen"] == ["tcp://0.0.0.0:7878"]
    assert shown["gateway"]["admin"] == "off"
    assert "worker_concurrency" not in shown["gateway"]
    assert "listen" not in shown["worker"]
    assert {s["log_level"] for s in shown.values()} == {"debug"}  # case-insensitive
    as_given = invoke("config", "show", "--no-ws-compression",
                      env={"PORTAO_LOG_LEVEL": "WARNING", "PORTAO_WS_COMPRESSION": "true"})
    assert as_given.exit_code == 0, as_given.output
    settings = json.loads(as_given.output)
    assert (settings["log_level"], settings["ws_compression"]) == ("warning", False)
    assert settings["listen"] == []  # no command: the settings as given


def test_a_short_secret_is_refused_with_a_clear_error() -> None:
    result = portao("token", "--sub", "ana", env={"PORTAO_JWT_SECRET": "short"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert "PORTAO_JWT_SECRET" in result.stderr
    assert "must be at least 32 bytes" in result.stderr
    assert "Warning" not in result.stderr


def test_bench_takes_the_secret_from_a_file_not_a_flag(tmp_path: Path) -> None:
    flag = portao("bench", "baseline", "--jwt-secret", SECRET)
    assert flag.returncode == 2
    assert "No such option" in flag.stderr
    missing = portao("bench", "baseline")
    assert missing.returncode == 2
    assert "PORTAO_JWT_SECRET" in missing.stderr
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    with started("bench", "baseline", "--jwt-secret-file", str(secret_file),
                 "--listen", f"tcp://127.0.0.1:{port}") as proc:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        client = LineClient(port)
        try:
            token = mint_token(SECRET, "ana", now=time.time())
            assert client.request({"op": "auth", "token": token}) == {"op": "ok", "user": "ana"}
        finally:
            client.close()

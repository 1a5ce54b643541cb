"""Running out of file descriptors pauses accepting; the listener survives."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time

from tests.test_cli import SECRET, LineClient, free_port

FD_LIMIT = 64


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_emfile_on_accept_does_not_kill_the_listener() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    env["PORTAO_JWT_SECRET"] = SECRET
    with subprocess.Popen(
        [sys.executable, "-m", "portao.cli", "run", "--listen", f"tcp://127.0.0.1:{port}",
         "--max-connections", "1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_low_fd_limit,
    ) as proc:
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "portao run did not start"
                    time.sleep(0.1)
            # Far more connections than the gateway has descriptors for.
            flood = []
            for _ in range(FD_LIMIT * 2):
                with contextlib.suppress(OSError):
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            time.sleep(1.0)
            assert proc.poll() is None, "the gateway died"
            for s in flood:
                s.close()
            # Once descriptors are free again, service resumes by itself.
            from portao.session.auth import mint_token

            token = mint_token(SECRET, "alice", now=time.time())
            deadline = time.monotonic() + 15
            while True:
                try:
                    client = LineClient(port)
                    try:
                        assert client.request({"op": "auth", "token": token})["op"] == "ok"
                        answer = client.request(
                            {"op": "call", "id": 1, "route": "echo", "data": "back"}
                        )
                        assert answer == {"op": "reply", "id": 1, "data": "back"}
                        break
                    finally:
                        client.close()
                except (OSError, EOFError):
                    assert time.monotonic() < deadline, "the listener did not recover"
                    time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert proc.returncode == 0

"""Real portao processes for tests: start gateways and workers, wait, kill.

Every process gets a clean environment (no stray PORTAO_* from the caller), the
test's prefix and secret, and is killed at teardown whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "proc-test-secret-" + "q" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"process exited with {proc.returncode} before listening"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on port {port}") from None
            time.sleep(0.05)


@dataclass
class Procs:
    """The processes a test started; all killed at exit."""

    env: dict[str, str]
    log_dir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "portao.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append(proc)
        return proc

    def gateway(self, port: int, *extra: str, name: str = "gateway") -> subprocess.Popen[bytes]:
        proc = self.spawn("gateway", "--listen", f"tcp://127.0.0.1:{port}", *extra, name=name)
        wait_port(port, proc=proc)
        return proc

    def worker(self, app: str = "portao.demo:app", *extra: str, name: str = "worker") -> (
        subprocess.Popen[bytes]
    ):
        return self.spawn("worker", app, *extra, name=name)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name} ==\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )


@contextmanager
def processes(tmp_path: Path, **settings: str) -> Iterator[Procs]:
    """A process group whose env carries `settings` as PORTAO_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    env["PORTAO_JWT_SECRET"] = SECRET
    env["PYTHONPATH"] = str(ROOT)
    for key, value in settings.items():
        env[f"PORTAO_{key.upper()}"] = value
    procs = Procs(env, tmp_path)
    try:
        yield procs
    finally:
        for proc in procs.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs.started:
            proc.wait(timeout=10)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for a process without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError("process did not exit")
        await asyncio.sleep(0.05)
    return proc.returncode

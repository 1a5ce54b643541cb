"""What the benchmark reads of the server under test and of the machine.

The server is found by the port it listens on (or given by pid); its resident
memory, open files and threads are read from /proc through psutil.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil  # type: ignore[import-untyped,import-not-found,unused-ignore]

SHARED_MACHINE_NOTE = (
    "measured on a shared 2-core machine while other work may run: compare ratios "
    "taken in the same run rather than absolute figures"
)


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port`, if one is visible."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            pid: int | None = conn.pid
            return pid
    return None


def sample(pid: int | None) -> dict[str, int] | None:
    """Resident bytes, open files and threads of `pid` and its children, summed.

    Children count so that `portao gateway --processes N` is measured whole
    (None when the process is gone).
    """
    if pid is None:
        return None
    total = {"rss_bytes": 0, "fds": 0, "threads": 0, "processes": 0}
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    for process in tree:
        try:
            with process.oneshot():
                total["rss_bytes"] += process.memory_info().rss
                total["fds"] += process.num_fds()
                total["threads"] += process.num_threads()
                total["processes"] += 1
        except psutil.Error:
            continue  # a child that just ended
    return total


def machine() -> dict[str, Any]:
    """The machine a figure was taken on, and how busy it was at the start."""
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "note": SHARED_MACHINE_NOTE,
    }

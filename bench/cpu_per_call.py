"""Run a `portao bench rpc` command and say where the CPU went, per 1,000 calls.

    python bench/cpu_per_call.py gateway=PID worker=PID redis=PID -- \
        portao bench rpc --target tcp://127.0.0.1:PORT --json out.json ...

The CPU time (user + system) of each named process and of the command's own
process tree (the load generator) is sampled while the command runs; the cores
each one used over the steady middle of the run (after `--skip` seconds of
connecting and warm-up, before the last second), divided by the calls/s of the
command's `--json` result, give CPU milliseconds per 1,000 calls. On a shared
machine these are steadier than calls/s: they count the work a call costs, not
what else ran meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

SKIP_S = 3.0
PERIOD_S = 0.25


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def main() -> None:
    split = sys.argv.index("--")
    named = {
        name: psutil.Process(int(pid))
        for name, pid in (arg.split("=", 1) for arg in sys.argv[1:split])
    }
    command = sys.argv[split + 1 :]
    json_path = command[command.index("--json") + 1]
    load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(load.pid)
    generator: dict[int, float] = {}  # the last CPU time seen of each generator process
    samples: list[tuple[float, dict[str, float]]] = []
    while load.poll() is None:
        for process in _tree(root):
            generator[process.pid] = max(generator.get(process.pid, 0.0), _cpu(process))
        sample = {name: _cpu(p) for name, p in named.items()}
        sample["loadgen"] = sum(generator.values())
        samples.append((time.monotonic(), sample))
        time.sleep(PERIOD_S)
    with open(json_path) as file:
        result = json.load(file)
    start = samples[0][0] + SKIP_S
    end = samples[-1][0] - 1.0
    window = [(t, s) for t, s in samples if start <= t <= end]
    (t0, first), (t1, last) = window[0], window[-1]
    cores = {name: (last[name] - first[name]) / (t1 - t0) for name in first}
    rate = result["per_s"]
    latency = {k: v or 0.0 for k, v in result["latency_ms"].items()}  # None: no call done
    print(
        f"calls/s {rate:,.0f}  p50 {latency['p50']:.2f} ms  p99 {latency['p99']:.2f} ms"
        f"  | cores: "
        + " ".join(f"{n} {c:.2f}" for n, c in cores.items())
        + f" (total {sum(cores.values()):.2f})"
        + "  | CPU ms/1k calls: "
        + " ".join(f"{n} {1e6 * c / max(rate, 1):.0f}" for n, c in cores.items())
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One load, three brokers: calls/s and p50/p99 at 1,000 connections through
# memory:// (`portao run`), redis:// and amqp:// (`portao gateway` + `portao worker`).
#
# Each round starts every target fresh, in turn, and puts the same two loads on it:
# `portao bench rpc -c 1000` closed loop (one call in flight per connection), then
# open loop at RATE calls/s offered (a rate all three hold). REPEATS rounds (default
# 3) interleave the targets, so drift on a shared machine hits them alike; the table
# gives medians over the rounds.
#
# Needs Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (guest/guest; the run
# makes a vhost of its own with rabbitmqctl and deletes it, and its Redis keys, after).
# DURATION (measured s per load, default 10), RATE (calls/s, default 1000), REPEATS.
# Writes bench/results/brokers-<target>-<load>-<round>.json, brokers-summary.json and
# prints the table (also in brokers-table.md).
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${REPEATS:-3}"
duration="${DURATION:-10}"
rate="${RATE:-1000}"
out=bench/results
mkdir -p "$out"
export PORTAO_JWT_SECRET="bench-$(python -c 'import secrets; print(secrets.token_hex(24))')"
redis=redis://127.0.0.1:6379/0
run_id="$RANDOM$RANDOM"
vhost="portao-bench-$run_id"
prefix="benchbrokers$run_id"
quiet=(--log-level warning)
pids=()

stop_target() {
  [ "${#pids[@]}" -eq 0 ] && return
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
cleanup() {
  stop_target
  rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$prefix*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT
rabbitmqctl -q add_vhost "$vhost"
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'

start_target() {  # target port round
  local listen=(--listen "tcp://127.0.0.1:$2") broker
  case "$1" in
    memory)
      portao run "${listen[@]}" --admin off "${quiet[@]}" >/dev/null 2>&1 &
      pids=($!) ;;
    redis | amqp)
      broker=(--broker "$redis")
      [ "$1" = amqp ] && broker=(--broker "amqp://guest:guest@127.0.0.1:5672/$vhost" --state "$redis")
      broker+=(--prefix "$prefix$1$3" "${quiet[@]}")
      portao gateway "${listen[@]}" "${broker[@]}" >/dev/null 2>&1 &
      pids=($!)
      portao worker "${broker[@]}" >/dev/null 2>&1 &
      pids+=($!) ;;
  esac
  # until a call through it is answered (workers registered, broker up)
  python -c 'import os, sys; from portao.bench.targets import Target, wait_answering
wait_answering(Target(sys.argv[1], sys.argv[2]), os.environ["PORTAO_JWT_SECRET"])' \
    "$1" "tcp://127.0.0.1:$2"
}

files=()
for round in $(seq 1 "$repeats"); do
  for target in memory redis amqp; do
    port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    start_target "$target" "$port" "$round"
    for load in closed "open-$rate"; do
      file="$out/brokers-$target-$load-$round.json"
      extra=()
      [ "$load" = closed ] || extra=(--rate "$rate")
      echo "round $round/$repeats: $target, $load" >&2
      portao bench rpc --target "tcp://127.0.0.1:$port" -c 1000 -p 2 -d "$duration" \
        "${extra[@]}" --json "$file" >/dev/null
      files+=("$file")
    done
    stop_target
  done
done

python - "$out" "${files[@]}" <<'EOF'
"""Medians per target and load over the rounds: the summary JSON and the table."""
import json
import statistics
import sys
from pathlib import Path

from portao.bench.report import table, write_json

out, files = Path(sys.argv[1]), sys.argv[2:]
runs = []
for name in files:
    result = json.loads(Path(name).read_text())
    _, target, rest = Path(name).stem.split("-", 2)  # brokers-<target>-<load>-<round>
    load, round_ = rest.rsplit("-", 1)
    runs.append({
        "file": name,
        "target": target,
        "load": load,
        "round": int(round_),
        "calls_per_s": result["per_s"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "connected": result["connected"],
        "failed": sum(result["errors"].values()) + result["unanswered"],
        "load_avg_1m": result["machine"]["load_avg_1m"],
    })
groups: dict[tuple[str, str], list[dict]] = {}
for run in runs:
    groups.setdefault((run["load"], run["target"]), []).append(run)
medians = [
    {"load": load, "target": target, "rounds": len(rs),
     **{k: statistics.median(r[k] for r in rs if r[k] is not None)
        for k in ("calls_per_s", "p50_ms", "p99_ms", "connected")},
     "failed": sum(r["failed"] for r in rs)}
    for (load, target), rs in groups.items()
]
machine = json.loads(Path(files[0]).read_text())["machine"]
write_json({"runs": runs, "medians": medians, "machine": machine}, out / "brokers-summary.json")
labels = {"memory": "memory:// (portao run)", "redis": "redis:// (gateway + worker)",
          "amqp": "amqp:// (gateway + worker)"}
text = table(
    [[m["load"], labels[m["target"]], m["calls_per_s"], m["p50_ms"], m["p99_ms"],
      f"{m['connected']:,.0f}", m["failed"]] for m in medians],
    ["load, 1,000 conns", "broker", "calls/s", "p50 ms", "p99 ms", "connected",
     "failed (all rounds)"],
)
rounds = max(m["rounds"] for m in medians)
text += f"\n\nmedians of {rounds} interleaved rounds; {machine['note']}"
(out / "brokers-table.md").write_text(text + "\n")
print(text)
EOF

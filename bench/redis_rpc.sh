#!/usr/bin/env bash
# The Redis targets: 1 gateway + 1 worker process, rpc closed loop at 1,000 connections
# and open loop at 10,000 calls/s offered, each REPEATS times (default 3), with the CPU
# each process spent per 1,000 calls (bench/cpu_per_call.py: steadier than calls/s on
# a shared machine).
#
# Needs Redis on 127.0.0.1:6379. Writes bench/results/redis-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${REPEATS:-3}"
export PORTAO_JWT_SECRET="bench-$(python -c 'import secrets; print(secrets.token_hex(24))')"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prefix="benchrpc$RANDOM"
broker=(--broker redis://127.0.0.1:6379/0 --prefix "$prefix" --log-level warning)
portao gateway --listen "tcp://127.0.0.1:$port" "${broker[@]}" >/dev/null 2>&1 &
gateway=$!
portao worker "${broker[@]}" >/dev/null 2>&1 &
worker=$!
cleanup() {
  kill "$gateway" "$worker" 2>/dev/null || true
  wait "$gateway" "$worker" 2>/dev/null || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT
sleep 3
redis=$(redis-cli info server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
rpc() {
  local name=$1
  shift
  printf '%-22s ' "$name"
  python bench/cpu_per_call.py gateway=$gateway worker=$worker redis=$redis -- \
    portao bench rpc --target "tcp://127.0.0.1:$port" -c 1000 -p 2 -d 10 "$@" \
    --json "bench/results/redis-$name.json"
}
for i in $(seq 1 "$repeats"); do
  rpc "closed-$i"
  rpc "closed-depth8-$i" --depth 8
  rpc "open-10k-$i" --rate 10000
done

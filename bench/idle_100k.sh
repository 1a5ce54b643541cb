#!/usr/bin/env bash
# Idle connections: 19,000 on one gateway process, then 100,000 on
# `portao gateway --processes 7` (SO_REUSEPORT), every connection authenticated and
# answering one ping. Needs Redis on 127.0.0.1:6379 and ~4 GiB of free memory.
# Writes bench/results/idle-19k.json and bench/results/idle-100k.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PORTAO_JWT_SECRET="bench-$(python -c 'import secrets; print(secrets.token_hex(24))')"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
run_idle() {  # processes connections json
  local port; port=$(free_port)
  local prefix="benchidle$RANDOM"
  portao gateway --processes "$1" --listen "tcp://127.0.0.1:$port" \
    --broker redis://127.0.0.1:6379/0 --prefix "$prefix" --log-level warning >/dev/null 2>&1 &
  local gateway=$!
  sleep $((3 + $1))
  portao bench idle --target "tcp://127.0.0.1:$port" -c "$2" -d 20 --warmup 0 \
    --server-pid "$gateway" --timeout 60 --json "$3" || true
  kill "$gateway"; wait "$gateway" || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
run_idle 1 19000 bench/results/idle-19k.json
run_idle 7 100000 bench/results/idle-100k.json

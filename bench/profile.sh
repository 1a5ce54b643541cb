#!/usr/bin/env bash
# Profile a server under the rpc scenario with py-spy and print the top costs.
#
#   bench/profile.sh run            # portao run (memory broker)
#   bench/profile.sh redis          # portao gateway + worker over Redis: profiles both
#   RPC_ARGS="--rate 10000" bench/profile.sh redis   # other load (default: closed loop, depth 1)
#
# Needs: pip install -e '.[bench]' py-spy; Redis on 127.0.0.1:6379 for `redis`.
# Writes bench/results/profile-<target>-<process>.raw and prints the summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-run}"
seconds="${SECONDS_TO_RECORD:-8}"
export PORTAO_JWT_SECRET="${PORTAO_JWT_SECRET:-bench-profile-secret-$(python -c 'import secrets; print(secrets.token_hex(16))')}"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prefix="benchprof$RANDOM"
pids=()
names=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT

case "$target" in
  run)
    portao run --listen "tcp://127.0.0.1:$port" --log-level warning >/dev/null 2>&1 &
    pids+=($!); names+=(run) ;;
  redis)
    portao gateway --broker redis://127.0.0.1:6379/0 --prefix "$prefix" \
      --listen "tcp://127.0.0.1:$port" --log-level warning >/dev/null 2>&1 &
    pids+=($!); names+=(gateway)
    portao worker --broker redis://127.0.0.1:6379/0 --prefix "$prefix" --log-level warning \
      >/dev/null 2>&1 &
    pids+=($!); names+=(worker) ;;
  *) echo "usage: $0 run|redis" >&2; exit 2 ;;
esac
sleep 3
# shellcheck disable=SC2086  # RPC_ARGS is a list of options
portao bench rpc --target "tcp://127.0.0.1:$port" -c 1000 -p 2 ${RPC_ARGS:-} \
  -d $((seconds + 6)) > "bench/results/profile-$target-rpc.txt" 2>/dev/null &
load=$!
sleep 4
for i in "${!pids[@]}"; do
  py-spy record -p "${pids[$i]}" -d "$seconds" -r 200 -f raw --nonblocking \
    -o "bench/results/profile-$target-${names[$i]}.raw" >/dev/null 2>&1 &
done
wait "$load"
grep -E "calls/s|p99" "bench/results/profile-$target-rpc.txt"
for name in "${names[@]}"; do
  echo "== $name"
  python bench/pyspy_top.py "bench/results/profile-$target-$name.raw" --top 20
done

#!/usr/bin/env bash
# The order pipeline across two processes: the orders service (order_pipeline --broker) and the
# payments service (payments_service), each with its own engine and journal, talking only through
# a real nats-server with JetStream that this script starts on a free port on 127.0.0.1 (its store
# in a temporary directory) and stops by PID on exit. Exits non-zero if either side's invariants
# fail. Options after the script's own pass to order_pipeline:
#   bash examples/run_distributed.sh --orders 5000
#   bash examples/run_distributed.sh --crash-payments --orders 2000
#   bash examples/run_distributed.sh --bin-dir build/examples --orders 150 --quiet   (as CTest runs it)
# --crash-payments kills the payments service with kill -9 mid-run and starts it again on its
# journal: every order is still charged once and answered once.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir=""
crash=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --crash-payments) crash=1; shift ;;
    *) break ;;
  esac
done
if [ -z "$bin_dir" ]; then
  bash "$root/.ci/install-deps.sh"
  cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$root/build" --target order_pipeline payments_service
  bin_dir="$root/build/examples"
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${POP_KEEP_WORK:-}" ]; then echo "run_distributed: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# A free port: nothing answers on it.
port=""
for _ in $(seq 1 100); do
  candidate=$(( 20000 + RANDOM % 40000 ))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || { echo "run_distributed: no free port" >&2; exit 2; }

wait_for() {  # wait_for <file> <text> <what>
  for _ in $(seq 1 400); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "run_distributed: $3 did not start; its log:" >&2
  cat "$1" >&2 || true
  exit 2
}

nats-server -js -a 127.0.0.1 -p "$port" -sd "$work/store" -l "$work/nats.log" &
pids+=($!)
wait_for "$work/nats.log" "Server is ready" "nats-server"
broker="nats://127.0.0.1:$port"

start_payments() {
  : >"$work/payments.err"
  "$bin_dir/payments_service" --broker "$broker" --journal "$work/payments.db" \
    >"$work/payments.out" 2>"$work/payments.err" &
  payments_pid=$!
  pids+=("$payments_pid")
  wait_for "$work/payments.err" "payments_service: ready" "payments_service"
}
start_payments

orders_rc=0
"$bin_dir/order_pipeline" --broker "$broker" --journal "$work/orders.db" \
  --sink "$work/events.jsonl" "$@" >"$work/orders.out" &
orders_pid=$!
pids+=("$orders_pid")
if [ "$crash" -eq 1 ]; then
  sleep 0.$(( RANDOM % 4 + 1 ))
  kill -KILL "$payments_pid"
  wait "$payments_pid" 2>/dev/null || true
  echo "run_distributed: killed the payments service (kill -9); starting it again on its journal"
  start_payments
fi
wait "$orders_pid" || orders_rc=$?
cat "$work/orders.out"

kill -TERM "$payments_pid"
payments_rc=0
wait "$payments_pid" || payments_rc=$?
cat "$work/payments.out"
if [ -s "$work/payments.err" ] && [ "$payments_rc" -ne 0 ]; then cat "$work/payments.err" >&2; fi
if [ "$orders_rc" -ne 0 ] || [ "$payments_rc" -ne 0 ]; then
  echo "run_distributed: orders exited $orders_rc, payments exited $payments_rc" >&2
  exit 1
fi
# Across the two journals: the orders confirmed are the payments confirmed, each once.
orders_confirmed=$(awk '$1 == "confirmed" {print $2; exit}' "$work/orders.out")
payments_confirmed=$(awk '$1 == "confirmed" {print $2; exit}' "$work/payments.out")
if [ -z "$orders_confirmed" ] || [ "$orders_confirmed" != "$payments_confirmed" ]; then
  echo "run_distributed: orders confirmed '$orders_confirmed' but payments confirmed '$payments_confirmed'" >&2
  exit 1
fi
echo "both services agree: $orders_confirmed orders confirmed and paid once"

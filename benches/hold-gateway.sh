#!/usr/bin/env bash
# Idle WebSocket connections on a distributed `im gateway` (Redis presence, Kafka bridge) with
# the services behind it running: the gateway process's bytes per connection, for an A/B of
# gateway builds. Starts the nisshi broker, `im logic` and `im persist` once (from IM_BIN),
# then for each run and each gateway build given, a fresh gateway and `im-bench hold`.
# Writes benches/results/hold-gateway-<conns>-<build index>-<run>.json.
#   usage: benches/hold-gateway.sh CONNS RUNS GATEWAY_BIN_DIR...   (release builds)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS="$1"; RUNS="$2"; shift 2
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
BROKER="${IM_BROKER:-$HOME/.cache/im-tools/bin/nisshi}"
SECRET=hold-secret
DB=im_bench_hold
REDIS=redis://127.0.0.1:6379/11
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB" || true
}
trap cleanup EXIT
wait_port() { for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
redis-cli -n 11 FLUSHDB >/dev/null
mkdir -p "$WORK/broker"
(cd "$WORK/broker" && exec "$BROKER" broker --listener-url tcp://127.0.0.1:29292 \
   --advertised-listener-url tcp://127.0.0.1:29292 --storage-engine sqlite://broker.db >"$WORK/broker.log" 2>&1) &
PIDS+=($!)
wait_port 29292
K=(--kafka-brokers 127.0.0.1:29292)
MYSQL="mysql://root@127.0.0.1:3306/$DB"
(RUST_LOG=warn "$T/im" logic --jwt-secret $SECRET --mysql-url "$MYSQL" --redis-url $REDIS "${K[@]}" \
   --api-listen 127.0.0.1:28580 >"$WORK/logic.log" 2>&1) &
PIDS+=($!)
wait_port 28580
(RUST_LOG=warn "$T/im" persist --mysql-url "$MYSQL" "${K[@]}" >"$WORK/persist.log" 2>&1) &
PIDS+=($!)
sleep 3
for run in $(seq "$RUNS"); do
  i=0
  for G in "$@"; do
    i=$((i + 1))
    redis-cli -n 11 FLUSHDB >/dev/null
    RUST_LOG=warn "$G/im" gateway --jwt-secret $SECRET --ws-listen 127.0.0.1:28590 --redis-url $REDIS \
      "${K[@]}" --gateway-id hold-gw-$i-$run >"$WORK/gateway.log" 2>&1 &
    GW=$!
    wait_port 28590
    sleep 2
    echo "== gateway build $i ($G), run $run"
    "$T/im-bench" hold --addr 127.0.0.1:28590 --conns "$CONNS" --secret $SECRET --hold-secs 20 \
      --raw-tcp 0 --gateway-pid "$GW" --json "benches/results/hold-gateway-$CONNS-$i-$run.json"
    kill "$GW"; wait "$GW" 2>/dev/null || true
    sleep 3
  done
done

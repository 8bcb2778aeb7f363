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
SECRET=hold-secret
DB=im_bench_hold
REDIS_DB=11
BROKER_PORT=29292
API_PORT=28580
# shellcheck source=benches/services.sh
. benches/services.sh
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

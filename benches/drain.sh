#!/usr/bin/env bash
# Draining a gateway: CONNS connections on gateway A (PROCS processes, one shard each), then
# SIGTERM to A; every client the drain closes (1012) reconnects to gateway B, as one that asked
# /gateways/pick would. Reports the seconds to move them all (`im-bench drain`), with the broker,
# logic and persist running behind both gateways (distributed mode), for each run.
# Writes benches/results/drain-<conns>-<window>-<run>.json.
#   usage: benches/drain.sh CONNS PROCS WINDOW_S RUNS   (cargo build --release first)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS="$1"; PROCS="$2"; WINDOW="$3"; RUNS="$4"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
SECRET=drain-secret
DB=im_bench_drain
REDIS_DB=10
BROKER_PORT=29392
API_PORT=28680
# shellcheck source=benches/services.sh
. benches/services.sh
gateway() { # port id
  RUST_LOG=warn "$T/im" gateway --jwt-secret $SECRET --ws-listen 127.0.0.1:"$1" --redis-url $REDIS \
    "${K[@]}" --gateway-id "$2" --processes "$PROCS" --shards 1 --no-pin --drain-window-s "$WINDOW" \
    >"$WORK/$2.log" 2>&1 &
}
for run in $(seq "$RUNS"); do
  gateway 28690 drain-a-$run; A=$!
  gateway 28691 drain-b-$run; B=$!
  PIDS+=("$A" "$B")
  wait_port 28690; wait_port 28691
  sleep 3
  echo "== run $run: $CONNS connections, $PROCS processes per gateway, drain window $WINDOW s"
  "$T/im-bench" drain --from 127.0.0.1:28690 --to 127.0.0.1:28691 --pid "$A" --conns "$CONNS" \
    --secret $SECRET --json "benches/results/drain-$CONNS-$WINDOW-$run.json"
  kill "$B"; wait "$B" 2>/dev/null || true; wait "$A" 2>/dev/null || true
  sleep 3
done

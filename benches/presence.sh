#!/usr/bin/env bash
# Presence propagation in both modes (benches/RESULTS.md, "Presence"): `im-bench presence`
# against `im standalone`, then against the distributed services (nisshi broker, MariaDB,
# Redis, `im logic`, `im persist`, `im gateway`), RUNS times each. Arrival: a subject's
# connect → its contact's `presence` frame; beside it a message over the same hops;
# departure: close → the frame, the 2 s debounce included and less it. In the distributed
# runs, also the gateway process's CPU per `typing` frame beside a `send` at the same rate
# (`im-bench p2p --typing`). Writes benches/results/presence-<mode>-<run>.json and
# presence-gateway-{send,typing}-<run>.json.
#   usage: benches/presence.sh [SUBJECTS] [RUNS]   (cargo build --release first)
#   IM_BIN=DIR: take `im` and `im-bench` from DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS="${1:-200}"
RUNS="${2:-3}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
IM="$T/im"; BENCH="$T/im-bench"
BROKER="${IM_BROKER:-$HOME/.cache/im-tools/bin/nisshi}"
SECRET=presence-secret
DB=im_bench_presence
REDIS=redis://127.0.0.1:6379/10
OUT=benches/results
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT
start() { # name, command...
  local name=$1; shift
  (RUST_LOG=warn "$@" >"$WORK/$name.log" 2>&1) &
  PIDS+=($!)
}
wait_port() { for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

for run in $(seq "$RUNS"); do
  echo "== standalone, run $run"
  DATA="$WORK/standalone-$run"
  mkdir -p "$DATA"
  SEED="$("$BENCH" seed-users --sqlite "$DATA/im.db" --count $((SUBJECTS + 1)))"
  FIRST="$(echo "$SEED" | sed -E 's/.*"first_user":([0-9]+).*/\1/')"
  start standalone "$IM" standalone --data-dir "$DATA" --jwt-secret "$SECRET" \
    --ws-listen 127.0.0.1:28390 --api-listen 127.0.0.1:28380
  wait_port 28390
  wait_port 28380
  "$BENCH" presence --addr 127.0.0.1:28390 --api 127.0.0.1:28380 --secret "$SECRET" \
    --subjects "$SUBJECTS" --user-base "$FIRST" --json "$OUT/presence-standalone-$run.json"
  stop_all
done

for run in $(seq "$RUNS"); do
  echo "== distributed, run $run"
  mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
  redis-cli -n 10 FLUSHDB >/dev/null
  mkdir -p "$WORK/broker-$run"
  (cd "$WORK/broker-$run" && exec "$BROKER" broker --listener-url tcp://127.0.0.1:29192 \
     --advertised-listener-url tcp://127.0.0.1:29192 --storage-engine sqlite://broker.db >"$WORK/broker.log" 2>&1) &
  PIDS+=($!)
  wait_port 29192
  K=(--kafka-brokers 127.0.0.1:29192)
  MYSQL="mysql://root@127.0.0.1:3306/$DB"
  start logic "$IM" logic --jwt-secret $SECRET --mysql-url "$MYSQL" --redis-url $REDIS "${K[@]}" --api-listen 127.0.0.1:28380
  wait_port 28380
  start persist "$IM" persist --mysql-url "$MYSQL" "${K[@]}"
  start gateway "$IM" gateway --jwt-secret $SECRET --ws-listen 127.0.0.1:28390 --redis-url $REDIS "${K[@]}" \
    --gateway-id presence-gw
  wait_port 28390
  "$BENCH" seed-users --first 30000000 --count $((SUBJECTS + 1)) | mysql -uroot -h127.0.0.1 "$DB"
  sleep 3 # logic's first rebalance
  "$BENCH" presence --addr 127.0.0.1:28390 --api 127.0.0.1:28380 --secret "$SECRET" \
    --subjects "$SUBJECTS" --user-base 30000000 --json "$OUT/presence-distributed-$run.json"
  # What a typing frame costs the gateway process, beside a message, at the same rate.
  GW=$(pgrep -f -- "--gateway-id presence-gw" | head -1)
  PAIRS=$(( (SUBJECTS + 1) / 2 ))
  # idle: the same connections and window with nothing sent (the gateway's own background
  # CPU: its bus clients' threads), subtracted from the other two.
  # 500/s: what this pipeline on nisshi carries without a backlog (a backlog would be
  # delivered during the next run and charged to it); typing first for the same reason.
  for kind in idle typing send; do
    FLAG=(); RATE=500
    [ "$kind" = typing ] && FLAG=(--typing)
    [ "$kind" = idle ] && RATE=0
    "$BENCH" p2p --addr 127.0.0.1:28390 --secret "$SECRET" --pairs "$PAIRS" --rate "$RATE" --secs 10 \
      --user-base 30000000 --gateway-pid "$GW" "${FLAG[@]}" --json "$OUT/presence-gateway-$kind-$run.json"
    sleep 2
  done
  stop_all
done
mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB"

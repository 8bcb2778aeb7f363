#!/usr/bin/env bash
# 1:1 messages through standalone (the whole pipeline in one process: gateway, bridge, logic's
# sequencing, persist's SQLite batches, the ack after the commit): PAIRS sender/receiver
# pairs of seeded users send RATE 100-byte messages per second for SECS seconds; `im-bench
# p2p` reports delivery latency (send → `msg` at the receiver), acks and the server's CPU.
# Writes benches/results/p2p-standalone-<pairs>-<rate>-<run>.json.
#   usage: benches/p2p-standalone.sh [PAIRS] [RATE] [SECS] [RUN]   (cargo build --release first)
#   IM_BIN=DIR: take `im` and `im-bench` from DIR (an A/B run against another build).
#   IM_ARGS="...": more flags for `im standalone` (e.g. "--linger-ms 2 --stage-wait-ms 1").
#   METRICS_OUT=FILE: keep the server's /metrics as the run ends.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${1:-1000}"
RATE="${2:-2000}"
SECS="${3:-10}"
RUN="${4:-1}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
OUT=benches/results
SECRET=p2p-secret
mkdir -p "$OUT"
DATA="$(mktemp -d)"
IM=
cleanup() {
  [ -n "$IM" ] && kill "$IM" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

echo "== seeding $((2 * PAIRS)) users into $DATA/im.db"
SEED="$("$T/im-bench" seed-users --sqlite "$DATA/im.db" --count $((2 * PAIRS)))"
FIRST="$(echo "$SEED" | sed -E 's/.*"first_user":([0-9]+).*/\1/')"

echo "== im standalone, $PAIRS pairs, $RATE msgs/s for $SECS s"
RUST_LOG=warn "$T/im" standalone --data-dir "$DATA" --jwt-secret "$SECRET" \
  --ws-listen 127.0.0.1:28290 --api-listen 127.0.0.1:28280 ${IM_ARGS:-} > "$DATA/im.log" 2>&1 &
IM=$!
wait_port 28290
"$T/im-bench" p2p --addr 127.0.0.1:28290 --secret "$SECRET" --pairs "$PAIRS" --rate "$RATE" \
  --secs "$SECS" --user-base "$FIRST" --gateway-pid "$IM" \
  --metrics 127.0.0.1:28280 --metrics 127.0.0.1:28290 \
  --json "$OUT/p2p-standalone-$PAIRS-$RATE-$RUN.json"
if [ -n "${METRICS_OUT:-}" ]; then
  { curl -s http://127.0.0.1:28290/metrics; curl -s http://127.0.0.1:28280/metrics; } > "$METRICS_OUT"
fi

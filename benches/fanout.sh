#!/usr/bin/env bash
# Group fan-out throughput, the gateway against the baseline server in the same run
# (benches/RESULTS.md). The gateway side is `im standalone`: the real pipeline (gateway, bridge,
# logic's sequencing and membership, persist's SQLite batches, all in one process) with one
# group of MEMBERS seeded through the store. The baseline is `im-bench baseline` (tokio +
# tokio-tungstenite), which re-broadcasts every `send` to all other connections. The same
# harness (`im-bench fanout`) connects MEMBERS clients to each and sends MESSAGES 100-byte
# messages at RATE per second, round-robin over a few senders; each server's CPU is read
# from /proc over the window, so the figure is deliveries per CPU-second (per core).
# The floor is `im-bench raw-fanout`: each `send` re-framed once and written to every other
# socket by a plain single-threaded loop (no JSON, no pipeline), measured by the same harness.
# Writes benches/results/fanout-{gateway,baseline,raw}-<members>-<rate>-<run>.json.
#   usage: benches/fanout.sh [MEMBERS] [RATE] [MESSAGES] [RUN]   (cargo build --release first)
#   PROFILE=1: also record a flamegraph of the gateway side (tuning/profile.sh).
#   IM_ARGS="...": more flags for `im standalone` (e.g. "--shards 1 --fanout-merge-ms 10").
#   SENDERS=N: members taking turns to send (default: enough for 50 msgs/s each).
#   ONLY_GATEWAY=1: skip the baseline and the floor.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMBERS="${1:-2000}"
RATE="${2:-100}"
MESSAGES="${3:-1000}"
RUN="${4:-1}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"   # IM_BIN: another build, for A/B runs
OUT=benches/results
SECRET=fanout-secret
mkdir -p "$OUT"
DATA="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

echo "== seeding $MEMBERS users and one group into $DATA/im.db"
SEED="$("$T/im-bench" seed-users --sqlite "$DATA/im.db" --count "$MEMBERS")"
FIRST="$(echo "$SEED" | sed -E 's/.*"first_user":([0-9]+).*/\1/')"
GROUP="$(echo "$SEED" | sed -E 's/.*"group":([0-9]+).*/\1/')"

echo "== gateway: im standalone, $MEMBERS members, $RATE msgs/s, $MESSAGES messages"
RUST_LOG=warn "$T/im" standalone --data-dir "$DATA" --jwt-secret "$SECRET" \
  --ws-listen 127.0.0.1:28190 --api-listen 127.0.0.1:28180 ${IM_ARGS:-} \
  > "$DATA/im.log" 2>&1 &
IM=$!
PIDS+=("$IM")
wait_port 28190
LOAD=("$T/im-bench" fanout --addr 127.0.0.1:28190 --secret "$SECRET" --group "$GROUP"
  --first "$FIRST" --members "$MEMBERS" --messages "$MESSAGES" --rate "$RATE"
  --gateway-pid "$IM" --json "$OUT/fanout-gateway-$MEMBERS-$RATE-$RUN.json"
  ${SENDERS:+--senders "$SENDERS"})
if [ -n "${PROFILE:-}" ]; then
  tuning/profile.sh --pid "$IM" --secs 120 -- "${LOAD[@]}"
else
  "${LOAD[@]}"
fi
kill "$IM"; wait "$IM" 2>/dev/null || true
[ -n "${ONLY_GATEWAY:-}" ] && exit 0

echo "== baseline: tokio-tungstenite broadcast, 2 worker threads, the same load"
"$T/im-bench" baseline --listen 127.0.0.1:28199 --secret "$SECRET" --threads 2 &
BASE=$!
PIDS+=("$BASE")
wait_port 28199
"$T/im-bench" fanout --baseline --addr 127.0.0.1:28199 --secret "$SECRET" --group 1 \
  --first 1 --members "$MEMBERS" --messages "$MESSAGES" --rate "$RATE" ${SENDERS:+--senders "$SENDERS"} \
  --gateway-pid "$BASE" --json "$OUT/fanout-baseline-$MEMBERS-$RATE-$RUN.json"
kill "$BASE"; wait "$BASE" 2>/dev/null || true

echo "== floor: im-bench raw-fanout (one write per delivery, one thread), the same load"
"$T/im-bench" raw-fanout --listen 127.0.0.1:28198 &
RAW=$!
PIDS+=("$RAW")
wait_port 28198
"$T/im-bench" fanout --baseline --addr 127.0.0.1:28198 --secret "$SECRET" --group 1 \
  --first 1 --members "$MEMBERS" --messages "$MESSAGES" --rate "$RATE" ${SENDERS:+--senders "$SENDERS"} \
  --gateway-pid "$RAW" --json "$OUT/fanout-raw-$MEMBERS-$RATE-$RUN.json"

#!/usr/bin/env bash
# The gateway against the baseline server (tokio + tokio-tungstenite, a task per connection:
# `im-bench baseline`), in the same run: CONNS idle connections to one process of each, held
# HOLD seconds with a WebSocket ping per connection every 30 s. One process each, because
# one process is all the baseline has: its ceiling here is the open-file limit (20,000).
# Writes benches/results/{baseline,gateway}-hold-<conns>-<run>.json.
#   usage: benches/baseline.sh [CONNS] [HOLD_SECS] [RUN]   (cargo build --release first)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS="${1:-19000}"
HOLD="${2:-60}"
RUN="${3:-1}"
T="${CARGO_TARGET_DIR:-target}/release"
# BASELINE_ARGS="--read-buffer-bytes 4096": the baseline with its read buffer cut down;
# TAG names its result files, SKIP_GATEWAY=1 runs the baseline only.
BASELINE_ARGS="${BASELINE_ARGS:-}"
TAG="${TAG:-baseline}"
OUT=benches/results
SECRET=baseline-secret
mkdir -p "$OUT"
"$T/im-bench" baseline --listen 127.0.0.1:18099 --secret "$SECRET" --threads 2 $BASELINE_ARGS &
BASE=$!
trap 'kill $BASE 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/18099) 2>/dev/null && break; sleep 0.1; done
echo "== baseline (tokio-tungstenite, 2 worker threads${BASELINE_ARGS:+, $BASELINE_ARGS}), $CONNS connections"
"$T/im-bench" hold --conns "$CONNS" --secret "$SECRET" --addr 127.0.0.1:18099 \
  --gateway-pid "$BASE" --per-worker 10000 --hold-secs "$HOLD" --ping-interval-s 30 \
  --raw-tcp 0 --json "$OUT/$TAG-hold-$CONNS-$RUN.json"
kill $BASE; wait $BASE 2>/dev/null || true
[ -z "${SKIP_GATEWAY:-}" ] || exit 0
echo "== gateway (1 process, 2 shards), $CONNS connections"
"$T/im-bench" hold --conns "$CONNS" --secret "$SECRET" --addr 127.0.0.1:18098 \
  --spawn-gateway "$T/im" --gateway-processes 1 --gateway-shards 2 \
  --per-worker 10000 --hold-secs "$HOLD" --ping-interval-s 30 \
  --raw-tcp 0 --json "$OUT/gateway-hold-$CONNS-$RUN.json"

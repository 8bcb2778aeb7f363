#!/usr/bin/env bash
# What tracing costs (README.md, "Tracing"; benches/RESULTS.md): 1:1 messages through
# standalone (benches/p2p-standalone.sh: the whole message path in one process, so nothing but
# the server limits it) with tracing off, on at the default sample ratio (0.01), and on for
# every send (1), alternated RUNS times. With tracing on, the spans go to `im-bench otlp-sink`
# (a collector that counts them and keeps nothing) and the server's exporter counters are kept.
# Writes benches/results/p2p-standalone-<pairs>-<rate>-tracing-<mode>-<run>.{json,metrics}
# and otlp-sink-<rate>-tracing-<mode>-<run>.json.
#   usage: benches/tracing.sh [RATE] [SECS] [RUNS] [PAIRS]   (cargo build --release first)
# PIPELINE=1 runs the distributed pipeline instead (benches/pipeline.sh's 1:1 step at RATE,
# ONLY_P2P: a broker, logic, persist and a gateway as processes), tracing off and on for every
# send, RUNS times; results in benches/results/pipeline-p2p-<rate>-tracing-<mode>-<run>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${1:-10000}"
SECS="${2:-10}"
RUNS="${3:-3}"
PAIRS="${4:-200}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
OUT=benches/results
SINK=
cleanup() {
  [ -n "$SINK" ] && kill "$SINK" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$OUT"
summary() { # tag
  local f="$OUT/p2p-standalone-$PAIRS-$RATE-$1.json"
  python3 - "$f" "$OUT/p2p-standalone-$PAIRS-$RATE-$1.metrics" "$OUT/otlp-sink-$RATE-$1.json" <<'PY'
import json, os, re, sys
r = json.load(open(sys.argv[1]))
line = (f"{os.path.basename(sys.argv[1])}: delivered/s {r['delivered_per_s']:.0f}, "
        f"p50 {r['delivery_latency']['p50_us']/1000:.1f} ms, p99 {r['delivery_latency']['p99_us']/1000:.1f} ms, "
        f"CPU {r['gateway_cpu_percent']:.0f} %")
if os.path.exists(sys.argv[3]):
    s = json.load(open(sys.argv[3]))
    m = open(sys.argv[2]).read() if os.path.exists(sys.argv[2]) else ""
    get = lambda n: (re.findall(rf"^{n} (\d+)", m, re.M) or ["?"])[0]
    line += (f"; spans at the sink {s['spans']}, exported {get('im_trace_spans_exported_total')}, "
             f"dropped {get('im_trace_spans_dropped_total')}")
print(line)
PY
}
if [ -n "${PIPELINE:-}" ]; then
  # The floor: the broker alone along the three hops at RATE, its records without and with a
  # traceparent header, on nisshi as it is and with its header table indexed (what
  # pipeline.sh does; benches/nisshi-header-index.sh says why).
  BROKER="${IM_BROKER:-$HOME/.cache/im-tools/bin/nisshi}"
  for index in no yes; do
    for header in no yes; do
      dir=$(mktemp -d)
      (cd "$dir" && exec "$BROKER" broker --listener-url tcp://127.0.0.1:29192 \
         --advertised-listener-url tcp://127.0.0.1:29192 --storage-engine sqlite://broker.db >broker.log 2>&1) &
      BP=$!
      for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/29192) 2>/dev/null && break; sleep 0.1; done
      [ "$index" = yes ] && benches/nisshi-header-index.sh "$dir/broker.db"
      flag=(); [ "$header" = yes ] && flag=(--traceparent)
      echo "== broker-probe $RATE records/s, headers: $header, header table indexed: $index"
      "$T/im-bench" broker-probe --kafka-brokers 127.0.0.1:29192 --rate "$RATE" --secs 10 "${flag[@]}" \
        --json "$OUT/broker-probe-$RATE-headers-$header-index-$index.json" | tail -5
      kill "$BP"; wait "$BP" 2>/dev/null || true
      rm -rf "$dir"
    done
  done
  for run in $(seq "$RUNS"); do
    for mode in off 1; do
      tag="tracing-$mode-$run"
      env=()
      if [ "$mode" != off ]; then
        "$T/im-bench" otlp-sink --listen 127.0.0.1:24318 --secs 600 \
          --json "$OUT/otlp-sink-pipeline-$RATE-$tag.json" >/dev/null &
        SINK=$!
        env=(IM_OTLP_ENDPOINT=http://127.0.0.1:24318 IM_OTLP_SAMPLE_RATIO="$mode")
      fi
      env "${env[@]}" ONLY_P2P=1 RATES="$RATE" TAG="$tag" benches/pipeline.sh >/dev/null
      if [ -n "$SINK" ]; then
        kill "$SINK" 2>/dev/null || true
        wait "$SINK" 2>/dev/null || true
        SINK=
      fi
      python3 - "$OUT/pipeline-p2p-$RATE-$tag.json" "$OUT/otlp-sink-pipeline-$RATE-$tag.json" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
line = (f"{os.path.basename(sys.argv[1])}: delivered/s {r['delivered_per_s']:.0f}, "
        f"p50 {r['delivery_latency']['p50_us']/1000:.1f} ms, p99 {r['delivery_latency']['p99_us']/1000:.1f} ms, "
        f"gateway CPU {r['gateway_cpu_percent']:.0f} %")
if os.path.exists(sys.argv[2]):
    line += f"; spans at the sink {json.load(open(sys.argv[2]))['spans']}"
print(line)
PY
    done
  done
  exit 0
fi
for run in $(seq "$RUNS"); do
  for mode in off 0.01 1; do
    tag="tracing-$mode-$run"
    args=""
    if [ "$mode" != off ]; then
      "$T/im-bench" otlp-sink --listen 127.0.0.1:24318 --secs $((SECS + 120)) \
        --json "$OUT/otlp-sink-$RATE-$tag.json" >/dev/null &
      SINK=$!
      args="--otlp-endpoint http://127.0.0.1:24318 --otlp-sample-ratio $mode"
    fi
    IM_ARGS="$args" METRICS_OUT="$OUT/p2p-standalone-$PAIRS-$RATE-$tag.metrics" \
      benches/p2p-standalone.sh "$PAIRS" "$RATE" "$SECS" "$tag" >/dev/null
    if [ -n "$SINK" ]; then
      kill "$SINK" 2>/dev/null || true
      wait "$SINK" 2>/dev/null || true
      SINK=
    fi
    summary "$tag"
  done
done

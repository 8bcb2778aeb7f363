#!/usr/bin/env bash
# The million-connection run (benches/RESULTS.md): tunes the kernel with sysctl.conf
# (tuning/apply.sh, reverted on exit), then `im-bench hold` opens CONNS WebSocket connections
# to GATEWAYS gateway processes sharing one port (SO_REUSEPORT: the open-file limit is 20,000
# per process here), holds them for HOLD seconds with a WebSocket ping from every connection
# every 30 s, and measures memory, heartbeat CPU and errors. Writes
# benches/results/hold-<conns>-<run>.{json,svg}.
#   usage: benches/million.sh [CONNS] [HOLD_SECS] [RUN]   (cargo build --release first)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS="${1:-1000000}"
HOLD="${2:-300}"
RUN="${3:-1}"
T="${CARGO_TARGET_DIR:-target}/release"
# 16,700 connections per gateway process on average, under the 20,000 descriptor limit even
# when SO_REUSEPORT's hashing is uneven.
GATEWAYS="${GATEWAYS:-$(( (CONNS + 16699) / 16700 ))}"
OUT=benches/results
mkdir -p "$OUT"
tuning/apply.sh
# Everything runs in a network namespace of its own: it gets an established-connection hash
# table sized by net.ipv4.tcp_child_ehash_entries (sysctl.conf) instead of the host's, which
# is sized at boot and too small past a million connections. Per-namespace settings start
# at their defaults there, so sysctl.conf is applied inside too (-e: the global ones are
# already set).
NS="im-million-$$"
ip netns add "$NS"
trap 'ip netns del "$NS" 2>/dev/null || true; tuning/apply.sh --revert' EXIT
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" sysctl -e -q -p sysctl.conf || true
echo "== $CONNS connections, $GATEWAYS gateway processes, hold $HOLD s ($(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB), namespace $NS"
ip netns exec "$NS" "$T/im-bench" hold --conns "$CONNS" --secret million-secret \
  --spawn-gateway "$T/im" --gateway-processes "$GATEWAYS" --gateway-shards 1 \
  --per-worker 18000 --hold-secs "$HOLD" --ping-interval-s 30 --raw-tcp 0 \
  --addr 127.0.0.1:18090 \
  --json "$OUT/hold-$CONNS-$RUN.json" --plot "$OUT/hold-$CONNS-$RUN.svg"

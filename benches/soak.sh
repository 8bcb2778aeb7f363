#!/usr/bin/env bash
# Soak: `im standalone` holding 18,000 WebSockets (one process, under this host's 20,000
# open-file limit) for MINUTES while 200 pairs send 2,000 1:1 messages a second and a
# 1,000-member group gets 5 messages a second. Every SAMPLE_S seconds the server's RSS, open
# fds and CPU are sampled; at the end the harnesses report what was sent, acknowledged and
# delivered. Pass: no errors, every acknowledged message delivered, RSS and fds flat after
# the warm-up (the growth from the first sample after warm-up to the last is printed in %).
# Writes benches/results/soak-<minutes>-<run>.{csv,svg} and the harnesses' JSON beside them.
#   usage: benches/soak.sh [MINUTES (60)] [RUN] [SAMPLE_S (60)]   (cargo build --release first)
# The distributed soak (100,000 connections over gateway processes) is benches/soak-distributed.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-60}"
RUN="${2:-1}"
SAMPLE_S="${3:-60}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
OUT=benches/results
SECRET=soak-secret
PAIRS=200
RATE=2000
MEMBERS=1000
IDLE=$((18000 - 2 * PAIRS - MEMBERS))
SECS=$((MINUTES * 60))
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
field() { echo "$1" | sed -E "s/.*\"$2\":([0-9]+).*/\1/"; }

echo "== seeding: a group of $MEMBERS, then $((2 * PAIRS)) users for the pairs"
G="$("$T/im-bench" seed-users --sqlite "$DATA/im.db" --count "$MEMBERS")"
P="$("$T/im-bench" seed-users --sqlite "$DATA/im.db" --count $((2 * PAIRS)))"
GROUP_FIRST="$(field "$G" first_user)"; GROUP="$(field "$G" group)"; PAIR_FIRST="$(field "$P" first_user)"

echo "== im standalone; $IDLE idle connections, $PAIRS pairs at $RATE msg/s, a group of $MEMBERS at 5 msg/s, for $MINUTES min"
# The p2p and fan-out harnesses' receivers never send (no pings), so the heartbeat timeout is
# raised past the run; the idle connections ping every 30 s as clients should.
RUST_LOG=warn "$T/im" standalone --data-dir "$DATA" --jwt-secret "$SECRET" \
  --ws-listen 127.0.0.1:28390 --api-listen 127.0.0.1:28380 \
  --heartbeat-timeout-ms $(((SECS + 600) * 1000)) ${IM_ARGS:-} > "$DATA/im.log" 2>&1 &
IM=$!; PIDS+=("$IM")
wait_port 28390
"$T/im-bench" hold --addr 127.0.0.1:28390 --secret "$SECRET" --conns "$IDLE" --raw-tcp 0 \
  --user-base 50000000 --hold-secs $((SECS + 120)) > "$OUT/soak-$MINUTES-$RUN-hold.txt" 2>&1 &
PIDS+=("$!")
# Let the idle connections open before the load starts.
for _ in $(seq 120); do
  [ "$(ls /proc/$IM/fd | wc -l)" -ge "$IDLE" ] && break
  sleep 1
done
"$T/im-bench" p2p --addr 127.0.0.1:28390 --secret "$SECRET" --pairs "$PAIRS" --rate "$RATE" \
  --secs "$SECS" --user-base "$PAIR_FIRST" --json "$OUT/soak-$MINUTES-$RUN-p2p.json" \
  > "$OUT/soak-$MINUTES-$RUN-p2p.txt" 2>&1 &
P2P=$!; PIDS+=("$P2P")
"$T/im-bench" fanout --addr 127.0.0.1:28390 --secret "$SECRET" --group "$GROUP" \
  --first "$GROUP_FIRST" --members "$MEMBERS" --messages $((SECS * 5)) --interval-ms 200 \
  --json "$OUT/soak-$MINUTES-$RUN-fanout.json" > "$OUT/soak-$MINUTES-$RUN-fanout.txt" 2>&1 &
FAN=$!; PIDS+=("$FAN")

CSV="$OUT/soak-$MINUTES-$RUN.csv"
# RSS split: anonymous (the heap: what a leak grows) and file-backed (SQLite's mapped
# database file, which grows with the data and which the kernel can drop).
# The heaps, from the server's /metrics: what Rust's allocator (mimalloc) has committed, and
# the C libraries' heap (glibc malloc: SQLite's page cache) in use and freed but held. RSS
# alone cannot tell which part grows, nor live data from what an allocator keeps.
echo "seconds,rss_kib,anon_kib,file_kib,fds,cpu_s,rust_committed_kib,malloc_in_use_kib,malloc_free_kib" > "$CSV"
TICK=$(getconf CLK_TCK)
START=$(date +%s)
while kill -0 "$P2P" 2>/dev/null || kill -0 "$FAN" 2>/dev/null; do
  mem=$(awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {print r "," a "," f}' /proc/$IM/status)
  fds=$(ls /proc/$IM/fd | wc -l)
  cpu=$(awk -v t="$TICK" '{printf "%.1f", ($14 + $15) / t}' /proc/$IM/stat)
  heap=$(curl -s --max-time 5 http://127.0.0.1:28390/metrics \
    | awk '/^im_allocator_committed_bytes/ {r=$2} /^im_malloc_in_use_bytes / {u=$2} /^im_malloc_free_bytes / {f=$2}
           END {printf "%d,%d,%d", r / 1024, u / 1024, f / 1024}')
  echo "$(( $(date +%s) - START )),$mem,$fds,$cpu,$heap" >> "$CSV"
  sleep "$SAMPLE_S"
done
wait "$P2P" || true
wait "$FAN" || true

echo "== results"
tail -n 12 "$OUT/soak-$MINUTES-$RUN-p2p.txt"
tail -n 8 "$OUT/soak-$MINUTES-$RUN-fanout.txt"
# Growth after warm-up: from the second sample to the last.
awk -F, 'NR == 3 { r0 = $2; a0 = $3; f0 = $5; h0 = $7; m0 = $8 } NR > 1 { r = $2; a = $3; f = $5; h = $7; m = $8; mf = $9; n++ }
  END { if (n >= 3) printf "after warm-up (%d samples): RSS %.0f → %.0f MiB (%+.1f %%), of which anonymous %.0f → %.0f MiB (%+.1f %%); Rust heap committed %.0f → %.0f MiB; C heap in use %.0f → %.0f MiB (free but held at the end %.0f MiB); fds %d → %d (%+.1f %%)\n",
        n, r0 / 1024, r / 1024, 100 * (r - r0) / r0, a0 / 1024, a / 1024, 100 * (a - a0) / a0, h0 / 1024, h / 1024, m0 / 1024, m / 1024, mf / 1024, f0, f, 100 * (f - f0) / f0 }' "$CSV"

# A plot of RSS (MiB) and open fds (thousands) against minutes.
awk -F, -v title="im standalone soak, $MINUTES min ($IDLE idle + $((2 * PAIRS + MEMBERS)) busy connections)" '
  BEGIN { n = 0 }
  NR > 1 { t[n] = $1 / 60; r[n] = $2 / 1024; a[n] = $3 / 1024; f[n] = $5 / 1000; h[n] = $7 / 1024; m[n] = $8 / 1024; if (r[n] > rm) rm = r[n]; if (t[n] > tm) tm = t[n]; n++ }
  END {
    W = 720; H = 360; L = 60; B = 40; if (tm == 0) tm = 1; ym = rm * 1.2; if (ym < 25) ym = 25
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
    printf "<text x=\"%d\" y=\"18\">%s</text>\n", L, title
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, H - B, W - 10, H - B
    printf "<line x1=\"%d\" y1=\"30\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, L, H - B
    printf "<text x=\"%d\" y=\"%d\">minutes (0 – %.1f)</text>\n", W / 2, H - 8, tm
    printf "<text x=\"4\" y=\"40\">%.0f</text><text x=\"4\" y=\"%d\">0</text>\n", ym, H - B
    split("#1f77b4 #2ca02c #d62728 #9467bd #8c564b", colour, " ")
    for (s = 1; s <= 5; s++) {
      printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", colour[s]
      for (i = 0; i < n; i++) {
        v = s == 1 ? r[i] : s == 2 ? a[i] : s == 3 ? f[i] : s == 4 ? h[i] : m[i]
        printf "%.1f,%.1f ", L + (W - 10 - L) * t[i] / tm, (H - B) - (H - B - 30) * v / ym
      }
      printf "\"/>\n"
    }
    printf "<text x=\"%d\" y=\"40\" fill=\"#1f77b4\">RSS, MiB</text>\n", W - 220
    printf "<text x=\"%d\" y=\"56\" fill=\"#2ca02c\">anonymous RSS, MiB</text>\n", W - 220
    printf "<text x=\"%d\" y=\"72\" fill=\"#d62728\">open fds, thousands</text>\n", W - 220
    printf "<text x=\"%d\" y=\"88\" fill=\"#9467bd\">Rust heap committed (mimalloc), MiB</text>\n", W - 220
    printf "<text x=\"%d\" y=\"104\" fill=\"#8c564b\">C heap in use (SQLite; glibc malloc), MiB</text>\n", W - 220
    printf "</svg>\n"
  }' "$CSV" > "$OUT/soak-$MINUTES-$RUN.svg"
echo "wrote $CSV and $OUT/soak-$MINUTES-$RUN.svg"

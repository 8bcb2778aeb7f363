#!/usr/bin/env bash
# Soak, distributed: the broker (nisshi, or IM_BROKER), `im logic`, `im persist` and
# `im gateway --processes P` (SO_REUSEPORT on one port: this host allows 20,000 open files a
# process) against MariaDB and Redis, holding CONNS WebSockets for MINUTES while 200 pairs send
# 2,000 1:1 messages a second and a 1,000-member group gets 5 messages a second. Every
# SAMPLE_S seconds it samples, per role (the gateway processes summed), RSS, anonymous RSS and
# open fds, and CPU; at the end the harnesses report what was sent, acknowledged and delivered.
# Pass: no errors, every acknowledged message delivered, RSS and fds flat after the warm-up.
# Writes benches/results/soak-dist-<minutes>-<run>.{csv,svg} and the harnesses' output.
#   usage: benches/soak-distributed.sh [MINUTES (60)] [RUN] [SAMPLE_S (60)] [CONNS (100000)]
#   (cargo build --release first); RATE (2000, 1:1 msg/s) and GROUP_RATE (5, group msg/s) set
#   the load: on a 2-core host the broker and every role share two cores, and the issue's load
#   is more than they carry (benches/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-60}"
RUN="${2:-1}"
SAMPLE_S="${3:-60}"
CONNS="${4:-100000}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
IM="$T/im"; BENCH="$T/im-bench"
BROKER="${IM_BROKER:-$HOME/.cache/im-tools/bin/nisshi}"
SECRET=soak-secret
DB=im_soak_distributed
MYSQL="mysql://root@127.0.0.1:3306/$DB"
REDIS_DB=14
REDIS="redis://127.0.0.1:6379/$REDIS_DB"
PAIRS=200
RATE="${RATE:-2000}"
GROUP_RATE="${GROUP_RATE:-5}"
MEMBERS=1000
IDLE=$((CONNS - 2 * PAIRS - MEMBERS))
# Gateway processes: at most 16,000 connections each, under the 20,000 open-file limit.
PROCS=$(((CONNS + 15999) / 16000))
SECS=$((MINUTES * 60))
OUT=benches/results
NAME="soak-dist-$MINUTES-$RUN"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  LOGS="${TMPDIR:-/tmp}/im-soak-dist-logs.$(date -u +%Y%m%dT%H%M%SZ)"
  mkdir -p "$LOGS" && cp "$WORK"/*.log "$LOGS"/ 2>/dev/null && echo "logs: $LOGS" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
start() { # name, command...
  local name=$1; shift
  (RUST_LOG="${RUST_LOG:-warn}" exec "$@" >"$WORK/$name.log" 2>&1) &
  PIDS+=($!)
}
wait_port() { for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

echo "== broker, logic, persist, $PROCS gateway processes; $IDLE idle connections, $PAIRS pairs at $RATE msg/s, a group of $MEMBERS at $GROUP_RATE msg/s, for $MINUTES min"
mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
redis-cli -n $REDIS_DB FLUSHDB >/dev/null
mkdir -p "$WORK/broker"
(cd "$WORK/broker" && exec "$BROKER" broker --listener-url tcp://127.0.0.1:29192 \
   --advertised-listener-url tcp://127.0.0.1:29192 --storage-engine sqlite://broker.db >"$WORK/broker.log" 2>&1) &
BROKER_PID=$!; PIDS+=("$BROKER_PID")
wait_port 29192
K=(--kafka-brokers 127.0.0.1:29192)
start logic "$IM" logic --jwt-secret $SECRET --mysql-url "$MYSQL" --redis-url $REDIS "${K[@]}" --api-listen 127.0.0.1:28180
LOGIC=${PIDS[-1]}
wait_port 28180
start persist "$IM" persist --mysql-url "$MYSQL" "${K[@]}"
PERSIST=${PIDS[-1]}
# The harnesses' receivers never send (no pings): the heartbeat timeout is raised past the
# run; the idle connections ping every 30 s as clients should.
start gateway "$IM" gateway --jwt-secret $SECRET --ws-listen 127.0.0.1:28190 --redis-url $REDIS "${K[@]}" \
  --gateway-id soak-gw --processes "$PROCS" --msgs-per-sec-max 1000 \
  --heartbeat-timeout-ms $(((SECS + 600) * 1000))
GW=${PIDS[-1]}
wait_port 28190
"$BENCH" seed-users --first 10000000 --count $((2 * PAIRS)) | mysql -uroot -h127.0.0.1 "$DB"
"$BENCH" seed-users --first 20000000 --count "$MEMBERS" --group 777 | mysql -uroot -h127.0.0.1 "$DB"
sleep 3 # logic's first rebalance

"$BENCH" hold --addr 127.0.0.1:28190 --secret "$SECRET" --conns "$IDLE" --raw-tcp 0 \
  --per-worker 16000 --user-base 50000000 --hold-secs $((SECS + 120)) > "$OUT/$NAME-hold.txt" 2>&1 &
PIDS+=("$!")
# The supervisor and its gateway processes (with --processes 1 there are none: it is the gateway).
gateway_pids() { echo "$GW $(pgrep -P "$GW" | tr '\n' ' ' || true)"; }
fds_of() { local n=0; for p in "$@"; do n=$((n + $(ls /proc/"$p"/fd 2>/dev/null | wc -l))); done; echo $n; }
for _ in $(seq 300); do
  # shellcheck disable=SC2046
  [ "$(fds_of $(gateway_pids))" -ge "$IDLE" ] && break
  sleep 1
done
"$BENCH" p2p --addr 127.0.0.1:28190 --secret "$SECRET" --pairs "$PAIRS" --rate "$RATE" \
  --secs "$SECS" --user-base 10000000 --json "$OUT/$NAME-p2p.json" > "$OUT/$NAME-p2p.txt" 2>&1 &
P2P=$!; PIDS+=("$P2P")
"$BENCH" fanout --addr 127.0.0.1:28190 --secret "$SECRET" --group 777 --first 20000000 \
  --members "$MEMBERS" --messages $((SECS * GROUP_RATE)) --interval-ms $((1000 / GROUP_RATE)) \
  --json "$OUT/$NAME-fanout.json" > "$OUT/$NAME-fanout.txt" 2>&1 &
FAN=$!; PIDS+=("$FAN")

CSV="$OUT/$NAME.csv"
# Per role: RSS and anonymous RSS in KiB, open fds, CPU seconds (the gateways summed).
echo "seconds,gw_rss_kib,gw_anon_kib,gw_fds,gw_cpu_s,logic_rss_kib,logic_anon_kib,persist_rss_kib,persist_anon_kib,broker_rss_kib,broker_anon_kib,logic_cpu_s,persist_cpu_s,broker_cpu_s" > "$CSV"
TICK=$(getconf CLK_TCK)
mem_of() { # rss,anon summed over pids
  for p in "$@"; do cat /proc/"$p"/status 2>/dev/null; done |
    awk '/^VmRSS/ {r += $2} /^RssAnon/ {a += $2} END {printf "%d,%d", r, a}'
}
cpu_of() { for p in "$@"; do cat /proc/"$p"/stat 2>/dev/null; done | awk -v t="$TICK" '{c += $14 + $15} END {printf "%.1f", c / t}'; }
START=$(date +%s)
while kill -0 "$P2P" 2>/dev/null || kill -0 "$FAN" 2>/dev/null; do
  # shellcheck disable=SC2046
  set -- $(gateway_pids)
  echo "$(( $(date +%s) - START )),$(mem_of "$@"),$(fds_of "$@"),$(cpu_of "$@"),$(mem_of $LOGIC),$(mem_of $PERSIST),$(mem_of $BROKER_PID),$(cpu_of $LOGIC),$(cpu_of $PERSIST),$(cpu_of $BROKER_PID)" >> "$CSV"
  sleep "$SAMPLE_S"
done
wait "$P2P" || true
wait "$FAN" || true

echo "== results"
tail -n 12 "$OUT/$NAME-p2p.txt"
tail -n 8 "$OUT/$NAME-fanout.txt"
echo "rows stored: $(mysql -uroot -h127.0.0.1 -N -e "SELECT COUNT(*) FROM $DB.messages")"
# Growth after warm-up: from the second sample to the last.
awk -F, 'NR == 3 { g0 = $3; f0 = $4; l0 = $7; p0 = $9; b0 = $11 } NR > 1 { g = $3; f = $4; l = $7; p = $9; b = $11; n++ }
  END { if (n >= 3) printf "after warm-up (%d samples), anonymous RSS: gateways %.0f → %.0f MiB (%+.1f %%), logic %.0f → %.0f MiB, persist %.0f → %.0f MiB, broker %.0f → %.0f MiB; gateway fds %d → %d\n",
        n, g0 / 1024, g / 1024, 100 * (g - g0) / g0, l0 / 1024, l / 1024, p0 / 1024, p / 1024, b0 / 1024, b / 1024, f0, f }' "$CSV"

# A plot of anonymous RSS per role (MiB) and gateway fds (thousands) against minutes.
awk -F, -v title="distributed soak, $MINUTES min ($CONNS connections over $PROCS gateway processes)" '
  BEGIN { n = 0 }
  NR > 1 { t[n] = $1 / 60; v[1, n] = $3 / 1024; v[2, n] = $7 / 1024; v[3, n] = $9 / 1024; v[4, n] = $11 / 1024; v[5, n] = $4 / 1000
           for (s = 1; s <= 5; s++) if (v[s, n] > ym) ym = v[s, n]; if (t[n] > tm) tm = t[n]; n++ }
  END {
    W = 720; H = 360; L = 60; B = 40; if (tm == 0) tm = 1; ym = ym * 1.2; if (ym < 25) ym = 25
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
    printf "<text x=\"%d\" y=\"18\">%s</text>\n", L, title
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, H - B, W - 10, H - B
    printf "<line x1=\"%d\" y1=\"30\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, L, H - B
    printf "<text x=\"%d\" y=\"%d\">minutes (0 – %.1f)</text>\n", W / 2, H - 8, tm
    printf "<text x=\"4\" y=\"40\">%.0f</text><text x=\"4\" y=\"%d\">0</text>\n", ym, H - B
    split("#1f77b4 #2ca02c #d62728 #9467bd #8c564b", colour, " ")
    split("gateways: anonymous RSS, MiB|logic: anonymous RSS, MiB|persist: anonymous RSS, MiB|broker: anonymous RSS, MiB|gateway fds, thousands", label, "|")
    for (s = 1; s <= 5; s++) {
      printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", colour[s]
      for (i = 0; i < n; i++) printf "%.1f,%.1f ", L + (W - 10 - L) * t[i] / tm, (H - B) - (H - B - 30) * v[s, i] / ym
      printf "\"/>\n"
      printf "<text x=\"%d\" y=\"%d\" fill=\"%s\">%s</text>\n", W - 240, 24 + 16 * s, colour[s], label[s]
    }
    printf "</svg>\n"
  }' "$CSV" > "$OUT/$NAME.svg"
echo "wrote $CSV and $OUT/$NAME.svg"

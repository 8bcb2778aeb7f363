#!/usr/bin/env bash
# Login memory: `im standalone` (release build) takes N concurrent logins (default 64) with the
# right password; each is an argon2id check at the default cost (19 MiB). Prints the process's
# RSS before, at its peak while the logins run (sampled every 20 ms) and after, and how long
# the burst took. Each login names its own client address (X-Forwarded-For, with
# --trusted-proxy 127.0.0.1 where the build has it), so throttling does not cut the burst
# short: this measures the bound on concurrent argon2 work.
#   usage: benches/login-memory.sh [N (64)]   (cargo build --release first)
#   IM_BIN=DIR: take `im` from DIR (an A/B run against another build).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-64}"
T="${IM_BIN:-${CARGO_TARGET_DIR:-target}/release}"
DATA="$(mktemp -d)"
IM=
cleanup() {
  [ -n "$IM" ] && kill "$IM" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
API=127.0.0.1:28380
PROXY=()
"$T/im" standalone --help | grep -q -- --trusted-proxy && PROXY=(--trusted-proxy 127.0.0.1)
RUST_LOG=warn "$T/im" standalone --data-dir "$DATA" --jwt-secret login-memory \
  --ws-listen 127.0.0.1:28390 --api-listen "$API" "${PROXY[@]}" > "$DATA/im.log" 2>&1 &
IM=$!
for _ in $(seq 100); do curl -sf "http://$API/healthz" >/dev/null && break; sleep 0.1; done
body='{"username":"memory","password":"a long enough password"}'
curl -sf -H 'content-type: application/json' -d "$body" "http://$API/api/v1/users/register" >/dev/null
rss() { awk '/^VmRSS/ {print $2}' "/proc/$IM/status"; }
sleep 0.5
before=$(rss)
peak=$before
start=$(date +%s.%N)
codes="$DATA/codes"
pids=()
for i in $(seq "$N"); do
  curl -s -o /dev/null -w '%{http_code}\n' -H 'content-type: application/json' -d "$body" \
    -H "X-Forwarded-For: 198.51.$((i / 250)).$((i % 250 + 1))" \
    "http://$API/api/v1/auth/login" >> "$codes" &
  pids+=($!)
done
running() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running; do
  r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  sleep 0.02
done
wait "${pids[@]}" 2>/dev/null || true
took=$(echo "$(date +%s.%N) - $start" | bc)
sleep 1
after=$(rss)
echo "logins: $N concurrent, answers: $(sort "$codes" | uniq -c | tr -s ' ' | tr '\n' ';')"
echo "rss before ${before} KiB, peak ${peak} KiB (+$(( (peak - before) / 1024 )) MiB), 1 s after ${after} KiB; burst took ${took} s"

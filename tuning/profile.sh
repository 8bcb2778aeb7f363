#!/usr/bin/env bash
# Records where a running gateway spends its CPU and renders a flamegraph SVG.
#
#   tuning/profile.sh --pid PID [--secs 30] [--freq 499] [--out DIR] [-- LOAD COMMAND...]
#
# With a load command (for example an `im-bench fanout` run), perf records for as long as the
# command runs; without one, for --secs. Stacks are unwound with DWARF (the release profile
# keeps line tables; Rust code has no frame pointers by default). Needs perf (Debian:
# linux-perf) and root or kernel.perf_event_paranoid <= 1; the `inferno` tools are installed
# once into ~/.cache/im-tools. Prints where the SVG is.
set -euo pipefail
INFERNO_VERSION=0.12.8
TOOLS="${IM_TOOLS:-$HOME/.cache/im-tools}"
pid="" secs=30 freq=499 out="benches/results"
while [ $# -gt 0 ]; do
  case "$1" in
    --pid) pid="$2"; shift 2 ;;
    --secs) secs="$2"; shift 2 ;;
    --freq) freq="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$pid" ] || { echo "--pid PID of the gateway to profile is required" >&2; exit 2; }
kill -0 "$pid" 2>/dev/null || { echo "no process $pid" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is missing (Debian: apt-get install linux-perf)" >&2; exit 1; }
# inferno's tools print no version: a stamp file records which one is installed.
if [ ! -x "$TOOLS/bin/inferno-flamegraph" ] || [ "$(cat "$TOOLS/.inferno-version" 2>/dev/null)" != "$INFERNO_VERSION" ]; then
  echo "installing inferno $INFERNO_VERSION into $TOOLS (once)"
  CARGO_TARGET_DIR="$TOOLS/target" cargo install inferno --version "$INFERNO_VERSION" --locked --root "$TOOLS" >&2
  echo "$INFERNO_VERSION" > "$TOOLS/.inferno-version"
fi
mkdir -p "$out"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
data="$(mktemp -d)/perf.data"
svg="$out/flamegraph-$stamp.svg"

perf record -F "$freq" -e cpu-clock --call-graph dwarf,16384 -p "$pid" -o "$data" -- sleep "$secs" \
  2> >(grep -v '^\[ perf record' >&2) &
perf_pid=$!
if [ $# -gt 0 ]; then
  # The load runs while perf records; perf stops when it ends (or after --secs, if sooner).
  "$@" || echo "the load command exited with $?" >&2
  kill -INT "$perf_pid" 2>/dev/null || true
fi
wait "$perf_pid" || true
comm="$(cat /proc/"$pid"/comm 2>/dev/null || echo gateway)"
perf script -i "$data" 2>/dev/null \
  | "$TOOLS/bin/inferno-collapse-perf" \
  | "$TOOLS/bin/inferno-flamegraph" --title "$comm (pid $pid), $stamp" > "$svg"
rm -rf "$(dirname "$data")"
echo "flamegraph: $svg"

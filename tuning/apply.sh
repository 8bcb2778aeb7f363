#!/usr/bin/env bash
# Applies ../sysctl.conf and says what changed and what could not; keeps the values it replaced
# so that `tuning/apply.sh --revert` puts them back. Also reports the open-file limits, which
# sysctl cannot change for a process: a container or VM without CAP_SYS_RESOURCE keeps its
# hard limit (20,000 on the development machines), and connections must then be spread over
# processes (`im gateway --processes N`, the harness's workers).
#
#   tuning/apply.sh            apply (root)
#   tuning/apply.sh --revert   restore what the last apply replaced
#   tuning/apply.sh --check    only print current vs wanted, change nothing
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf="${IM_SYSCTL_CONF:-$here/../sysctl.conf}"
state="${IM_SYSCTL_STATE:-/var/tmp/im-sysctl.revert}"
mode="${1:-apply}"

key_path() { echo "/proc/sys/${1//.//}"; }
current() { tr -s '\t ' ' ' < "$(key_path "$1")" 2>/dev/null; }

if [ "$mode" = "--revert" ]; then
  [ -f "$state" ] || { echo "nothing to revert: $state does not exist" >&2; exit 1; }
  while IFS='=' read -r key value; do
    [ -n "$key" ] || continue
    if sysctl -q -w "$key=$value" >/dev/null 2>&1; then
      echo "restored  $key = $value"
    else
      echo "could not restore $key = $value" >&2
    fi
  done < "$state"
  rm -f "$state"
  exit 0
fi

changed=0 failed=0 same=0
new_state=""
while IFS= read -r line; do
  line="${line%%#*}"
  [[ "$line" =~ ^[[:space:]]*$ ]] && continue
  key="$(echo "${line%%=*}" | xargs)"
  want="$(echo "${line#*=}" | xargs)"
  path="$(key_path "$key")"
  if [ ! -e "$path" ]; then
    echo "absent    $key (this kernel or namespace has no such setting)"
    continue
  fi
  have="$(current "$key" | xargs)"
  if [ "$have" = "$want" ]; then
    same=$((same + 1))
    continue
  fi
  if [ "$mode" = "--check" ]; then
    echo "differs   $key: $have (wanted $want)"
    continue
  fi
  if err="$(sysctl -q -w "$key=$want" 2>&1)"; then
    echo "changed   $key: $have -> $want"
    new_state+="$key=$have"$'\n'
    changed=$((changed + 1))
  else
    echo "FAILED    $key: stays $have (wanted $want): ${err:-not permitted}"
    failed=$((failed + 1))
  fi
done < "$conf"

# Keep the oldest values across repeated applies: the first apply's originals are the
# machine's own.
if [ -n "$new_state" ]; then
  if [ -f "$state" ]; then
    printf '%s' "$new_state" | while IFS='=' read -r k v; do
      grep -q "^$k=" "$state" || echo "$k=$v" >> "$state"
    done
  else
    printf '%s' "$new_state" > "$state"
  fi
fi

soft="$(ulimit -Sn)" hard="$(ulimit -Hn)"
nr_open="$(cat /proc/sys/fs/nr_open)"
echo "open files: soft $soft, hard $hard, fs.nr_open $nr_open"
if [ "$hard" != "unlimited" ] && [ "$hard" -lt "$nr_open" ]; then
  if prlimit --pid $$ --nofile="$nr_open:$nr_open" 2>/dev/null; then
    echo "  this shell's hard limit can be raised to $nr_open (root with CAP_SYS_RESOURCE):"
    echo "  use LimitNOFILE in the systemd unit (tuning/im-gateway.service) or ulimit -n"
  else
    echo "  the hard limit $hard cannot be raised here (no CAP_SYS_RESOURCE, e.g. a container):"
    echo "  one process holds at most $hard connections; run \`im gateway --processes N\`"
  fi
fi
[ "$mode" = "--check" ] || echo "$changed changed, $same already set, $failed failed; revert with $0 --revert"
[ "$failed" -eq 0 ]

# Sourced by the benchmark scripts that need the distributed services behind their gateways:
# starts a nisshi broker, `im logic` and `im persist` (from $T), each on the caller's ports,
# with a fresh MariaDB database and Redis database, and stops them (and any pid the caller
# adds to PIDS) on exit. The caller sets, before sourcing:
#   T (the directory of the release binaries), SECRET, DB (a MariaDB database name),
#   REDIS_DB (a Redis database number), BROKER_PORT, API_PORT.
# Afterwards: WORK (a scratch directory), PIDS, K (the --kafka-brokers flag), MYSQL, REDIS,
# wait_port PORT.
BROKER="${IM_BROKER:-$HOME/.cache/im-tools/bin/nisshi}"
REDIS="redis://127.0.0.1:6379/$REDIS_DB"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB" || true
}
trap cleanup EXIT
wait_port() { for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
mysql -uroot -h127.0.0.1 -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
redis-cli -n "$REDIS_DB" FLUSHDB >/dev/null
mkdir -p "$WORK/broker"
(cd "$WORK/broker" && exec "$BROKER" broker --listener-url tcp://127.0.0.1:"$BROKER_PORT" \
   --advertised-listener-url tcp://127.0.0.1:"$BROKER_PORT" --storage-engine sqlite://broker.db >"$WORK/broker.log" 2>&1) &
PIDS+=($!)
wait_port "$BROKER_PORT"
"$(dirname "${BASH_SOURCE[0]}")"/nisshi-header-index.sh "$WORK/broker/broker.db"
K=(--kafka-brokers 127.0.0.1:"$BROKER_PORT")
MYSQL="mysql://root@127.0.0.1:3306/$DB"
(RUST_LOG=warn "$T/im" logic --jwt-secret "$SECRET" --mysql-url "$MYSQL" --redis-url "$REDIS" "${K[@]}" \
   --api-listen 127.0.0.1:"$API_PORT" >"$WORK/logic.log" 2>&1) &
PIDS+=($!)
wait_port "$API_PORT"
(RUST_LOG=warn "$T/im" persist --mysql-url "$MYSQL" "${K[@]}" >"$WORK/persist.log" 2>&1) &
PIDS+=($!)
sleep 3

#!/usr/bin/env bash
# Indexes record headers in a running nisshi broker's SQLite storage (the file given).
# nisshi 0.6.0 keeps headers in a table of their own with no index, and reads a fetched
# record's headers with a query that walks that whole table, for every record, headers or
# not: once traced records (a `traceparent` header each) accumulate, every fetch slows with
# them (im-bench broker-probe --traceparent: 1,000 records/s offered, 315/s through three hops
# and a 3-hop p50 of 8.3 s, against 998/s and 34 ms without headers; with this index 1,002/s
# and 42 ms). Kafka keeps headers inside the record batch; this is for the test broker only.
#   usage: benches/nisshi-header-index.sh BROKER.DB
set -euo pipefail
python3 - "$1" <<'PY'
import sqlite3, sys, time
for _ in range(100):
    try:
        c = sqlite3.connect(sys.argv[1], timeout=10)
        c.execute("create index if not exists im_header_record on header(topition, offset_id)")
        c.commit()
        break
    except sqlite3.OperationalError:
        time.sleep(0.1)  # the broker has not created its tables yet
else:
    sys.exit(f"could not index the headers of {sys.argv[1]}")
PY

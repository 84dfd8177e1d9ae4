#!/usr/bin/env bash
# bench/workers_callgrind.sh: instructions per GET /plaintext for squalld with workers = 1 and
# workers = 2, counted by callgrind (repeatable on a busy machine, unlike CPU time). Each
# configuration runs twice under callgrind: with REQUESTS keep-alive requests (over
# CONNECTIONS connections) and with none; the difference divided by REQUESTS is the cost of one
# request, start-up and shutdown excluded. All threads are counted.
#
# Usage:  bench/workers_callgrind.sh   Environment: SQUALLD, REQUESTS [4000], CONNECTIONS [8]
set -euo pipefail
bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
REQUESTS=${REQUESTS:-4000}
CONNECTIONS=${CONNECTIONS:-8}
work_dir=$(mktemp -d)
trap 'rm -rf "$work_dir"' EXIT

# Total instructions of one run of squalld with `workers` workers answering `count` requests.
instructions() {
  local workers=$1 count=$2 pid port
  sed -e "s|^\[server\]|[server]\nworkers = $workers|" "$bench_dir/squalld-bench.toml" \
    >"$work_dir/squalld.toml"
  rm -f "$work_dir/port" "$work_dir"/callgrind.out.*
  valgrind --tool=callgrind --callgrind-out-file="$work_dir/callgrind.out.%p" \
    "$SQUALLD" --config "$work_dir/squalld.toml" --listen 127.0.0.1:0 \
    --port-file "$work_dir/port" 2>"$work_dir/valgrind.log" &
  pid=$!
  for _ in $(seq 1 600); do [[ -s $work_dir/port ]] && break; sleep 0.1; done
  port=$(sed 's/.*://' "$work_dir/port")
  sleep 1
  python3 - "$port" "$count" "$CONNECTIONS" <<'PY'
import socket, sys
port, count, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
request = b"GET /plaintext HTTP/1.1\r\nHost: a\r\n\r\n"
for i in range(count):
    s = socks[i % conns]
    s.sendall(request)
    data = b""
    while not data.endswith(b"Hello, World!"):
        chunk = s.recv(4096)
        assert chunk, "closed"
        data += chunk
for s in socks:
    s.close()
PY
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/^summary:|^totals:/ {print $2; exit}' "$work_dir"/callgrind.out.*
}

{
  echo "| workers | instructions per request |"
  echo "|---|---|"
  for workers in 1 2; do
    with=$(instructions "$workers" "$REQUESTS")
    without=$(instructions "$workers" 0)
    echo "| $workers | $(( (with - without) / REQUESTS )) |"
  done
  echo
  echo "command: REQUESTS=$REQUESTS CONNECTIONS=$CONNECTIONS $0"
} | tee "$bench_dir/out/workers-callgrind.md"

#!/usr/bin/env bash
# bench/workers.sh: squalld with [server] workers = 1 and 2, and nginx with worker_processes 2,
# side by side under wrk, GET /plaintext over keep-alive connections, in one run.
#
# Nothing is pinned: the servers and wrk share every CPU of the machine (on the 2-core test
# machine, wrk takes a large part of them, so 2 workers cannot show a 2x gain; see
# bench/RESULTS.md). For each round (servers interleaved, order rotated) wrk runs for DURATION;
# the report gives the median over ROUNDS of requests/s, p99 latency, the server's CPU time per
# request (utime+stime of all its processes and threads, from /proc) and wrk's own CPU.
#
# Usage:  bench/workers.sh            (after `make build/squalld`)
# Environment: SQUALLD [build/squalld], DURATION [5s], ROUNDS [3], CONNECTIONS [100],
#              THREADS (wrk) [2], NGINX [/usr/sbin/nginx], WRK [wrk], OUT_DIR [bench/out]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-100}
THREADS=${THREADS:-2}
NGINX=${NGINX:-/usr/sbin/nginx}
WRK=${WRK:-wrk}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
SERVERS=(squalld-1 squalld-2 nginx-2)

log() { printf '%s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"

work_dir=$(mktemp -d)
server_pid=""
server_port=""
client_pid=""
cleanup() {
  [[ -n $client_pid ]] && kill "$client_pid" 2>/dev/null || true
  [[ -n $server_pid ]] && stop_server || true
  rm -rf "$work_dir"
}
trap cleanup EXIT
mkdir -p "$OUT_DIR"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 i
  for i in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  die "nothing listens on port $port"
}

# Starts server $1; sets server_pid and server_port (not in a subshell: the pid must stay known).
start_server() {
  local name=$1 port
  port=$(free_port)
  case $name in
    squalld-*)
      local workers=${name#squalld-}
      sed -e "s|^\[server\]|[server]\nworkers = $workers\nlisten = [\"127.0.0.1:$port\"]|" \
        "$bench_dir/squalld-bench.toml" >"$work_dir/squalld.toml"
      (cd "$work_dir" && exec "$SQUALLD" --config "$work_dir/squalld.toml" \
        >"$work_dir/$name.log" 2>&1) &
      server_pid=$!
      ;;
    nginx-2)
      mkdir -p "$work_dir/nginx"
      # Two worker processes under a master, each with its own SO_REUSEPORT socket, as squalld.
      sed -e "s|@PREFIX@|$work_dir/nginx|g" -e "s|@PORT@|$port reuseport|g" \
        -e 's|^worker_processes 1;|worker_processes 2;|' -e 's|^master_process off;|master_process on;|' \
        "$bench_dir/nginx.conf.template" >"$work_dir/nginx/nginx.conf"
      "$NGINX" -p "$work_dir/nginx/" -e "$work_dir/nginx/error.log" -c "$work_dir/nginx/nginx.conf" \
        >"$work_dir/nginx.log" 2>&1 &
      server_pid=$!
      ;;
  esac
  wait_port "$port"
  sleep 0.3  # nginx's workers, squalld's worker threads
  server_port=$port
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

declare -A results
for round in $(seq 1 "$ROUNDS"); do
  order=("${SERVERS[@]:$(( (round - 1) % 3 ))}" "${SERVERS[@]:0:$(( (round - 1) % 3 ))}")
  for name in "${order[@]}"; do
    start_server "$name"
    port=$server_port
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d1s "http://127.0.0.1:$port/plaintext" >/dev/null
    before=$(cpu_ticks "$server_pid")
    run_client "$work_dir/wrk.out" "$work_dir/wrk.out" "$work_dir/wrk.time" \
      "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$port/plaintext"
    after=$(cpu_ticks "$server_pid")
    stop_server
    cp "$work_dir/wrk.out" "$OUT_DIR/workers-$name-$round.txt"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$work_dir/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$work_dir/wrk.out")
    requests=$(awk '/requests in/ {print $1}' "$work_dir/wrk.out")
    client_cpu=$(awk '{print $1 + $2}' "$work_dir/wrk.time")
    ticks=$((after - before))
    tick_hz=$(getconf CLK_TCK)
    us_per_request=$(awk -v t="$ticks" -v hz="$tick_hz" -v r="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / r}')
    results[$name,$round]="$rps $p99 $us_per_request $client_cpu"
    log "round $round $name: $rps req/s, p99 $p99, server ${us_per_request} us CPU/request, wrk ${client_cpu}s CPU"
  done
done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
{
  echo "| server | requests/s | p99 | server CPU us/request | wrk CPU s |"
  echo "|---|---|---|---|---|"
  for name in "${SERVERS[@]}"; do
    declare -a col=()
    for field in 1 2 3 4; do
      col[field]=$(for round in $(seq 1 "$ROUNDS"); do
        echo "${results[$name,$round]}" | awk -v f="$field" '{print $f}'
      done | sed 's/ms$//; s/us$/e-3/' | median)
    done
    echo "| $name | ${col[1]} | ${col[2]} ms | ${col[3]} | ${col[4]} |"
  done
  echo
  echo "command: DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS THREADS=$THREADS $0"
  echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
} | tee "$OUT_DIR/workers.md"

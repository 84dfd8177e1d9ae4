#!/usr/bin/env bash
# bench/plaintext_coroutine.sh: server CPU per request of the coroutine handler forms against the
# same answer from a callback handler, same server process, same run
# (bench/plaintext_coroutine.cpp: /callback, /coroutine a Task<void>, /response a Task<Response>).
#
# The server runs pinned to SERVER_CPU, wrk to CLIENT_CPU. Each round runs wrk against every
# route of ROUTES (the order rotates between rounds) and reads the server's CPU ticks around each
# run; the report gives medians over ROUNDS of requests/s and server CPU microseconds per request,
# and each coroutine form's ratio to the callback of the latter.
#
# The server is built here (c++ against build/libsquall.a), not by `make all`.
#
# Usage:  bench/plaintext_coroutine.sh
# Environment (defaults in brackets): DURATION [10] seconds per run, ROUNDS [3],
#   CONNECTIONS [100], SERVER_CPU [0], CLIENT_CPU [1], BUILD [build], OUT_DIR [bench/out],
#   ROUTES ["callback coroutine response"]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-100}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BUILD=${BUILD:-build}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
read -r -a routes <<<"${ROUTES:-callback coroutine response}"

log() { printf 'plaintext_coroutine: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
. "$bench_dir/common.sh"

bin_dir=$OUT_DIR/bin
mkdir -p "$bin_dir"
log "building"
make -C "$repo_dir" --no-print-directory "$BUILD/libsquall.a" >&2
pkgs="libuv spdlog fmt tomlplusplus libcurl sqlite3 libsystemd"
# shellcheck disable=SC2046
c++ -O2 -std=c++20 -Wall -Werror -pthread -I"$repo_dir/include" -I"$repo_dir/lib" $(pkg-config --cflags $pkgs) \
  -o "$bin_dir/plaintext_coroutine" "$bench_dir/plaintext_coroutine.cpp" \
  "$repo_dir/$BUILD/libsquall.a" $(pkg-config --libs $pkgs)

server_pid=""
cleanup() { [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

port_file=$OUT_DIR/plaintext_coroutine.port
: >"$port_file"
taskset -c "$SERVER_CPU" "$bin_dir/plaintext_coroutine" 0 >"$port_file" \
  2>"$OUT_DIR/plaintext_coroutine.err" &
server_pid=$!
for _ in $(seq 100); do port_from_file "$port_file" >/dev/null && break; sleep 0.05; done
port=$(port_from_file "$port_file") || die "the server did not print its address"

results=$OUT_DIR/plaintext_coroutine_results.txt
: >"$results"
for ((round = 1; round <= ROUNDS; round++)); do
  shift_by=$(((round - 1) % ${#routes[@]}))
  order=("${routes[@]:shift_by}" "${routes[@]:0:shift_by}")
  for route in "${order[@]}"; do
    ticks_before=$(cpu_ticks "$server_pid")
    output=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
      "http://127.0.0.1:$port/$route")
    ticks_after=$(cpu_ticks "$server_pid")
    requests=$(awk '/requests in/ {print $1}' <<<"$output")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$output")
    [[ -z $non2xx ]] || die "$route: $non2xx answers were not 2xx"
    log "round $round $route: $requests requests, $((ticks_after - ticks_before)) CPU ticks"
    echo "$route $round $requests $((ticks_after - ticks_before))" >>"$results"
  done
done

report=$OUT_DIR/plaintext_coroutine.md
/usr/bin/python3 - "$results" "$(getconf CLK_TCK)" "$DURATION" "$CONNECTIONS" "$ROUNDS" \
  >"$report" <<'PY'
import statistics, sys
path, tck, duration, connections, rounds = sys.argv[1:]
rows = {}
for line in open(path):
    route, _, requests, ticks = line.split()
    rows.setdefault(route, []).append((int(requests), int(ticks) / int(tck)))
print(f"| handler | requests/s (median of {rounds}) | server CPU us/request (median) | rounds us/request |")
print("|---|--:|--:|---|")
cpu = {}
for route in [r for r in ("callback", "coroutine", "response") if r in rows]:
    values = rows[route]
    rate = statistics.median(r / float(duration) for r, _ in values)
    per = [c * 1e6 / r for r, c in values]
    cpu[route] = statistics.median(per)
    each = ", ".join(f"{p:.2f}" for p in per)
    print(f"| {route} | {rate:,.0f} | {cpu[route]:.2f} | {each} |")
for route in [r for r in cpu if r != "callback"]:
    print(f"\n{route} / callback server CPU per request: {cpu[route] / cpu['callback']:.3f}")
print(f"\nwrk -t1 -c{connections} -d{duration}s, {rounds} rounds, one server process for both.")
PY
cat "$report"

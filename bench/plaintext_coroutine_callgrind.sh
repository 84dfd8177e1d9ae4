#!/usr/bin/env bash
# bench/plaintext_coroutine_callgrind.sh: instructions per request of the three handler forms of
# bench/plaintext_coroutine.cpp (a callback, a Task<void> coroutine, a Task<Response> coroutine)
# under valgrind's callgrind. Unlike CPU time, these counts repeat from run to
# run on a shared, noisy machine.
#
# After a warm-up of every route, for each route: the counters are zeroed (callgrind_control -z),
# wrk sends GET /<route> for DURATION, the counters are dumped (-d), and the instructions (Ir,
# user space only) are divided by the responses wrk received. Prints one line per route and the
# ratio of each coroutine form to the callback. With FUNCTIONS=1 it also prints, per route, the
# functions with the most inclusive instructions (callgrind_annotate), to see where they go.
#
# Usage:  bench/plaintext_coroutine_callgrind.sh
# Environment (defaults in brackets): ROUTES ["callback coroutine response"], DURATION [5s],
#   CONNECTIONS [10], BUILD [build], OUT_DIR [bench/out], FUNCTIONS [0]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
ROUTES=${ROUTES:-callback coroutine response}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-10}
BUILD=${BUILD:-build}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
FUNCTIONS=${FUNCTIONS:-0}
WRK=${WRK:-wrk}

log() { printf 'plaintext_coroutine_callgrind: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
. "$bench_dir/common.sh"

for program in valgrind callgrind_control callgrind_annotate "$WRK" curl pkg-config; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install valgrind wrk curl)"
done

bin_dir=$OUT_DIR/bin
mkdir -p "$bin_dir"
log "building"
make -C "$repo_dir" --no-print-directory "$BUILD/libsquall.a" >&2
pkgs="libuv spdlog fmt tomlplusplus libcurl sqlite3 libsystemd"
# shellcheck disable=SC2046
c++ -O2 -g -std=c++20 -Wall -Werror -pthread -I"$repo_dir/include" -I"$repo_dir/lib" \
  $(pkg-config --cflags $pkgs) -o "$bin_dir/plaintext_coroutine" \
  "$bench_dir/plaintext_coroutine.cpp" "$repo_dir/$BUILD/libsquall.a" $(pkg-config --libs $pkgs)

make_work_dir coroutine-callgrind

# One server process per route, with its route registered first (the router scans in order), so
# the routes differ only in their handler form.
declare -A per_request=()
for route in $ROUTES; do
  port_file=$work_dir/port.$route
  valgrind --tool=callgrind --callgrind-out-file="$work_dir/cg.%p" \
    "$bin_dir/plaintext_coroutine" 0 "$route" >"$port_file" 2>"$work_dir/server.$route.log" &
  server_pid=$!
  port=""
  for ((tries = 0; tries < 300; tries++)); do
    port=$(port_from_file "$port_file") && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $port ]] || die "the server wrote no port (see $work_dir/server.$route.log)"
  url="http://127.0.0.1:$port/$route"
  for ((tries = 0; tries < 100; tries++)); do
    curl -sf -o /dev/null --max-time 5 "$url" && break
    sleep 0.1
  done
  "$WRK" -t1 -c"$CONNECTIONS" -d1s "$url" >/dev/null  # Warm-up: pools and caches filled.
  output=$work_dir/wrk.$route.txt
  callgrind_wrk "$server_pid" "$work_dir/cg" "$output" -t1 -c"$CONNECTIONS" -d"$DURATION" "$url"
  ! grep -q Non-2xx "$output" || die "/$route: some answers were not 2xx"
  per_request[$route]=$((callgrind_instructions / callgrind_requests))
  printf '%-10s %12s instructions / %8s requests = %6s per request\n' "$route" \
    "$callgrind_instructions" "$callgrind_requests" "${per_request[$route]}"
  if [[ $FUNCTIONS == 1 ]]; then
    callgrind_annotate --inclusive=yes --threshold=99 "$callgrind_dump" 2>/dev/null |
      awk -v r="$callgrind_requests" '/^ *[0-9,]+ \(/ { n = $1; gsub(",", "", n); printf "  %8.0f  %s\n", n / r, $0 }' |
      head -n "${FUNCTION_LINES:-60}"
  fi
  rm -f "$callgrind_dump" "$work_dir"/cg.*
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done

for route in $ROUTES; do
  [[ $route == callback || -z ${per_request[callback]:-} ]] && continue
  awk -v a="${per_request[$route]}" -v b="${per_request[callback]}" -v r="$route" \
    'BEGIN { printf "%s / callback = %.3fx instructions per request\n", r, a / b }'
done

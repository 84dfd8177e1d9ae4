#!/usr/bin/env bash
# bench/tcp_echo.sh: squall's TCP echo servers against a minimal C libuv echo server, in one run;
# then memory per sleeping task.
#
# Servers: c-libuv (bench/tcp_echo_uv.c), squall-bytes (bench/tcp_echo_squall.cpp: read_some +
# write, the same work as the C server) and squall-lines (examples/tcp_echo_server.cpp, Tornado's
# line echo: read_until + write). The load generator (bench/tcp_echo_load.c, epoll) keeps
# CONNECTIONS connections, each sending a MESSAGE-byte line and waiting for its echo before the
# next. Each server runs pinned to SERVER_CPU, the load to CLIENT_CPU; servers are interleaved and
# their order rotated each round; the report gives medians over ROUNDS of bytes/s and server CPU
# per MB, and each squall server's ratio to the C server. Then bench/sleeping_tasks.cpp spawns
# SLEEPING_TASKS tasks asleep in squall::sleep and reports the memory each costs.
#
# The C programs and the squall servers are built here (cc and c++ against build/libsquall.a),
# not by `make all`.
#
# Usage:  bench/tcp_echo.sh
# Environment (defaults in brackets): DURATION [10] seconds per run, ROUNDS [3],
#   CONNECTIONS [100], MESSAGE [4096] bytes, SERVERS ["c-libuv squall-bytes squall-lines"],
#   SERVER_CPU [0], CLIENT_CPU [1], SLEEPING_TASKS [100000] (0 skips it),
#   BUILD [build], OUT_DIR [bench/out]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-100}
MESSAGE=${MESSAGE:-4096}
SERVERS=${SERVERS:-c-libuv squall-bytes squall-lines}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SLEEPING_TASKS=${SLEEPING_TASKS:-100000}
BUILD=${BUILD:-build}
OUT_DIR=${OUT_DIR:-$bench_dir/out}

log() { printf 'tcp_echo: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
. "$bench_dir/common.sh"

bin_dir=$OUT_DIR/bin
mkdir -p "$bin_dir"
log "building"
make -C "$repo_dir" --no-print-directory "$BUILD/libsquall.a" "$BUILD/examples/tcp_echo_server" >&2
pkgs="libuv spdlog fmt tomlplusplus libcurl sqlite3 libsystemd"
cc -O2 -Wall -Werror -o "$bin_dir/tcp_echo_uv" "$bench_dir/tcp_echo_uv.c" \
  $(pkg-config --cflags --libs libuv)
cc -O2 -Wall -Werror -o "$bin_dir/tcp_echo_load" "$bench_dir/tcp_echo_load.c"
for program in tcp_echo_squall sleeping_tasks; do
  # shellcheck disable=SC2046
  c++ -O2 -std=c++20 -Wall -Werror -pthread -I"$repo_dir/include" -I"$repo_dir/lib" $(pkg-config --cflags $pkgs) \
    -o "$bin_dir/$program" "$bench_dir/$program.cpp" "$repo_dir/$BUILD/libsquall.a" \
    $(pkg-config --libs $pkgs)
done

server_command() {
  case $1 in
    c-libuv) echo "$bin_dir/tcp_echo_uv" ;;
    squall-bytes) echo "$bin_dir/tcp_echo_squall" ;;
    squall-lines) echo "$repo_dir/$BUILD/examples/tcp_echo_server" ;;
    *) die "unknown server $1" ;;
  esac
}

server_pid=""
cleanup() { [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

results=$OUT_DIR/tcp_echo_results.txt
: >"$results"
read -ra servers <<<"$SERVERS"
for ((round = 1; round <= ROUNDS; round++)); do
  # Rotate the order each round.
  shift_by=$(((round - 1) % ${#servers[@]}))
  order=("${servers[@]:shift_by}" "${servers[@]:0:shift_by}")
  for server in "${order[@]}"; do
    port_file=$OUT_DIR/$server.port
    : >"$port_file"
    taskset -c "$SERVER_CPU" $(server_command "$server") 0 >"$port_file" 2>"$OUT_DIR/$server.err" &
    server_pid=$!
    for _ in $(seq 100); do port_from_file "$port_file" >/dev/null && break; sleep 0.05; done
    port=$(port_from_file "$port_file") || die "$server did not print its address"
    ticks_before=$(cpu_ticks "$server_pid")
    output=$(taskset -c "$CLIENT_CPU" "$bin_dir/tcp_echo_load" 127.0.0.1 "$port" \
      "$CONNECTIONS" "$MESSAGE" "$DURATION")
    ticks_after=$(cpu_ticks "$server_pid")
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    bytes=$(awk '{print $2}' <<<"$output")
    log "round $round $server: $output, $((ticks_after - ticks_before)) CPU ticks"
    echo "$server $round $bytes $((ticks_after - ticks_before))" >>"$results"
  done
done

ticks_per_second=$(getconf CLK_TCK)
report=$OUT_DIR/tcp_echo.md
/usr/bin/python3 - "$results" "$ticks_per_second" "$DURATION" "$CONNECTIONS" "$MESSAGE" \
  "$ROUNDS" >"$report" <<'PY'
import statistics, sys
path, tck, duration, connections, message, rounds = sys.argv[1:]
rows = {}
for line in open(path):
    server, _, rate, ticks = line.split()
    rows.setdefault(server, []).append((float(rate), int(ticks) / int(tck)))
print(f"| server | MB/s (median of {rounds}) | server CPU ms per MB | rounds MB/s | vs c-libuv |")
print("|---|--:|--:|---|--:|")
base = statistics.median(r for r, _ in rows["c-libuv"]) if "c-libuv" in rows else None
for server, values in rows.items():
    rate = statistics.median(r for r, _ in values)
    cpu = statistics.median(c * 1000 / (r * float(duration) / 1e6) for r, c in values)
    each = ", ".join(f"{r / 1e6:.1f}" for r, _ in values)
    ratio = f"{rate / base:.2f}x" if base else "-"
    print(f"| {server} | {rate / 1e6:.1f} | {cpu:.2f} | {each} | {ratio} |")
print(f"\n{connections} connections, {message}-byte messages, {duration} s per run.")
PY
if ((SLEEPING_TASKS > 0)); then
  echo >>"$report"
  echo "Sleeping tasks: $("$bin_dir/sleeping_tasks" "$SLEEPING_TASKS")" >>"$report"
fi
cat "$report"

#!/usr/bin/env bash
# bench/callgrind.sh: instructions per request of squalld and of the bare libuv loop
# (bench/bare_http_uv.c), counted by valgrind's callgrind: unlike CPU time these counts repeat
# from run to run on a shared, noisy machine.
#
# Each server runs under callgrind; after a warm-up its counters are zeroed (callgrind_control
# -z), wrk sends GET /plaintext for DURATION, the counters are dumped (-d), and the instructions
# (Ir, user space only: the kernel's work is not counted) are divided by the responses wrk
# received. Prints one line per server and scenario, and the ratio of squalld to the bare loop.
#
# Usage:  bench/callgrind.sh
# Environment (defaults in brackets):
#   SQUALLD       squalld binary [../build/squalld relative to this script]
#   SERVERS       ["squalld bare"]
#   SCENARIOS     ["keepalive pipelined"]
#   DURATION      each wrk run [5s]
#   CONNECTIONS   wrk connections [10]
#   PIPELINE_DEPTH  requests per write in the pipelined scenario [16]
#   CACHE_SIM     1: valgrind also simulates the caches and branch predictors, and a second line
#                 per run gives the first-level data cache misses (reads and writes), the
#                 instruction cache misses and the mispredicted branches (conditional and
#                 indirect) per request: the memory a request touches, which its instruction
#                 count does not show; "lines": the same with first-level caches of 1 KiB, which
#                 keep nothing from one request to the next, so that the misses count the code and
#                 data cache lines one request touches (its footprint, which the kernel's work
#                 between two requests evicts) [0]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
[[ $SQUALLD == /* ]] || SQUALLD=$PWD/$SQUALLD  # squalld runs in the work directory.
SERVERS=${SERVERS:-squalld bare}
SCENARIOS=${SCENARIOS:-keepalive pipelined}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-10}
PIPELINE_DEPTH=${PIPELINE_DEPTH:-16}
CACHE_SIM=${CACHE_SIM:-0}
WRK=${WRK:-wrk}

log() { printf 'callgrind: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"

simulate=()
case "$CACHE_SIM" in
  0) ;;
  1) simulate=(--cache-sim=yes --branch-sim=yes) ;;
  lines) simulate=(--cache-sim=yes --D1=1024,2,64 --I1=1024,2,64) ;;
  *) die "CACHE_SIM must be 0, 1 or lines" ;;
esac

for program in valgrind callgrind_control "$WRK" curl cc; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install valgrind wrk curl gcc)"
done

make_work_dir callgrind

cc -O2 -g -Wall -Werror -o "$work_dir/bare_http_uv" "$bench_dir/bare_http_uv.c" -luv ||
  die "cannot build bench/bare_http_uv.c"

declare -A per_request=()
for server in $SERVERS; do
  port_file=$work_dir/$server.port
  case "$server" in
    squalld)
      # In the work directory: squalld's job store (squall-jobs.db) is created there.
      (cd "$work_dir" && exec valgrind --tool=callgrind "${simulate[@]}" \
        --callgrind-out-file="$work_dir/cg.$server.%p" "$SQUALLD" \
        --config "$bench_dir/squalld-bench.toml" --listen 127.0.0.1:0 \
        --port-file "$port_file" >"$work_dir/$server.log" 2>&1) &
      ;;
    bare)
      valgrind --tool=callgrind "${simulate[@]}" --callgrind-out-file="$work_dir/cg.$server.%p" \
        "$work_dir/bare_http_uv" >"$port_file" 2>"$work_dir/$server.log" &
      ;;
    *) die "unknown server '$server' (squalld, bare)" ;;
  esac
  server_pid=$!
  port=""
  for ((tries = 0; tries < 300; tries++)); do
    port=$(port_from_file "$port_file") && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $port ]] || die "$server wrote no port (see $work_dir/$server.log)"
  url="http://127.0.0.1:$port/plaintext"
  for ((tries = 0; tries < 100; tries++)); do
    curl -s -o /dev/null --max-time 5 "$url" && break
    sleep 0.1
  done
  "$WRK" -t1 -c"$CONNECTIONS" -d1s "$url" >/dev/null  # Warm-up: pools and caches filled.
  for scenario in $SCENARIOS; do
    case "$scenario" in
      keepalive) arguments=(-s "$bench_dir/report.lua" "$url") ;;
      pipelined) arguments=(-s "$bench_dir/pipeline.lua" "$url" -- "$PIPELINE_DEPTH") ;;
      *) die "unknown scenario '$scenario' (keepalive, pipelined)" ;;
    esac
    callgrind_wrk "$server_pid" "$work_dir/cg.$server" "$work_dir/wrk.$server.$scenario.txt" \
      -t1 -c"$CONNECTIONS" -d"$DURATION" "${arguments[@]}"
    per_request[$server.$scenario]=$((callgrind_instructions / callgrind_requests))
    printf '%-8s %-10s %12s instructions / %8s requests = %6s per request\n' "$server" \
      "$scenario" "$callgrind_instructions" "$callgrind_requests" "${per_request[$server.$scenario]}"
    if [[ $CACHE_SIM != 0 ]]; then
      # The dump's "events:" line names the counts of its "summary:" (or "totals:") line.
      awk -v mode="$CACHE_SIM" -v server="$server" -v scenario="$scenario" \
        -v requests="$callgrind_requests" '
        /^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
        /^(summary|totals):/ {
          for (i = 2; i <= NF; i++) n[name[i]] = $i / requests
          printf "%-8s %-10s per request: ", server, scenario
          if (mode == "lines")
            printf "%.0f code lines and %.0f data lines touched (%.0f read, %.0f written)\n",
              n["I1mr"], n["D1mr"] + n["D1mw"], n["D1mr"], n["D1mw"]
          else
            printf "%.1f D1 misses (%.1f read, %.1f write), %.2f I1 misses, %.1f mispredicted branches (%.1f conditional, %.1f indirect)\n",
              n["D1mr"] + n["D1mw"], n["D1mr"], n["D1mw"], n["I1mr"], n["Bcm"] + n["Bim"],
              n["Bcm"], n["Bim"]
          exit
        }' "$callgrind_dump"
    fi
    rm -f "$callgrind_dump"
  done
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done

for scenario in $SCENARIOS; do
  if [[ -n ${per_request[squalld.$scenario]:-} && -n ${per_request[bare.$scenario]:-} ]]; then
    awk -v a="${per_request[squalld.$scenario]}" -v b="${per_request[bare.$scenario]}" \
      -v s="$scenario" 'BEGIN { printf "%s: squalld / bare = %.2fx instructions per request\n", s, a / b }'
  fi
done

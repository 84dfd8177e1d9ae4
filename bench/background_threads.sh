#!/usr/bin/env bash
# bench/background_threads.sh: what SCHED_BATCH on squalld's log writer is worth when the access
# log goes to a file and squalld shares one CPU (lib/core/background_thread.hpp).
#
# One squalld (bench/squalld-bench.toml with [log] access_log set to a file) on SERVER_CPU, wrk
# on CLIENT_CPU with keep-alive GET /plaintext. Rounds alternate the `squall-log` thread's policy
# in the same process: SCHED_OTHER (`chrt -o`, as before the change) and SCHED_BATCH (as squalld
# sets it). Reported per policy: the medians over ROUNDS of requests/s and of squalld's CPU
# (all threads) per request, and the lines the access log received against the requests wrk
# counted (a policy that made the writer fall behind would drop lines, counted in
# squall_log_dropped_messages_total).
#
# Usage:  bench/background_threads.sh
# Environment (defaults in brackets): DURATION [6] seconds per run, ROUNDS [5],
#   CONNECTIONS [100], SERVER_CPU [0], CLIENT_CPU [1], SQUALLD [build/squalld],
#   OUT_DIR [bench/out]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-5}
CONNECTIONS=${CONNECTIONS:-100}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
WRK=${WRK:-wrk}

log() { printf 'bench-background: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"

for program in "$WRK" chrt taskset curl; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install wrk util-linux curl)"
done
[[ -x $SQUALLD ]] || die "no squalld at $SQUALLD (run make)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a whole number above 0, got '$ROUNDS'"

make_work_dir background

access_log=$work_dir/access.log
sed "s|^access_log = .*|access_log = \"$access_log\"|" "$bench_dir/squalld-bench.toml" \
  >"$work_dir/squalld.toml"
grep -q "^access_log = \"$access_log\"" "$work_dir/squalld.toml" ||
  die "bench/squalld-bench.toml has no access_log line to point at a file"

taskset -c "$SERVER_CPU" "$SQUALLD" --config "$work_dir/squalld.toml" --listen 127.0.0.1:0 \
  --port-file "$work_dir/port" >"$work_dir/squalld.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 100); do
  port=$(port_from_file "$work_dir/port") && break
  sleep 0.1
done
[[ -n $port ]] || die "squalld did not start: $(cat "$work_dir/squalld.log")"
url=http://127.0.0.1:$port/plaintext

log_thread=""
for task in /proc/"$server_pid"/task/*; do
  [[ $(<"$task/comm") == squall-log ]] && log_thread=${task##*/}
done
[[ -n $log_thread ]] || die "squalld has no thread named squall-log"
chrt -p "$log_thread" | grep -q SCHED_BATCH || die "squall-log does not run under SCHED_BATCH"

tick=$(getconf CLK_TCK)
declare -A rates=() cpus=() lines=()
# One run: the log thread under policy $1 (chrt's -o or -b), wrk for DURATION.
measure() {
  local policy=$1 before after requests logged
  chrt "$policy" -p 0 "$log_thread"
  : >"$access_log"
  before=$(cpu_ticks "$server_pid")
  taskset -c "$CLIENT_CPU" "$WRK" -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$url" >"$work_dir/wrk.txt"
  after=$(cpu_ticks "$server_pid")
  requests=$(awk '/requests in/ {print $1}' "$work_dir/wrk.txt")
  [[ -n $requests && $requests -gt 0 ]] || die "wrk reported no requests: $(cat "$work_dir/wrk.txt")"
  # The writer drains its queue: wait until the log stops growing.
  logged=-1
  while [[ $(wc -l <"$access_log") != "$logged" ]]; do
    logged=$(wc -l <"$access_log")
    sleep 0.3
  done
  rates[$policy]+="$(awk -v n="$requests" -v d="$DURATION" 'BEGIN {printf "%.0f", n / d}') "
  cpus[$policy]+="$(awk -v t=$((after - before)) -v hz="$tick" -v n="$requests" \
    'BEGIN {printf "%.2f", t / hz * 1e6 / n}') "
  lines[$policy]+="$logged/$requests "
  log "round $round, squall-log ${policy/-o/SCHED_OTHER}: $requests requests, $logged lines"
}

taskset -c "$CLIENT_CPU" "$WRK" -t1 -c"$CONNECTIONS" -d2s "$url" >/dev/null  # Warm-up.
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2)); then order="-o -b"; else order="-b -o"; fi
  for policy in $order; do measure "$policy"; done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
mkdir -p "$OUT_DIR"
report=$OUT_DIR/background-threads.md
{
  printf '# squall-log under SCHED_OTHER and SCHED_BATCH, access log to a file\n\n'
  printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  # shellcheck disable=SC2016 # The backquotes are Markdown.
  printf -- '- command: `DURATION=%s ROUNDS=%s CONNECTIONS=%s bench/background_threads.sh`\n' \
    "$DURATION" "$ROUNDS" "$CONNECTIONS"
  printf -- '- squalld on CPU %s, wrk on CPU %s; %s\n\n' "$SERVER_CPU" "$CLIENT_CPU" "$(machine_load "$server_pid")"
  printf '| squall-log | requests/s | squalld CPU µs per request |\n|---|--:|--:|\n'
  for policy in -o -b; do
    name=SCHED_OTHER
    [[ $policy == -b ]] && name=SCHED_BATCH
    printf '| %s | %s | %s |\n' "$name" "$(median <<<"${rates[$policy]}")" \
      "$(median <<<"${cpus[$policy]}")"
  done
  printf '\nRounds, requests/s: SCHED_OTHER %s; SCHED_BATCH %s\n' "${rates[-o]}" "${rates[-b]}"
  printf '\nRounds, CPU µs per request: SCHED_OTHER %s; SCHED_BATCH %s\n' "${cpus[-o]}" "${cpus[-b]}"
  printf '\nAccess log lines / requests: SCHED_OTHER %s; SCHED_BATCH %s\n' "${lines[-o]}" "${lines[-b]}"
} >"$report"
cat "$report"

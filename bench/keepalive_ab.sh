#!/usr/bin/env bash
# bench/keepalive_ab.sh: keep-alive GET /plaintext, CPU per request of several squalld builds and
# the bare libuv loop (bench/bare_http_uv.c), in interleaved rounds: A B bare, A B bare, ... so
# that the machine's slow and fast minutes fall on every build alike. For a change whose effect
# is smaller than the spread between rounds of one build (bench/run.sh runs each server's rounds
# apart), compare the same-round ratios this prints.
#
# Each run: the server pinned to CPU 0 with bench/squalld-bench.toml, a 1 s warm-up, then
# `wrk -t1 -cCONNECTIONS -dDURATION` pinned to CPU 1; the server's utime and stime over the run
# divided by the responses wrk counted. With SYSCALLS=1, a further run per server counts its
# system calls per request with `perf stat` on the kernel's syscall tracepoints (read, write,
# epoll_wait, ... of all its threads).
#
# Usage:  bench/keepalive_ab.sh [SQUALLD...]      (default: ../build/squalld)
# Environment (defaults in brackets):
#   ROUNDS        rounds [7]
#   DURATION      each wrk run [8s]
#   CONNECTIONS   wrk connections [100]
#   BARE          1: the bare loop runs in every round too [1]
#   BARE_VARIANTS bare-loop variants run in every round too, named bare:VARIANT: "timer" (a
#                 repeating libuv timer), "thread" (an idle second thread), "same" (squalld's
#                 own answer to GET /plaintext byte for byte, as bench/run.sh's bare_same:
#                 captured with curl from the first SQUALLD, its Date frozen), "work" (about
#                 1,400 instructions more per request), "pages" (a byte written in each of 32
#                 pages per request), "lines" (400 cache lines read per request, four in each
#                 of 100 pages); several at once joined by commas, e.g. "work,lines,thread"
#                 [none]
#   SYSCALLS      1: count system calls per request (perf) after the rounds [0]
#   PIPELINE      N > 0: wrk pipelines N requests per write (bench/pipeline.lua) instead of one
#                 request at a time per connection: the CPU per pipelined request [0]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-100}
BARE=${BARE:-1}
BARE_VARIANTS=${BARE_VARIANTS:-}
SYSCALLS=${SYSCALLS:-0}
PIPELINE=${PIPELINE:-0}
WRK=${WRK:-wrk}

log() { printf 'keepalive_ab: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"

for program in "$WRK" taskset cc; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install wrk util-linux gcc)"
done
if [[ $SYSCALLS == 1 ]]; then
  command -v perf >/dev/null || die "perf is missing (apt-get install linux-perf), or run with SYSCALLS=0"
fi

servers=("$@")
((${#servers[@]} > 0)) || servers=("$repo_dir/build/squalld")
for server in "${servers[@]}"; do
  [[ -x $server ]] || die "no squalld at $server: build it (make build/squalld)"
done
is_bare() { [[ $1 == bare || $1 == bare:* ]]; }

make_work_dir keepalive-ab
# Each build runs in a directory of its own: its job store (squall-jobs.db, in the working
# directory) is its own, so builds with different store schemas can be compared.
declare -A run_dir=()
for index in "${!servers[@]}"; do
  run_dir[${servers[$index]}]=$work_dir/run-$index
  mkdir -p "$work_dir/run-$index"
done
cc -O2 -g -Wall -Werror -pthread -o "$work_dir/bare_http_uv" "$bench_dir/bare_http_uv.c" -luv ||
  die "cannot build bench/bare_http_uv.c"
[[ $BARE == 1 ]] && servers+=(bare)
# Every variant but "same" is BARE_EXTRA for the loop, which refuses unknown ones by name
# (before it prints a port): each is tried once here, before the rounds.
for variant in $BARE_VARIANTS; do
  if [[ $variant != same ]]; then
    status=0
    BARE_EXTRA=$variant timeout 1 "$work_dir/bare_http_uv" 0 >/dev/null \
      2>"$work_dir/variant.log" || status=$?
    ((status == 124)) || die "BARE_VARIANTS: $(cat "$work_dir/variant.log")"
  fi
  servers+=("bare:$variant")
done
hz=$(getconf CLK_TCK)
[[ $PIPELINE =~ ^[0-9]+$ ]] ||
  die "PIPELINE must be a number of requests per write, not '$PIPELINE'"
# The measured wrk run against $url: one request at a time per connection, or PIPELINE per write.
measured_wrk() {
  if ((PIPELINE > 0)); then
    taskset -c 1 "$WRK" -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$bench_dir/pipeline.lua" "$url" \
      -- "$PIPELINE"
  else
    taskset -c 1 "$WRK" -t1 -c"$CONNECTIONS" -d"$DURATION" "$url"
  fi
}

# Starts $1 on CPU 0; sets server_pid and url.
start_server() {
  local port_file=$work_dir/port port="" tries
  rm -f "$port_file"
  if is_bare "$1"; then
    local extra="" response=""
    [[ $1 == bare:* ]] && extra=${1#bare:}
    [[ $extra == same ]] && extra="" response=$work_dir/squalld-plaintext.http
    BARE_EXTRA=$extra taskset -c 0 "$work_dir/bare_http_uv" 0 ${response:+"$response"} \
      >"$port_file" 2>"$work_dir/server.log" &
  else
    local program=$1
    [[ $program == /* ]] || program=$PWD/$program
    (cd "${run_dir[$1]}" && exec taskset -c 0 "$program" --config "$bench_dir/squalld-bench.toml" \
      --listen 127.0.0.1:0 --port-file "$port_file" >"$work_dir/server.log" 2>&1) &
  fi
  server_pid=$!
  for ((tries = 0; tries < 100; tries++)); do
    port=$(port_from_file "$port_file") && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $port ]] || die "$1 wrote no port (see $work_dir/server.log)"
  url="http://127.0.0.1:$port/plaintext"
  taskset -c 1 "$WRK" -t1 -c"$CONNECTIONS" -d1s "$url" >/dev/null ||  # Warm-up.
    die "$1 does not answer on $url; its log ends: $(tail -n 3 "$work_dir/server.log")"
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# The responses in wrk's report ("N requests in ...").
responses() { sed -n 's/^ *\([0-9][0-9]*\) requests in.*/\1/p' <<<"$1"; }


# bare:same answers with squalld's bytes: one request to the first squalld captures them.
if [[ " ${servers[*]} " == *" bare:same "* ]]; then
  command -v curl >/dev/null || die "curl is missing (apt-get install curl), needed by BARE_VARIANTS=same"
  start_server "${servers[0]}"
  curl -s -i --raw --max-time 5 "$url" >"$work_dir/squalld-plaintext.http" ||
    die "curl could not capture ${servers[0]}'s /plaintext answer"
  stop_server
fi

results=$work_dir/results
: >"$results"
for ((round = 1; round <= ROUNDS; round++)); do
  for server in "${servers[@]}"; do
    start_server "$server"
    user_before=$(cpu_ticks "$server_pid" user)
    all_before=$(cpu_ticks "$server_pid")
    report=$(measured_wrk)
    user_after=$(cpu_ticks "$server_pid" user)
    all_after=$(cpu_ticks "$server_pid")
    stop_server
    count=$(responses "$report")
    [[ -n $count && $count -gt 0 ]] || die "wrk counted no responses from $server"
    awk -v round="$round" -v name="$server" -v count="$count" -v hz="$hz" \
      -v user=$((user_after - user_before)) -v all=$((all_after - all_before)) 'BEGIN {
        printf "%d\t%s\t%d\t%.3f\t%.3f\t%.3f\n", round, name, count, all / hz * 1e6 / count,
          user / hz * 1e6 / count, (all - user) / hz * 1e6 / count
      }' | tee -a "$results" |
      awk -F'\t' '{ printf "round %s %-40s %9d responses  CPU %s us/req  user %s  system %s\n",
        $1, $2, $3, $4, $5, $6 }' >&2
  done
done

# Medians per server, and each build's same-round ratio to the bare loop (median over rounds);
# with bare:same in the rounds, to that loop too.
python3 - "$results" <<'EOF'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
servers = list(dict.fromkeys(row[1] for row in rows))
by = {(row[0], row[1]): row for row in rows}
baselines = [name for name in ("bare", "bare:same") if name in servers]
header = "".join(f" {'÷ ' + name + ', same round [IQR]':>30}" for name in baselines)
print(f"{'server':40} {'CPU us/req':>11} {'user':>7} {'system':>7}{header}")


def ratio_column(ratios):
    # The median of the same-round ratios and, from four rounds on, their interquartile range:
    # how far one round's ratio strays, which a 5% question has to be read against.
    if not ratios:
        return f" {'-':>30}"
    text = f"{statistics.median(ratios):.3f}x"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        text += f" [{q1:.3f}-{q3:.3f}]"
    return f" {text:>30}"


for server in servers:
    mine = [row for row in rows if row[1] == server]
    cpu, user, system = (statistics.median(float(row[i]) for row in mine) for i in (3, 4, 5))
    columns = ""
    for baseline in baselines:
        ratios = [float(row[3]) / float(by[(row[0], baseline)][3]) for row in mine
                  if (row[0], baseline) in by and not server.startswith("bare")]
        columns += ratio_column(ratios)
    print(f"{server:40} {cpu:11.3f} {user:7.3f} {system:7.3f}{columns}")
EOF

if [[ $SYSCALLS == 1 ]]; then
  events=raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write
  events+=,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex
  for server in "${servers[@]}"; do
    start_server "$server"
    perf stat -x, -e "$events" -p "$server_pid" -o "$work_dir/perf.txt" &
    perf_pid=$!
    sleep 0.3
    report=$(measured_wrk)
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    stop_server
    count=$(responses "$report")
    echo "system calls per request, $server ($count responses):"
    awk -F, -v count="$count" '/^[0-9]/ { printf "  %-32s %.4f\n", $3, $1 / count }' \
      "$work_dir/perf.txt"
  done
fi

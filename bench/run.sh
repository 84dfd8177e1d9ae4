#!/usr/bin/env bash
# bench/run.sh: squalld, nginx and Node's http server side by side under wrk, in one run.
#
# Every server runs pinned to one CPU (SERVER_CPU, default 0) and wrk to the other (CLIENT_CPU,
# default 1). For each round, scenario and server (servers interleaved, their order rotated each
# round) wrk runs for DURATION; the report gives the median over ROUNDS of requests/s, p99 latency
# and the server's CPU time per request (utime+stime of its processes from /proc, and the utime
# alone: the server's own code, without the kernel's work for it), and squalld's ratio to each
# peer. Before that, each server holds IDLE_CONNECTIONS idle keep-alive connections while its
# resident memory is read. The table goes to stdout and to bench/out/latest.md.
#
# Usage:  bench/run.sh                (or `make bench`, which builds squalld first)
# Environment (defaults in brackets):
#   SQUALLD            squalld binary [../build/squalld relative to this script]
#   DURATION           length of each wrk run [10s]
#   ROUNDS             repetitions of every scenario; the median is reported [3]
#   CONNECTIONS        wrk connections for keep-alive and pipelined [100]
#   CLOSE_CONNECTIONS  wrk connections for the connection-per-request scenario [50]
#   PIPELINE_DEPTH     requests per write in the pipelined scenario [16]
#   IDLE_CONNECTIONS   idle connections for the memory test; 0 skips it [10000]
#   SERVERS            which servers, in this order ["squalld nginx node"]; also "bare": the
#                      bare libuv loop of bench/bare_http_uv.c (built here with cc), the limit of
#                      this design; and "bare_same": that loop sending squalld's own answer to
#                      GET /plaintext byte for byte (captured with curl; needs squalld before it
#                      in SERVERS), so a wrk that sets the pace parses the same bytes from both
#   SCENARIOS          which scenarios ["keepalive pipelined close"]
#   WARMUP             a keep-alive wrk run per server before the first round, unreported [2s]
#   OUT_DIR            where latest.md and the raw wrk output go [bench/out]
#   NGINX, NODE, WRK, PYTHON   the programs used [/usr/sbin/nginx, /usr/bin/node, wrk, /usr/bin/python3]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")

SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-100}
CLOSE_CONNECTIONS=${CLOSE_CONNECTIONS:-50}
PIPELINE_DEPTH=${PIPELINE_DEPTH:-16}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
SERVERS=${SERVERS:-squalld nginx node}
SCENARIOS=${SCENARIOS:-keepalive pipelined close}
WARMUP=${WARMUP:-2s}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
NGINX=${NGINX:-/usr/sbin/nginx}
NODE=${NODE:-/usr/bin/node}
WRK=${WRK:-wrk}
PYTHON=${PYTHON:-/usr/bin/python3}

command_line="DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS"
for optional in CLOSE_CONNECTIONS PIPELINE_DEPTH IDLE_CONNECTIONS SERVERS SCENARIOS WARMUP; do
  # Only the options that differ from their defaults, so the line stays short.
  case "$optional=${!optional}" in
    CLOSE_CONNECTIONS=50 | PIPELINE_DEPTH=16 | IDLE_CONNECTIONS=10000 | "SERVERS=squalld nginx node" | \
      "SCENARIOS=keepalive pipelined close" | WARMUP=2s) ;;
    *) command_line+=" $optional='${!optional}'" ;;
  esac
done
command_line+=" SQUALLD=$SQUALLD $0${*:+ $*}"

# Messages go to the stderr the script started with (fd 3), also from a trap that runs while a
# redirection is in force.
exec 3>&2

# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench: %s\n' "$*" >&3; }

# ---------------------------------------------------------------------------------------------
# Checks before anything starts.

for number in ROUNDS CONNECTIONS CLOSE_CONNECTIONS PIPELINE_DEPTH IDLE_CONNECTIONS SERVER_CPU CLIENT_CPU; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
((ROUNDS >= 1)) || die "ROUNDS must be at least 1"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION must look like 10s, 2m or 10, got '$DURATION'"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "WARMUP must look like 2s or 0, got '$WARMUP'"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || die "SERVER_CPU and CLIENT_CPU must differ"

read -ra servers <<<"$SERVERS"
read -ra scenarios <<<"$SCENARIOS"
((${#servers[@]} > 0)) || die "SERVERS is empty"
((${#scenarios[@]} > 0)) || die "SCENARIOS is empty"
for server in "${servers[@]}"; do
  case "$server" in
    squalld)
      [[ -x $SQUALLD ]] || die "no squalld at $SQUALLD: build it (make build/squalld), set SQUALLD, or leave it out with SERVERS='nginx node'"
      SQUALLD=$(cd "$(dirname "$SQUALLD")" && pwd)/$(basename "$SQUALLD")
      ;;
    nginx) [[ -x $NGINX ]] || die "no nginx at $NGINX (apt-get install nginx, or set NGINX)" ;;
    node) [[ -x $NODE ]] || die "no node at $NODE (apt-get install nodejs, or set NODE)" ;;
    bare) command -v cc >/dev/null || die "no cc to build bench/bare_http_uv.c" ;;
    bare_same)
      command -v cc >/dev/null || die "no cc to build bench/bare_http_uv.c"
      [[ " $SERVERS " == *" squalld "*" bare_same "* ]] ||
        die "SERVERS names bare_same without squalld before it (it answers with squalld's bytes)"
      ;;
    *) die "unknown server '$server' in SERVERS (squalld, nginx, node, bare, bare_same)" ;;
  esac
done
for scenario in "${scenarios[@]}"; do
  case "$scenario" in
    keepalive | pipelined | close) ;;
    *) die "unknown scenario '$scenario' in SCENARIOS (keepalive, pipelined, close)" ;;
  esac
done
for program in taskset curl "$WRK" "$PYTHON" getconf; do
  command -v "$program" >/dev/null || die "$program is missing (make bench installs the benchmark's packages)"
done
cpus=$(getconf _NPROCESSORS_ONLN)
((SERVER_CPU < cpus && CLIENT_CPU < cpus)) || die "need CPUs $SERVER_CPU and $CLIENT_CPU, this machine has $cpus"
clock_ticks=$(getconf CLK_TCK)

# Every server and the idle-connection helper need more descriptors than the usual 1024: raise
# the soft limit as far as the hard limit allows (up to 65536); children inherit it.
wanted_files=65536
hard_files=$(ulimit -Hn)
if [[ $hard_files != unlimited ]] && ((hard_files < wanted_files)); then
  wanted_files=$hard_files
fi
ulimit -n "$wanted_files"
open_files=$(ulimit -n)
if ((IDLE_CONNECTIONS > 0 && open_files < IDLE_CONNECTIONS + 100)); then
  die "the open-file limit is $open_files (hard $hard_files), too low for IDLE_CONNECTIONS=$IDLE_CONNECTIONS"
fi

# ---------------------------------------------------------------------------------------------
# Servers, and stopping them whatever happens.

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-bench.XXXXXX")
declare -A server_pid=() server_port=()
client_pid=""


stop_servers() {
  local name pid waited
  for name in "${!server_pid[@]}"; do
    pid=${server_pid[$name]}
    kill -TERM "$pid" 2>/dev/null || continue
    for ((waited = 0; waited < 50; waited++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) ignored SIGTERM for 5s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  server_pid=()
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $client_pid ]]; then
    kill -TERM "$client_pid" 2>/dev/null || true
    wait "$client_pid" 2>/dev/null || true
  fi
  stop_servers
  if [[ -d ${work_dir:-} ]]; then
    if ((status != 0)) && [[ -d $OUT_DIR ]]; then
      rm -rf "$OUT_DIR/latest-raw" && cp -r "$work_dir" "$OUT_DIR/latest-raw" 2>/dev/null &&
        log "logs of the failed run: $OUT_DIR/latest-raw"
    fi
    rm -rf "$work_dir"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# Prints the last lines of a server's logs, for a failure message.
server_logs() {
  local file
  for file in "$work_dir/$1".*.log "$work_dir/$1"/error.log; do
    [[ -s $file ]] || continue
    printf -- '--- %s\n' "${file#"$work_dir"/}" >&3
    tail -n 20 "$file" >&3
  done
}

# Waits until $1 answers GET /plaintext on its port, or dies.
wait_until_serving() {
  local name=$1 tries
  for ((tries = 0; tries < 100; tries++)); do
    kill -0 "${server_pid[$name]}" 2>/dev/null || {
      server_logs "$name"
      die "$name exited during start-up"
    }
    if [[ -n ${server_port[$name]:-} ]] &&
      curl -s -o /dev/null --max-time 1 "http://127.0.0.1:${server_port[$name]}/plaintext"; then
      return 0
    fi
    sleep 0.1
  done
  server_logs "$name"
  die "$name did not answer on 127.0.0.1:${server_port[$name]:-?} within 10s"
}


start_squalld() {
  local port_file=$work_dir/squalld.port tries
  if ! timeout 10 "$SQUALLD" --config "$bench_dir/squalld-bench.toml" --check-config \
    >"$work_dir/squalld.check.log" 2>&1; then
    cat "$work_dir/squalld.check.log" >&3
    die "squalld rejected bench/squalld-bench.toml (squalld --check-config)"
  fi
  # In the work directory: squalld's job store (squall-jobs.db) is created there.
  (cd "$work_dir" && exec taskset -c "$SERVER_CPU" "$SQUALLD" \
    --config "$bench_dir/squalld-bench.toml" --listen 127.0.0.1:0 --port-file "$port_file" \
    >"$work_dir/squalld.stdout.log" 2>"$work_dir/squalld.stderr.log") &
  server_pid[squalld]=$!
  for ((tries = 0; tries < 100; tries++)); do
    server_port[squalld]=$(port_from_file "$port_file") && break
    kill -0 "${server_pid[squalld]}" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n ${server_port[squalld]} ]] || {
    server_logs squalld
    die "squalld wrote no port to --port-file"
  }
}

start_nginx() {
  local prefix=$work_dir/nginx attempt port
  mkdir -p "$prefix"
  # The port is found by binding port 0 and closing it, so another program could take it in
  # between; then nginx fails to bind and the next attempt picks another one.
  for attempt in 1 2 3; do
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$port|g" "$bench_dir/nginx.conf.template" >"$prefix/nginx.conf"
    "$NGINX" -t -q -p "$prefix/" -e "$prefix/error.log" -c "$prefix/nginx.conf" ||
      die "nginx rejected $prefix/nginx.conf (made from bench/nginx.conf.template)"
    taskset -c "$SERVER_CPU" "$NGINX" -p "$prefix/" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
      >"$work_dir/nginx.stdout.log" 2>"$work_dir/nginx.stderr.log" &
    server_pid[nginx]=$!
    server_port[nginx]=$port
    sleep 0.3
    kill -0 "${server_pid[nginx]}" 2>/dev/null && return 0
    wait "${server_pid[nginx]}" 2>/dev/null || true
    unset 'server_pid[nginx]'
    log "nginx failed to start on port $port (attempt $attempt)"
  done
  server_logs nginx
  die "nginx did not start"
}

start_node() {
  local tries
  taskset -c "$SERVER_CPU" "$NODE" "$bench_dir/node-server.js" \
    >"$work_dir/node.stdout.log" 2>"$work_dir/node.stderr.log" &
  server_pid[node]=$!
  for ((tries = 0; tries < 100; tries++)); do
    server_port[node]=$(port_from_file "$work_dir/node.stdout.log") && break
    kill -0 "${server_pid[node]}" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n ${server_port[node]} ]] || {
    server_logs node
    die "node printed no port"
  }
}


# $1: the name (bare or bare_same); $2: a file with the response to send instead of the built-in one.
start_bare_loop() {
  local name=$1 tries
  [[ -x $work_dir/bare_http_uv ]] ||
    cc -O2 -Wall -Werror -o "$work_dir/bare_http_uv" "$bench_dir/bare_http_uv.c" -luv ||
    die "cannot build bench/bare_http_uv.c (libuv1-dev installed?)"
  taskset -c "$SERVER_CPU" "$work_dir/bare_http_uv" 0 ${2:+"$2"} \
    >"$work_dir/$name.stdout.log" 2>"$work_dir/$name.stderr.log" &
  server_pid[$name]=$!
  for ((tries = 0; tries < 100; tries++)); do
    server_port[$name]=$(port_from_file "$work_dir/$name.stdout.log") && break
    kill -0 "${server_pid[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n ${server_port[$name]} ]] || {
    server_logs "$name"
    die "bare_http_uv ($name) printed no port"
  }
}

start_bare() { start_bare_loop bare; }

# squalld's answer to GET /plaintext, head and body as they came over the wire (its Date frozen).
start_bare_same() {
  wait_until_serving squalld
  curl -s -i --raw --max-time 5 "http://127.0.0.1:${server_port[squalld]}/plaintext" \
    >"$work_dir/squalld-plaintext.http" || die "curl could not capture squalld's /plaintext answer"
  start_bare_loop bare_same "$work_dir/squalld-plaintext.http"
}

# Checks a server's affinity really is SERVER_CPU (taskset's mask is inherited by every thread).
check_pinned() {
  local name=$1 pid affinity
  for pid in $(process_tree "${server_pid[$name]}"); do
    affinity=$(taskset -pc "$pid" | sed 's/.*: *//')
    [[ $affinity == "$SERVER_CPU" ]] || die "$name (pid $pid) runs on CPUs '$affinity', not $SERVER_CPU"
  done
}

# ---------------------------------------------------------------------------------------------
# One wrk run: $1 server, $2 scenario, $3 round (0 = warm-up, not reported).
#
# Besides wrk's own results it records, over the run: the server's CPU ticks, wrk's CPU time
# (bash's `time`), and the user+nice+system ticks of both CPUs from /proc/stat, so the report
# can say how much of each CPU went to something else (this machine is shared).


run_wrk() {
  local name=$1 scenario=$2 round=$3 duration=$DURATION
  local url="http://127.0.0.1:${server_port[$name]}/plaintext"
  local output=$work_dir/wrk.$scenario.$name.round$round.txt
  local arguments before after user_before user_after started_ns wrk_cpu server_busy client_busy
  case "$scenario" in
    keepalive) arguments=(-c "$CONNECTIONS" -s "$bench_dir/report.lua" "$url") ;;
    pipelined) arguments=(-c "$CONNECTIONS" -s "$bench_dir/pipeline.lua" "$url" -- "$PIPELINE_DEPTH") ;;
    # wrk opens a new connection after every response that says Connection: close.
    close) arguments=(-c "$CLOSE_CONNECTIONS" -H "Connection: close" -s "$bench_dir/report.lua" "$url") ;;
  esac
  ((round > 0)) || duration=$WARMUP
  server_busy=$(cpu_busy_ticks "$SERVER_CPU")
  client_busy=$(cpu_busy_ticks "$CLIENT_CPU")
  started_ns=$(date +%s%N)
  before=$(cpu_ticks "${server_pid[$name]}")
  user_before=$(cpu_ticks "${server_pid[$name]}" user)
  if ! run_client "$output" "$output" "$output.time" \
    taskset -c "$CLIENT_CPU" "$WRK" -t1 -d"$duration" --latency "${arguments[@]}"; then
    cat "$output" >&3
    die "wrk failed against $name ($scenario)"
  fi
  after=$(cpu_ticks "${server_pid[$name]}")
  user_after=$(cpu_ticks "${server_pid[$name]}" user)
  server_busy=$(($(cpu_busy_ticks "$SERVER_CPU") - server_busy))
  client_busy=$(($(cpu_busy_ticks "$CLIENT_CPU") - client_busy))
  wrk_cpu=$(awk '{ print $1 + $2 }' "$output.time")
  kill -0 "${server_pid[$name]}" 2>/dev/null || {
    server_logs "$name"
    die "$name died during the $scenario run"
  }
  grep -q '^WRK_JSON ' "$output" || {
    cat "$output" >&3
    die "wrk printed no results against $name ($scenario)"
  }
  if ((round > 0)); then
    # round, scenario, server, server ticks, wrk output, wrk CPU seconds, wall-clock seconds,
    # user+nice+system ticks of the server's CPU and of wrk's, the server's user ticks.
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$scenario" "$name" \
      "$((after - before))" "${output##*/}" "$wrk_cpu" \
      "$(awk -v a="$started_ns" -v b="$(date +%s%N)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')" \
      "$server_busy" "$client_busy" "$((user_after - user_before))" >>"$work_dir/runs.tsv"
    "$PYTHON" "$bench_dir/summarize.py" --brief "$work_dir/runs.tsv" "$clock_ticks" |
      sed "s|^|bench: round $round/$ROUNDS $scenario $name: |" >&3
  fi
}

# ---------------------------------------------------------------------------------------------
# The run.

runs_per_round=$((${#servers[@]} * ${#scenarios[@]}))
duration_seconds=${DURATION%[smh]}
case "$DURATION" in *m) ((duration_seconds *= 60)) ;; *h) ((duration_seconds *= 3600)) ;; esac
log "$ROUNDS rounds x $runs_per_round runs x $DURATION, about $((ROUNDS * runs_per_round * (duration_seconds + 1) / 60 + 1)) min; servers on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU; work dir $work_dir"

info=$work_dir/info.tsv
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  printf 'command\t%s\n' "$command_line"
  printf 'duration\t%s\n' "$DURATION"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'connections\t%s\n' "$CONNECTIONS"
  printf 'close_connections\t%s\n' "$CLOSE_CONNECTIONS"
  printf 'pipeline_depth\t%s\n' "$PIPELINE_DEPTH"
  printf 'idle_connections\t%s\n' "$IDLE_CONNECTIONS"
  printf 'servers\t%s\n' "${servers[*]}"
  printf 'scenarios\t%s\n' "${scenarios[*]}"
  printf 'server_cpu\t%s\n' "$SERVER_CPU"
  printf 'client_cpu\t%s\n' "$CLIENT_CPU"
  printf 'clock_ticks\t%s\n' "$clock_ticks"
  printf 'open_files\t%s\n' "$open_files"
  printf 'machine\t%s CPUs (%s), Linux %s\n' "$cpus" \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" "$(uname -r)"
  printf 'wrk\t%s\n' "$("$WRK" -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
  git_revision=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo "no commit")
  [[ -z $(git -C "$repo_dir" status --porcelain 2>/dev/null) ]] || git_revision+=" + uncommitted changes"
  printf 'revision\t%s\n' "$git_revision"
} >"$info"
: >"$work_dir/runs.tsv"

for server in "${servers[@]}"; do
  "start_$server"
done
for server in "${servers[@]}"; do
  wait_until_serving "$server"
  check_pinned "$server"
  # Sanity: the exact body, and what the response looks like (header size, for the notes).
  body=$(curl -s --max-time 5 "http://127.0.0.1:${server_port[$server]}/plaintext") ||
    die "curl could not fetch /plaintext from $server"
  [[ $body == "Hello, World!" ]] || die "$server answered /plaintext with '$body', not 'Hello, World!'"
  header_bytes=$(curl -s -o /dev/null -w '%{size_header}' "http://127.0.0.1:${server_port[$server]}/plaintext")
  case "$server" in
    squalld) version=$(timeout 5 "$SQUALLD" --version 2>&1 | head -n 1) || version="squalld" ;;
    nginx) version=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //') ;;
    node) version="node $("$NODE" --version)" ;;
    bare) version="bare libuv loop (bench/bare_http_uv.c), libuv $(pkg-config --modversion libuv 2>/dev/null || echo '?')" ;;
    bare_same) version="bare libuv loop sending squalld's answer bytes, libuv $(pkg-config --modversion libuv 2>/dev/null || echo '?')" ;;
  esac
  printf 'server\t%s\t%s\t%s\t%s\n' "$server" "${server_pid[$server]}" "$header_bytes" "$version" >>"$info"
  log "$server: pid ${server_pid[$server]}, 127.0.0.1:${server_port[$server]}, /plaintext OK ($header_bytes header bytes), $version"
done

if ((IDLE_CONNECTIONS > 0)); then
  for server in "${servers[@]}"; do
    log "idle memory: $IDLE_CONNECTIONS keep-alive connections to $server"
    if ! run_client "$work_dir/memory.$server.json" "$work_dir/memory.$server.stderr.log" \
      "$work_dir/memory.$server.time" taskset -c "$CLIENT_CPU" "$PYTHON" "$bench_dir/idle_conns.py" \
      --port "${server_port[$server]}" --pid "${server_pid[$server]}" --count "$IDLE_CONNECTIONS" \
      --settle 0.5; then
      log "warning: the idle-connection test against $server did not complete (see the report)"
      cat "$work_dir/memory.$server.stderr.log" >&3
    fi
    kill -0 "${server_pid[$server]}" 2>/dev/null || {
      server_logs "$server"
      die "$server died during the idle-connection test"
    }
  done
fi

if [[ $WARMUP != 0 && $WARMUP != 0[smh] ]]; then
  for server in "${servers[@]}"; do
    log "warm-up: $server, keep-alive for $WARMUP"
    run_wrk "$server" keepalive 0
  done
fi

for ((round = 1; round <= ROUNDS; round++)); do
  # Rotate the order every round so no server always runs right after the same one.
  order=()
  for ((index = 0; index < ${#servers[@]}; index++)); do
    order+=("${servers[(index + round - 1) % ${#servers[@]}]}")
  done
  for scenario in "${scenarios[@]}"; do
    for server in "${order[@]}"; do
      run_wrk "$server" "$scenario" "$round"
      sleep 0.2
    done
  done
done

stop_servers
mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/latest-raw"
cp -r "$work_dir" "$OUT_DIR/latest-raw"
"$PYTHON" "$bench_dir/summarize.py" --work "$work_dir" --markdown "$OUT_DIR/latest.md"

#!/usr/bin/env bash
# bench/run_email.sh: accepted POST /email per second with durable jobs.
#
# squalld runs pinned to SERVER_CPU (default 0) with [jobs] durability = DURABILITY ("full": an
# fsync per group commit before the 202s of that commit leave); wrk -t1 runs pinned to CLIENT_CPU
# (default 1) with bench/email.lua. The SMTP relay is, for each name in RELAYS, the aiosmtpd
# harness of the integration tests (tests/integration/smtp_server.py, accepting everything;
# Python) or Postfix's smtp-sink (C, accepts as fast as the machine allows; from the postfix
# package, run without configuring Postfix), on 127.0.0.1, pinned to SMTP_CPU (default: the
# client's CPU, so that it does not take the server's). The sends happen in the background, at
# most [jobs] max_concurrent_sends (MAX_SENDS) at once over at most [smtp] connections
# (SMTP_CONNECTIONS) kept connections, and lag behind the accepts. The send rate is measured
# after the run, while the backlog drains (wrk has stopped): sent jobs per second over at most
# SEND_WAIT seconds, until the backlog is empty. max_queued is raised so back-pressure (503)
# never starts.
#
# For each connection count in CONNECTIONS a fresh squalld with a fresh store takes a warm-up wrk
# run (WARMUP, unreported) and then the measured one (DURATION). Reported: requests/s, p50/p99
# latency, answers >= 400 and socket errors (wrk), the jobs the store gained during the run (the
# accepted ones), how many of them were delivered by the end of the run and SEND_WAIT seconds
# later, and CPU use. The table goes to stdout and to OUT_DIR/email-latest.md, raw output to
# OUT_DIR/email-latest-raw.
#
# Usage:  bench/run_email.sh
# Environment (defaults in brackets):
#   SQUALLD       squalld binary [../build/squalld relative to this script]
#   DURATION      length of each measured wrk run [10s]
#   WARMUP        wrk run before each measured one, unreported; 0 skips it [2s]
#   CONNECTIONS   wrk connection counts, one measured run each ["64 256"]
#   DURABILITY    [jobs] durability: full or normal [full]
#   SEND_WAIT     seconds the send rate is measured over after a run (less if the backlog
#                 empties first) [5]
#   RELAYS        SMTP relays, one pass each: aiosmtpd and/or smtp-sink [aiosmtpd]
#   MAX_SENDS     [jobs] max_concurrent_sends; thread_pool_size is MAX_SENDS + 2 [2]
#   SMTP_CONNECTIONS  [smtp] connections; "" leaves the key out (for a squalld from before it
#                 existed) [""]
#   SMTP_SINK     the smtp-sink program [/usr/sbin/smtp-sink]
#   SERVER_CPU, CLIENT_CPU, SMTP_CPU   CPUs for squalld, wrk and the SMTP server [0, 1, CLIENT_CPU]
#   OUT_DIR       where email-latest.md and email-latest-raw go [bench/out]
#   WRK, PYTHON   the programs used [wrk, /usr/bin/python3 (with aiosmtpd)]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")

SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64 256}
DURABILITY=${DURABILITY:-full}
SEND_WAIT=${SEND_WAIT:-5}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SMTP_CPU=${SMTP_CPU:-$CLIENT_CPU}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
WRK=${WRK:-wrk}
PYTHON=${PYTHON:-/usr/bin/python3}
RELAYS=${RELAYS:-aiosmtpd}
MAX_SENDS=${MAX_SENDS:-2}
SMTP_CONNECTIONS=${SMTP_CONNECTIONS:-}
SMTP_SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}

command_line="DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS='$CONNECTIONS' DURABILITY=$DURABILITY"
command_line+=" SEND_WAIT=$SEND_WAIT RELAYS='$RELAYS' MAX_SENDS=$MAX_SENDS"
command_line+=" SMTP_CONNECTIONS=$SMTP_CONNECTIONS SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU SMTP_CPU=$SMTP_CPU"
command_line+=" SQUALLD=$SQUALLD $0${*:+ $*}"

# Messages go to the stderr the script started with (fd 3), also from a trap.
exec 3>&2

# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-email: %s\n' "$*" >&3; }

# ---------------------------------------------------------------------------------------------
# Checks before anything starts.

for number in SERVER_CPU CLIENT_CPU SMTP_CPU SEND_WAIT MAX_SENDS ${SMTP_CONNECTIONS:+SMTP_CONNECTIONS}; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION must look like 10s, 2m or 10, got '$DURATION'"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "WARMUP must look like 2s or 0, got '$WARMUP'"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || die "SERVER_CPU and CLIENT_CPU must differ"
[[ $DURABILITY == full || $DURABILITY == normal ]] || die "DURABILITY must be full or normal"
read -ra connection_counts <<<"$CONNECTIONS"
((${#connection_counts[@]} > 0)) || die "CONNECTIONS is empty"
for count in "${connection_counts[@]}"; do
  [[ $count =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be whole numbers, got '$count'"
done
[[ -x $SQUALLD ]] || die "no squalld at $SQUALLD: build it (make build/squalld) or set SQUALLD"
SQUALLD=$(cd "$(dirname "$SQUALLD")" && pwd)/$(basename "$SQUALLD")
for program in taskset curl "$WRK" "$PYTHON" getconf; do
  command -v "$program" >/dev/null || die "$program is missing"
done
read -ra relays <<<"$RELAYS"
((${#relays[@]} > 0)) || die "RELAYS is empty"
for relay in "${relays[@]}"; do
  case $relay in
    aiosmtpd)
      "$PYTHON" -c 'import aiosmtpd' 2>/dev/null ||
        die "$PYTHON has no aiosmtpd (apt-get install python3-aiosmtpd)"
      ;;
    smtp-sink)
      [[ -x $SMTP_SINK ]] || die "no smtp-sink at $SMTP_SINK (apt-get install postfix)"
      ;;
    *) die "RELAYS: unknown relay '$relay' (aiosmtpd or smtp-sink)" ;;
  esac
done
cpus=$(getconf _NPROCESSORS_ONLN)
for cpu in "$SERVER_CPU" "$CLIENT_CPU" "$SMTP_CPU"; do
  ((cpu < cpus)) || die "CPU $cpu does not exist: this machine has $cpus"
done
clock_ticks=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------------------------------------
# Processes, and stopping them whatever happens.

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-bench-email.XXXXXX")
squalld_pid="" smtp_pid="" client_pid="" squalld_port="" smtp_port=""

# Stops process $1 with SIGTERM (SIGKILL after 10 s) and reaps it.
stop_process() {
  local pid=$1 name=$2 waited
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((waited = 0; waited < 100; waited++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for 10s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $client_pid ]]; then
    kill -TERM "$client_pid" 2>/dev/null || true
    wait "$client_pid" 2>/dev/null || true
  fi
  stop_process "$squalld_pid" squalld
  stop_process "$smtp_pid" "the SMTP server"
  if [[ -d ${work_dir:-} ]]; then
    if ((status != 0)); then
      mkdir -p "$OUT_DIR" && rm -rf "$OUT_DIR/email-latest-raw" &&
        cp -r "$work_dir" "$OUT_DIR/email-latest-raw" 2>/dev/null &&
        log "logs of the failed run: $OUT_DIR/email-latest-raw"
    fi
    rm -rf "$work_dir"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM





# The SMTP relay: the integration tests' aiosmtpd harness, accepting everything. It writes its
# port to $work_dir/smtp.port and, every 0.2 s, the number of messages received to
# $work_dir/smtp.count (only the count is kept, not the messages).
start_smtp() {
  relay=$1
  rm -f "$work_dir/smtp.port" "$work_dir/smtp.count"
  if [[ $relay == smtp-sink ]]; then
    # A free port from the kernel; smtp-sink takes no port 0. -c prints its running counters
    # ("sess=N quit=N mesg=N", CR-separated) to stdout; -u is required when run as root.
    smtp_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    local user=()
    ((EUID == 0)) && user=(-u nobody)
    taskset -c "$SMTP_CPU" "$SMTP_SINK" "${user[@]}" -c "127.0.0.1:$smtp_port" 1000 \
      >"$work_dir/smtp.log" 2>&1 &
    smtp_pid=$!
    local tries
    for ((tries = 0; tries < 100; tries++)); do
      (echo >"/dev/tcp/127.0.0.1/$smtp_port") 2>/dev/null && return 0
      kill -0 "$smtp_pid" 2>/dev/null || break
      sleep 0.1
    done
    cat "$work_dir/smtp.log" >&3
    die "smtp-sink did not start"
  fi
  cat >"$work_dir/smtp_sink.py" <<'EOF'
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from smtp_server import SmtpServer

port_file, count_file = sys.argv[2], sys.argv[3]
server = SmtpServer("accept").start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


write(port_file, f"127.0.0.1:{server.port}\n")
total = 0
while True:
    with server._cond:  # drop the stored messages, keep the count: memory stays flat
        total += len(server.messages)
        server.messages.clear()
        server.rcpt_attempts.clear()
    write(count_file, f"{total}\n")
    if stop.wait(0.2):
        break
server.stop()
EOF
  taskset -c "$SMTP_CPU" "$PYTHON" "$work_dir/smtp_sink.py" "$repo_dir/tests/integration" \
    "$work_dir/smtp.port" "$work_dir/smtp.count" >"$work_dir/smtp.log" 2>&1 &
  smtp_pid=$!
  local tries
  for ((tries = 0; tries < 100; tries++)); do
    smtp_port=$(port_from_file "$work_dir/smtp.port") && return 0
    kill -0 "$smtp_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work_dir/smtp.log" >&3
  die "the SMTP server did not start"
}

smtp_count() {
  local count=0
  if [[ $relay == smtp-sink ]]; then
    count=$(tr '\r' '\n' <"$work_dir/smtp.log" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
  else
    IFS= read -r count <"$work_dir/smtp.count" || count=0
  fi
  printf '%s\n' "${count:-0}"
}

# Jobs in store $1 by state: "queued sending retrying sent failed total", read with a second
# connection (WAL: it does not block squalld's writer).
store_counts() {
  "$PYTHON" - "$1" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
counts = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
states = ["queued", "sending", "retrying", "sent", "failed"]
print(*[counts.get(s, 0) for s in states], sum(counts.values()))
EOF
}

# squalld with a fresh store for connection count $1.
start_squalld() {
  local connections=$1 tries
  local config=$work_dir/squalld-$relay-c$connections.toml
  store=$work_dir/jobs-$relay-c$connections.db
  email_bench_config "$config" relay="127.0.0.1:$smtp_port" store="$store" \
    durability="$DURABILITY" sends="$MAX_SENDS" smtp_connections="$SMTP_CONNECTIONS"
  timeout 10 "$SQUALLD" --config "$config" --check-config >"$work_dir/squalld.check.log" 2>&1 || {
    cat "$work_dir/squalld.check.log" >&3
    die "squalld rejected $config"
  }
  rm -f "$work_dir/squalld.port"
  taskset -c "$SERVER_CPU" "$SQUALLD" --config "$config" --listen 127.0.0.1:0 \
    --port-file "$work_dir/squalld.port" >>"$work_dir/squalld.stdout.log" \
    2>>"$work_dir/squalld.stderr.log" &
  squalld_pid=$!
  squalld_port=""
  for ((tries = 0; tries < 100; tries++)); do
    squalld_port=$(port_from_file "$work_dir/squalld.port") && break
    kill -0 "$squalld_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $squalld_port ]] || {
    tail -n 20 "$work_dir/squalld.stderr.log" >&3
    die "squalld wrote no port to --port-file"
  }
  local task affinity
  for task in /proc/"$squalld_pid"/task/*; do
    affinity=$(taskset -pc "${task##*/}" | sed 's/.*: *//')
    [[ $affinity == "$SERVER_CPU" ]] || die "squalld thread ${task##*/} runs on CPUs '$affinity'"
  done
}

# One POST /email by curl: must be 202, and the job must reach the SMTP server (the wiring works).
sanity_check() {
  local before status tries
  before=$(smtp_count)
  status=$(curl -s -o "$work_dir/sanity.json" -w '%{http_code}' --max-time 5 \
    -H 'Content-Type: application/json' \
    --data '{"to": "sanity@example.com", "subject": "sanity", "text": "sanity"}' \
    "http://127.0.0.1:$squalld_port/email") || die "curl could not POST /email"
  [[ $status == 202 ]] || die "POST /email answered $status: $(cat "$work_dir/sanity.json")"
  for ((tries = 0; tries < 100; tries++)); do
    (($(smtp_count) > before)) && return 0
    sleep 0.1
  done
  tail -n 20 "$work_dir/squalld.stderr.log" >&3
  die "the sanity job was accepted but not delivered within 10s"
}

# ---------------------------------------------------------------------------------------------
# The runs.

info=$work_dir/info.tsv
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  printf 'command\t%s\n' "$command_line"
  printf 'machine\t%s CPUs (%s), Linux %s\n' "$cpus" \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" "$(uname -r)"
  printf 'filesystem\t%s\n' "$(df -T "$work_dir" | awk 'NR == 2 { print $2 " on " $1 }')"
  printf 'wrk\t%s\n' "$("$WRK" -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
  printf 'squalld\t%s\n' "$(timeout 5 "$SQUALLD" --version 2>&1 | head -n 1)"
  git_revision=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo "no commit")
  [[ -z $(git -C "$repo_dir" status --porcelain 2>/dev/null) ]] || git_revision+=" + uncommitted changes"
  printf 'revision\t%s\n' "$git_revision"
} >"$info"
runs=$work_dir/runs.tsv
: >"$runs"

log "work dir $work_dir; squalld on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU, SMTP on CPU $SMTP_CPU"
for relay in "${relays[@]}"; do
  start_smtp "$relay"
  log "SMTP server ($relay, accepting) on 127.0.0.1:$smtp_port"

  for connections in "${connection_counts[@]}"; do
    start_squalld "$connections"
    sanity_check
    url="http://127.0.0.1:$squalld_port/email"
    log "-c $connections: squalld pid $squalld_pid on 127.0.0.1:$squalld_port, store $store"
    # What else runs on the shared machine (this script's own processes left out).
    printf 'load %s c%s\t%s\n' "$relay" "$connections" "$(machine_load $$)" >>"$info"
    if [[ $WARMUP != 0 && $WARMUP != 0[smh] ]]; then
      run_client "$work_dir/wrk.warmup.$relay-c$connections.txt" "$work_dir/wrk.warmup.$relay-c$connections.txt" "$work_dir/wrk.warmup.$relay-c$connections.time" \
        taskset -c "$CLIENT_CPU" "$WRK" -t1 -c "$connections" -d "$WARMUP" --latency \
        -s "$bench_dir/email.lua" "$url" || die "the warm-up wrk run failed"
    fi

    read -r _ _ _ sent_before _ total_before <<<"$(store_counts "$store")"
    delivered_before=$(smtp_count)
    squalld_before=$(cpu_ticks "$squalld_pid")
    smtp_before=$(cpu_ticks "$smtp_pid")
    server_busy=$(cpu_busy_ticks "$SERVER_CPU")
    client_busy=$(cpu_busy_ticks "$CLIENT_CPU")
    started_ns=$(date +%s%N)
    output=$work_dir/wrk.$relay-c$connections.txt
    if ! run_client "$output" "$output" "$output.time" taskset -c "$CLIENT_CPU" "$WRK" -t1 \
      -c "$connections" -d "$DURATION" --latency -s "$bench_dir/email.lua" "$url"; then
      cat "$output" >&3
      die "wrk failed (-c $connections)"
    fi
    wall=$(awk -v a="$started_ns" -v b="$(date +%s%N)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    squalld_ticks=$(($(cpu_ticks "$squalld_pid") - squalld_before))
    smtp_ticks=$(($(cpu_ticks "$smtp_pid") - smtp_before))
    server_busy=$(($(cpu_busy_ticks "$SERVER_CPU") - server_busy))
    client_busy=$(($(cpu_busy_ticks "$CLIENT_CPU") - client_busy))
    wrk_cpu=$(awk '{ print $1 + $2 }' "$output.time")
    kill -0 "$squalld_pid" 2>/dev/null || die "squalld died during the run (-c $connections)"
    grep -q '^WRK_JSON ' "$output" || {
      cat "$output" >&3
      die "wrk printed no results (-c $connections)"
    }
    drain_started_ns=$(date +%s%N)
    drain_ticks=$(cpu_ticks "$squalld_pid")
    read -r _ _ _ sent_end _ total_end <<<"$(store_counts "$store")"
    delivered_end=$(smtp_count)
    log "-c $connections: run done; measuring the sends for up to ${SEND_WAIT}s"
    # Samples until SEND_WAIT is over or nothing is left to send: the rate is taken over the time
    # there was a backlog.
    while :; do
      sleep 0.5
      read -r _ _ _ sent_later _ total_later <<<"$(store_counts "$store")"
      drain_ns=$(($(date +%s%N) - drain_started_ns))
      ((sent_later < total_later && drain_ns < SEND_WAIT * 1000000000)) || break
    done
    drain_seconds=$(awk -v n="$drain_ns" 'BEGIN { printf "%.3f", n / 1e9 }')
    drain_ticks=$(($(cpu_ticks "$squalld_pid") - drain_ticks))
    curl -s --max-time 5 "http://127.0.0.1:$squalld_port/metrics" >"$work_dir/metrics.$relay-c$connections.txt" || true
    stop_process "$squalld_pid" squalld
    squalld_pid=""
    # connections, wrk output, wall s, wrk CPU s, squalld ticks, SMTP ticks, server CPU busy ticks,
    # client CPU busy ticks, jobs in the store before / at the end / after the measured sends,
    # sent ditto, messages the SMTP server got before / at the end, relay, seconds the sends were
    # measured over, squalld's CPU ticks meanwhile.
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$connections" \
      "${output##*/}" "$wall" "$wrk_cpu" "$squalld_ticks" "$smtp_ticks" "$server_busy" \
      "$client_busy" "$total_before" "$total_end" "$total_later" "$sent_before" "$sent_end" \
      "$sent_later" "$delivered_before" "$delivered_end" "$relay" "$drain_seconds" "$drain_ticks" >>"$runs"
    log "-c $connections: $(grep '^WRK_JSON ' "$output" | cut -c10-)"
    log "-c $connections: $((sent_later - sent_end)) sent in ${drain_seconds}s after the run ($relay)"
  done

  stop_process "$smtp_pid" "the SMTP server"
  smtp_pid=""
done
mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/email-latest-raw"
cp -r "$work_dir" "$OUT_DIR/email-latest-raw"
rm -f "$OUT_DIR"/email-latest-raw/*.db "$OUT_DIR"/email-latest-raw/*.db-*

"$PYTHON" - "$work_dir" "$clock_ticks" "$SEND_WAIT" "$OUT_DIR/email-latest.md" <<'EOF'
import json, sys
from pathlib import Path

work, ticks, send_wait, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
info = dict(line.split("\t", 1) for line in (work / "info.tsv").read_text().splitlines())
loads = [(key[len("load "):], value) for key, value in info.items() if key.startswith("load ")]
rows = []
for line in (work / "runs.tsv").read_text().splitlines():
    f = line.split("\t")
    conns, output = int(f[0]), f[1]
    wall, wrk_cpu = float(f[2]), float(f[3])
    squalld_s, smtp_s = int(f[4]) / ticks, int(f[5]) / ticks
    server_busy, client_busy = int(f[6]) / ticks, int(f[7]) / ticks
    total_before, total_end, total_later = map(int, f[8:11])
    sent_before, sent_end, sent_later = map(int, f[11:14])
    wrk_line = next(l for l in (work / output).read_text().splitlines() if l.startswith("WRK_JSON "))
    w = json.loads(wrk_line[len("WRK_JSON "):])
    seconds = w["duration_us"] / 1e6
    e = w["errors"]
    accepted = total_end - total_before
    delivered_before, delivered_end = int(f[14]), int(f[15])
    relay, drain_seconds, drain_cpu = f[16], float(f[17]), int(f[18]) / ticks
    rows.append({
        "relay": relay,
        "c": conns,
        "rps": w["requests"] / seconds,
        "p50": w["latency_us"]["p50"] / 1000,
        "p99": w["latency_us"]["p99"] / 1000,
        "max": w["latency_us"]["max"] / 1000,
        "requests": w["requests"],
        "status": e["status"],
        "socket": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "accepted": accepted,
        "sent_run": sent_end - sent_before,
        "smtp_run": delivered_end - delivered_before,
        "send_rate": (sent_later - sent_end) / drain_seconds if drain_seconds else 0,
        "drain_seconds": drain_seconds,
        "cpu_per_send_us": drain_cpu / (sent_later - sent_end) * 1e6 if sent_later > sent_end else 0,
        "backlog": total_later - sent_later,
        "squalld_cpu": squalld_s / wall,
        "smtp_cpu": smtp_s / wall,
        "wrk_cpu": wrk_cpu / wall,
        "server_busy": server_busy / wall,
        "client_busy": client_busy / wall,
    })

lines = [
    "# POST /email: durable accepts per second",
    "",
    f"- date: {info['date']}",
    f"- command: `{info['command']}`",
    f"- machine: {info['machine']}; store on {info['filesystem']}",
    f"- {info['squalld']}, revision {info['revision']}; {info['wrk']}",
] + [f"- machine load before the {run} run: {load}" for run, load in loads] + [
    "",
    "| relay | wrk -c | requests/s | p50 ms | p99 ms | max ms | requests | non-2xx "
    "| socket errors | accepted (store) | sent during run (store / SMTP) | sends/s after "
    "| sends/s ÷ requests/s | squalld CPU µs per send | not yet sent after |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lines.append(
        f"| {r['relay']} | {r['c']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
        f"| {r['max']:.1f} | {r['requests']:,} | {r['status']:,} | {r['socket']:,} "
        f"| {r['accepted']:,} | {r['sent_run']:,} / {r['smtp_run']:,} | {r['send_rate']:,.0f} "
        f"| {r['send_rate'] / r['rps']:.3f} | {r['cpu_per_send_us']:,.0f} | {r['backlog']:,} |")
lines += [
    "",
    "CPU during the measured run (share of one CPU, over the wall-clock time):",
    "",
    "| relay | wrk -c | squalld | wrk | SMTP server | server CPU busy | client CPU busy |",
    "|---|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lines.append(f"| {r['relay']} | {r['c']} | {r['squalld_cpu']:.0%} | {r['wrk_cpu']:.0%} | {r['smtp_cpu']:.0%} "
                 f"| {r['server_busy']:.0%} | {r['client_busy']:.0%} |")
lines += [
    "",
    "Target (issue 3): >= 20,000 accepts/s with p99 < 20 ms. "
    "non-2xx = wrk's status errors (answers >= 400, e.g. 503). "
    "accepted = jobs the store gained during the measured run (a 202 each; it can exceed wrk's "
    "count by the requests in flight when wrk stopped). sent during run = jobs marked sent in "
    "the store / messages the SMTP server received, during the run (oldest first, so warm-up "
    "jobs included); sends/s after = jobs marked sent per second after the run (wrk stopped), "
    "over at most SEND_WAIT s, until nothing was left to send; not yet sent after = every job "
    "in the store not sent at the end of that; squalld CPU µs per send = its CPU time (all "
    "threads) over that time, divided by the sends. Sends: at most [jobs] max_concurrent_sends at "
    "once, over at most [smtp] connections kept connections (a squalld from before [smtp] "
    "connections opens one per message).",
    "",
]
text = "\n".join(lines)
Path(out).write_text(text)
print(text)
EOF
log "report: $OUT_DIR/email-latest.md"

#!/usr/bin/env bash
# bench/send_callgrind.sh: instructions squalld executes per email sent, on every thread, counted
# by valgrind's callgrind, which repeats to within a fraction of a percent where CPU seconds on a
# shared machine do not.
#
# Each squalld given runs under `valgrind --tool=callgrind --separate-threads=yes` with Postfix's
# smtp-sink as the relay ([smtp] connections = SENDS, [jobs] max_concurrent_sends = SENDS,
# durability = DURABILITY). The relay is stopped (SIGSTOP) while a client (Python, keep-alive)
# posts SENDS_COUNT emails with the request body of bench/email.lua: the kernel completes the
# relay's TCP handshakes, nobody greets, so the first sends wait and the backlog builds up in the
# store. Then the counters are zeroed (callgrind_control -z), the relay continues (SIGCONT), the
# backlog drains until the store has every job sent, and the counters are dumped
# (callgrind_control -d). The counted part is the drain alone: claims, the sends over kept
# connections (their opening included), the outcomes' commits.
#
# Reported per squalld: instructions per send on all threads, on the loop thread (the main
# thread), on the store thread (the one running SQLite), on the send threads (libuv's pool:
# those running libcurl) and on any other; and for the last binary each of those threads' most
# expensive functions, inclusive and exclusive, in OUT_DIR/send-callgrind.md (the callgrind
# files in OUT_DIR/send-callgrind/).
#
# Usage:  bench/send_callgrind.sh [squalld ...]    (default: build/squalld)
# Environment (defaults in brackets):
#   SENDS_COUNT   emails accepted, then sent while counted [2000]
#   SENDS         [jobs] max_concurrent_sends and [smtp] connections [2]; SMTP_CONNECTIONS=""
#                 leaves [smtp] connections out (for a squalld from before it existed)
#   SMTP_CONNECTIONS  [smtp] connections [SENDS]
#   CONNECTIONS   client connections for the accepts [8]
#   DURABILITY    [jobs] durability: full or normal [full]
#   OUT_DIR       where send-callgrind.md and the callgrind files go [bench/out]
#   SMTP_SINK     the smtp-sink program [/usr/sbin/smtp-sink]
#   PYTHON        the Python used [/usr/bin/python3]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")

SENDS_COUNT=${SENDS_COUNT:-2000}
SENDS=${SENDS:-2}
SMTP_CONNECTIONS=${SMTP_CONNECTIONS-$SENDS}
CONNECTIONS=${CONNECTIONS:-8}
DURABILITY=${DURABILITY:-full}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
SMTP_SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}
PYTHON=${PYTHON:-/usr/bin/python3}

exec 3>&2
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-send-callgrind: %s\n' "$*" >&3; }

binaries=("$@")
((${#binaries[@]} > 0)) || binaries=("$repo_dir/build/squalld")
for number in SENDS_COUNT SENDS CONNECTIONS ${SMTP_CONNECTIONS:+SMTP_CONNECTIONS}; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
((SENDS_COUNT > 0 && SENDS > 0 && CONNECTIONS > 0)) ||
  die "SENDS_COUNT, SENDS and CONNECTIONS must be above 0"
[[ $DURABILITY == full || $DURABILITY == normal ]] || die "DURABILITY must be full or normal"
for program in valgrind callgrind_control callgrind_annotate "$PYTHON"; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install valgrind)"
done
[[ -x $SMTP_SINK ]] || die "no smtp-sink at $SMTP_SINK (apt-get install postfix)"
for index in "${!binaries[@]}"; do
  binary=${binaries[index]}
  [[ -x $binary ]] || die "no squalld at $binary"
  binaries[index]=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
done

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-bench-send-callgrind.XXXXXX")
squalld_pid="" relay_pid=""

stop_relay() {
  [[ -z $relay_pid ]] && return 0
  kill -CONT "$relay_pid" 2>/dev/null || true
  kill -TERM "$relay_pid" 2>/dev/null || true
  wait "$relay_pid" 2>/dev/null || true
  relay_pid=""
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # The dump is taken: nothing more is wanted from squalld.
  [[ -z $squalld_pid ]] || { kill -KILL "$squalld_pid" 2>/dev/null || true; wait "$squalld_pid" 2>/dev/null || true; }
  stop_relay
  ((status == 0)) || log "logs of the failed run are in $work_dir"
  ((status != 0)) || rm -rf "$work_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# Jobs marked sent in store $1, read with a second connection (WAL: squalld's writer goes on).
sent_count() {
  "$PYTHON" - "$1" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
print(db.execute("SELECT count(*) FROM jobs WHERE state = 'sent'").fetchone()[0])
EOF
}

# The runner's store transactions so far (squall_jobs_runner_commits_total), from /metrics on
# port $1.
commits() {
  curl -s --max-time 60 "http://127.0.0.1:$1/metrics" |
    sed -n 's/^squall_jobs_runner_commits_total \([0-9]*\).*/\1/p'
}

# Which part of squalld a callgrind file's thread is: the main thread runs the loop; the store
# thread runs SQLite; the send threads (libuv's pool) libcurl's transfers.
thread_kind() {
  local file=$1
  if [[ $file == *-01 ]]; then
    echo loop
  elif grep -q -m1 'curl_easy_perform' "$file"; then
    echo send
  elif grep -q -m1 'sqlite3_step' "$file"; then
    echo store
  else
    echo other
  fi
}

results=$work_dir/results.tsv
: >"$results"
for index in "${!binaries[@]}"; do
  binary=${binaries[index]}
  run_dir=$work_dir/run$index
  mkdir -p "$run_dir"
  relay_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  user=()
  ((EUID == 0)) && user=(-u nobody)
  "$SMTP_SINK" "${user[@]}" "127.0.0.1:$relay_port" 1000 >"$run_dir/relay.log" 2>&1 &
  relay_pid=$!
  for ((tries = 0; tries < 100; tries++)); do
    (echo >"/dev/tcp/127.0.0.1/$relay_port") 2>/dev/null && break
    kill -0 "$relay_pid" 2>/dev/null || die "smtp-sink did not start: $(cat "$run_dir/relay.log")"
    sleep 0.1
  done
  kill -STOP "$relay_pid"
  # The stopped relay holds the first sends for as long as it is stopped: their SMTP time-outs
  # and lease outlast it.
  email_bench_config "$run_dir/squalld.toml" relay="127.0.0.1:$relay_port" \
    store="$run_dir/jobs.db" durability="$DURABILITY" sends="$SENDS" \
    smtp_connections="$SMTP_CONNECTIONS" smtp_connect_timeout=10m smtp_timeout=10m lease=1h \
    max_connections="" keepalive="" max_queued_bytes=""
  (cd "$run_dir" && exec valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$run_dir/callgrind.out" "$binary" --config "$run_dir/squalld.toml" \
    --listen 127.0.0.1:0 --port-file "$run_dir/squalld.port" >"$run_dir/squalld.log" 2>&1) &
  squalld_pid=$!
  port=""
  for ((tries = 0; tries < 600; tries++)); do
    port=$(port_from_file "$run_dir/squalld.port") && break
    kill -0 "$squalld_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $port ]] || { tail -n 20 "$run_dir/squalld.log" >&3; die "$binary wrote no port"; }
  log "$binary: accepting $SENDS_COUNT emails (the relay is stopped)"
  "$PYTHON" "$bench_dir/email_post.py" "$port" "$SENDS_COUNT" "$CONNECTIONS" || die "the accepts failed"
  sent=$(sent_count "$run_dir/jobs.db")
  ((sent == 0)) || die "$sent jobs were sent while the relay was stopped"
  commits_before=$(commits "$port")
  callgrind_control -z "$squalld_pid" >/dev/null
  log "$binary: counting the drain of $SENDS_COUNT sends"
  started=$(date +%s)
  kill -CONT "$relay_pid"
  while :; do
    sent=$(sent_count "$run_dir/jobs.db")
    ((sent >= SENDS_COUNT)) && break
    kill -0 "$squalld_pid" 2>/dev/null || die "squalld died during the drain"
    (($(date +%s) - started < 1800)) || die "only $sent of $SENDS_COUNT sent after 30 minutes"
    sleep 0.5
  done
  callgrind_control -d "$squalld_pid" >/dev/null
  commits_counted=$(($(commits "$port") - commits_before))
  kill -KILL "$squalld_pid" 2>/dev/null || true
  wait "$squalld_pid" 2>/dev/null || true
  squalld_pid=""
  stop_relay
  # The dump after zeroing: one file per thread, callgrind.out.1-<thread>.
  declare -A ir_by_kind=([loop]=0 [store]=0 [send]=0 [other]=0)
  busiest_send="" busiest_send_ir=0 store_file=""
  for file in "$run_dir"/callgrind.out.1-*; do
    ir=$(sed -n 's/^summary: //p' "$file")
    kind=$(thread_kind "$file")
    ir_by_kind[$kind]=$((ir_by_kind[$kind] + ir))
    if [[ $kind == send ]] && ((ir > busiest_send_ir)); then
      busiest_send=$file busiest_send_ir=$ir
    fi
    [[ $kind == store ]] && store_file=$file
  done
  total=$((ir_by_kind[loop] + ir_by_kind[store] + ir_by_kind[send] + ir_by_kind[other]))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$binary" "$total" "${ir_by_kind[loop]}" \
    "${ir_by_kind[store]}" "${ir_by_kind[send]}" "${ir_by_kind[other]}" "${commits_counted:-0}" \
    >>"$results"
  : >"$run_dir/top.txt"
  for pair in "loop:$run_dir/callgrind.out.1-01" "send (the busiest):$busiest_send" \
    "store:$store_file"; do
    name=${pair%%:*} file=${pair#*:}
    [[ -n $file ]] || continue
    for inclusive in yes no; do
      {
        printf '\n%s thread, %s:\n\n```\n' "$name" \
          "$([[ $inclusive == yes ]] && echo inclusive || echo exclusive)"
        callgrind_annotate --inclusive=$inclusive --threshold=100 --auto=no "$file" 2>/dev/null |
          sed -n '/file:function/,$p' | sed -n '3,27p' | cut -c1-160
        printf '```\n'
      } >>"$run_dir/top.txt"
    done
  done
  mkdir -p "$OUT_DIR/send-callgrind"
  for file in "$run_dir"/callgrind.out.1-*; do
    cp "$file" "$OUT_DIR/send-callgrind/run$index-${file##*/}"
  done
done

{
  printf '# Sends: instructions per send (callgrind)\n\n'
  printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  # shellcheck disable=SC2016 # The backquotes are Markdown.
  printf -- '- command: `SENDS_COUNT=%s SENDS=%s SMTP_CONNECTIONS=%s CONNECTIONS=%s DURABILITY=%s %s %s`\n\n' \
    "$SENDS_COUNT" "$SENDS" "$SMTP_CONNECTIONS" "$CONNECTIONS" "$DURABILITY" "$0" "${binaries[*]}"
  printf '| squalld | all threads Ir per send | loop | store | send threads | other | store commits per send |\n'
  printf '|---|---:|---:|---:|---:|---:|---:|\n'
  while IFS=$'\t' read -r binary total loop store send other rounds; do
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$binary" $((total / SENDS_COUNT)) \
      $((loop / SENDS_COUNT)) $((store / SENDS_COUNT)) $((send / SENDS_COUNT)) \
      $((other / SENDS_COUNT)) "$(awk -v c="$rounds" -v n="$SENDS_COUNT" 'BEGIN { printf "%.3f", c / n }')"
  done <"$results"
  printf '\nThe most expensive functions of the last binary (%s sends):\n' "$SENDS_COUNT"
  cat "$work_dir/run$((${#binaries[@]} - 1))/top.txt"
} >"$OUT_DIR/send-callgrind.md"
cat "$OUT_DIR/send-callgrind.md"

#!/usr/bin/env bash
# bench/email_callgrind.sh: instructions the loop thread executes per accepted POST /email,
# counted by valgrind's callgrind, which repeats to within a fraction of a percent where CPU
# seconds on a shared machine do not.
#
# Each squalld given runs under `valgrind --tool=callgrind --separate-threads=yes` with the
# request body of bench/email.lua, [jobs] durability = DURABILITY and an SMTP relay that accepts
# TCP connections and never answers: the first max_concurrent_sends (2) sends wait on it for the
# whole run, so the runner's later pokes return at once and what is counted is the accept path
# (HTTP, access checks, rate limits, validation, the stored form, the hand-off to the store
# thread and the 202). A client (Python, keep-alive, CONNECTIONS connections) sends WARMUP
# requests, the counters are zeroed (callgrind_control -z), it sends REQUESTS more, and the
# counters are dumped (callgrind_control -d); every answer must be a 202. Reported: instructions
# per accept on the loop thread (the main thread) and on the store thread, and the loop thread's
# ten most expensive functions (inclusive) for the last binary, with the store thread's, in
# OUT_DIR/email-callgrind.md; each thread's callgrind file is kept in
# OUT_DIR/email-callgrind/ (loop-N, store-N) for callgrind_annotate.
#
# Usage:  bench/email_callgrind.sh [squalld ...]    (default: build/squalld)
# Environment (defaults in brackets):
#   REQUESTS      counted requests [2000]
#   WARMUP        requests before the counters are zeroed [300]
#   CONNECTIONS   client connections [8]
#   DURABILITY    [jobs] durability: full or normal [full]
#   OUT_DIR       where email-callgrind.md and the callgrind files go [bench/out]
#   PYTHON        the Python used [/usr/bin/python3]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")

REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-300}
CONNECTIONS=${CONNECTIONS:-8}
DURABILITY=${DURABILITY:-full}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
PYTHON=${PYTHON:-/usr/bin/python3}

exec 3>&2
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-email-callgrind: %s\n' "$*" >&3; }

binaries=("$@")
((${#binaries[@]} > 0)) || binaries=("$repo_dir/build/squalld")
for number in REQUESTS WARMUP CONNECTIONS; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
((REQUESTS > 0 && CONNECTIONS > 0)) || die "REQUESTS and CONNECTIONS must be above 0"
[[ $DURABILITY == full || $DURABILITY == normal ]] || die "DURABILITY must be full or normal"
for program in valgrind callgrind_control callgrind_annotate "$PYTHON"; do
  command -v "$program" >/dev/null || die "$program is missing (apt-get install valgrind)"
done
for index in "${!binaries[@]}"; do
  binary=${binaries[index]}
  [[ -x $binary ]] || die "no squalld at $binary"
  binaries[index]=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
done

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-bench-email-callgrind.XXXXXX")
squalld_pid="" relay_pid=""

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # The dump is taken; a drain would wait for the sends that hang on the silent relay.
  [[ -z $squalld_pid ]] || { kill -KILL "$squalld_pid" 2>/dev/null || true; wait "$squalld_pid" 2>/dev/null || true; }
  [[ -z $relay_pid ]] || { kill -TERM "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; }
  ((status == 0)) || log "logs of the failed run are in $work_dir"
  ((status != 0)) || rm -rf "$work_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# The relay that never answers: the kernel completes the handshakes, nobody reads.
"$PYTHON" -c '
import signal, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d\n" % s.getsockname()[1])
import os
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
signal.sigwait([signal.SIGTERM, signal.SIGINT])
' "$work_dir/relay.port" &
relay_pid=$!
for ((tries = 0; tries < 100; tries++)); do
  relay_port=$(port_from_file "$work_dir/relay.port") && break
  sleep 0.1
done
[[ -n ${relay_port:-} ]] || die "the silent relay did not start"

results=$work_dir/results.tsv
: >"$results"
for index in "${!binaries[@]}"; do
  binary=${binaries[index]}
  run_dir=$work_dir/run$index
  mkdir -p "$run_dir"
  # The sends that wait on the silent relay hold their lease and their SMTP time-out for the
  # whole run; squalld's limits for a server under wrk are not wanted here.
  email_bench_config "$run_dir/squalld.toml" relay="127.0.0.1:$relay_port" \
    store="$run_dir/jobs.db" durability="$DURABILITY" smtp_timeout=10m lease=1h \
    thread_pool_size="" max_connections="" keepalive="" max_queued="" max_queued_bytes=""
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
  log "$binary: warm-up ($WARMUP requests)"
  ((WARMUP == 0)) || "$PYTHON" "$bench_dir/email_post.py" "$port" "$WARMUP" "$CONNECTIONS" ||
    die "the warm-up failed"
  callgrind_control -z "$squalld_pid" >/dev/null
  log "$binary: counting $REQUESTS requests"
  "$PYTHON" "$bench_dir/email_post.py" "$port" "$REQUESTS" "$CONNECTIONS" || die "the counted run failed"
  callgrind_control -d "$squalld_pid" >/dev/null
  kill -KILL "$squalld_pid" 2>/dev/null || true
  wait "$squalld_pid" 2>/dev/null || true
  squalld_pid=""
  # The dump after zeroing: one file per thread, callgrind.out.<dump>-<thread>; thread 01 is
  # the main thread, which runs the loop.
  loop_files=("$run_dir"/callgrind.out.*-01)  # Sorted: the numbered dump (.1-01) comes last.
  loop_file=${loop_files[-1]}
  store_ir=0 store_file=""
  for file in "$run_dir"/callgrind.out.*-*; do
    [[ $file == "${loop_file%-01}"-* ]] || continue
    [[ $file == "$loop_file" ]] && continue
    # The store thread executed the most among the others (SQLite, the fsyncs).
    ir=$(sed -n 's/^summary: //p' "$file")
    ((ir > store_ir)) && store_ir=$ir store_file=$file
  done
  loop_ir=$(sed -n 's/^summary: //p' "$loop_file")
  printf '%s\t%s\t%s\n' "$binary" "$loop_ir" "$store_ir" >>"$results"
  callgrind_annotate --inclusive=yes "$loop_file" 2>/dev/null | sed -n '/^Ir/,$p' | head -n 40 \
    >"$run_dir/top.txt" || true
  if [[ -n $store_file ]]; then
    callgrind_annotate --inclusive=yes "$store_file" 2>/dev/null | sed -n '/^Ir/,$p' |
      head -n 60 >"$run_dir/store-top.txt" || true
  fi
  mkdir -p "$OUT_DIR/email-callgrind"
  cp "$loop_file" "$OUT_DIR/email-callgrind/loop-$index.callgrind"
  [[ -z $store_file ]] || cp "$store_file" "$OUT_DIR/email-callgrind/store-$index.callgrind"
done

{
  printf '# POST /email: instructions per accept (callgrind)\n\n'
  printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  # shellcheck disable=SC2016 # The backquotes are Markdown.
  printf -- '- command: `REQUESTS=%s WARMUP=%s CONNECTIONS=%s DURABILITY=%s %s %s`\n\n' \
    "$REQUESTS" "$WARMUP" "$CONNECTIONS" "$DURABILITY" "$0" "${binaries[*]}"
  printf '| squalld | loop thread Ir per accept | busiest other thread Ir per accept |\n'
  printf '|---|---:|---:|\n'
  while IFS=$'\t' read -r binary loop_ir store_ir; do
    printf '| %s | %s | %s |\n' "$binary" $((loop_ir / REQUESTS)) $((store_ir / REQUESTS))
  done <"$results"
  printf '\nLoop thread, inclusive, last binary (%s requests):\n\n```\n' "$REQUESTS"
  cat "$work_dir/run$((${#binaries[@]} - 1))/top.txt"
  printf '```\n'
  last_run=$work_dir/run$((${#binaries[@]} - 1))
  if [[ -s $last_run/store-top.txt ]]; then
    printf '\nStore thread (the busiest other thread), inclusive, last binary:\n\n```\n'
    cat "$last_run/store-top.txt"
    printf '```\n'
  fi
} >"$OUT_DIR/email-callgrind.md"
cat "$OUT_DIR/email-callgrind.md"

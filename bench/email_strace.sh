#!/usr/bin/env bash
# bench/email_strace.sh: how long the job store's fsyncs take, per thread and per file, during
# one POST /email run at c=256: squalld (bench/run_email.sh's configuration, durability "full",
# a relay that refuses connections, so no sends) on CPU 0, a 2 s warm-up, then `strace -f -y -T
# -e trace=fdatasync,fsync` attached during a 10 s wrk run on CPU 1. bench/fsync_summary.py
# then tells the store thread (the one that syncs the -wal file) from the others, and adds the
# syncs of a checkpoint run inside a commit to that commit. Adds strace's own cost to squalld.
#
# Usage:  bench/email_strace.sh squalld OUT_PREFIX
# Writes OUT_PREFIX.strace, OUT_PREFIX.wrk (wrk --latency), OUT_PREFIX.metrics (the store's
# /metrics lines) and prints the summary.
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-email-strace: %s\n' "$*" >&2; }
(($# == 2)) || die "usage: $0 squalld OUT_PREFIX"
binary=$1 out=$2
[[ -x $binary ]] || die "no squalld at $binary"
work=$(mktemp -d /tmp/squall-bench-strace.XXXXXX)
pid="" strace_pid=""
cleanup() {
  [[ -z $strace_pid ]] || kill -INT "$strace_pid" 2>/dev/null || true
  [[ -z $pid ]] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; } || true
  rm -rf "$work"
}
trap cleanup EXIT

# Port 9 (discard) on 127.0.0.1: nothing listens, every send fails at once.
email_bench_config "$work/squalld.toml" relay=127.0.0.1:9 store="$work/jobs.db"
taskset -c 0 "$binary" --config "$work/squalld.toml" --listen 127.0.0.1:0 \
  --port-file "$work/port" 2>"$work/stderr" &
pid=$!
port=""
for ((tries = 0; tries < 100; tries++)); do
  port=$(port_from_file "$work/port") && break
  sleep 0.1
done
[[ -n $port ]] || die "squalld wrote no port to --port-file: $(tail -n 5 "$work/stderr")"
cd "$bench_dir"
taskset -c 1 wrk -t1 -c256 -d2s -s email.lua "http://127.0.0.1:$port/email" >/dev/null
strace -f -y -T -tt -e trace=fdatasync,fsync -o "$out.strace" -p "$pid" 2>/dev/null &
strace_pid=$!
sleep 1  # strace attaches to every thread
taskset -c 1 wrk -t1 -c256 -d10s --latency -s email.lua "http://127.0.0.1:$port/email" >"$out.wrk"
kill -INT "$strace_pid"
wait "$strace_pid" || true
strace_pid=""
curl -s "http://127.0.0.1:$port/metrics" | grep -E "^squall_jobs_store_|^squall_jobs_runner_commits" \
  >"$out.metrics" || true
grep -E "Requests/sec|  50%|  99%" "$out.wrk"
/usr/bin/python3 "$bench_dir/fsync_summary.py" "$out.strace"

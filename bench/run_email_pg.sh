#!/usr/bin/env bash
# bench/run_email_pg.sh: durable POST /email accepts per second on PostgreSQL against SQLite, and
# with two squalld nodes on one PostgreSQL database against one node, in the same run.
#
# Three variants per round, ROUNDS rounds (medians reported), each on a fresh store:
#   sqlite  one squalld, [jobs] store = a SQLite file (the default store)
#   pg      one squalld, [jobs] store = a private PostgreSQL server (scripts/pg-test-server)
#   pg x2   two squalld on the same database, each loaded by its own wrk with half the
#           connections; the figures are the sum of both (requests/s) and the worse p99
# [jobs] durability = "full" everywhere: SQLite fsyncs each group commit, PostgreSQL runs with
# synchronous_commit = on (and its default fsync), so every 202 is a commit on disk.
# The server side is pinned to SERVER_CPU: squalld (both nodes) and the PostgreSQL server, so
# that SQLite's fsyncs in squalld and PostgreSQL's in its own processes count on the same core.
# wrk (-t1 per node) and the SMTP sink run on CLIENT_CPU. On a two-core machine the two nodes
# share one core with the database: the x2 figure shows what sharing one queue costs, not what a
# second machine would add.
#
# Usage:  bench/run_email_pg.sh
# Environment: SQUALLD [build/squalld], DURATION [10s], WARMUP [2s], CONNECTIONS [64], ROUNDS [3],
#   SERVER_CPU [0], CLIENT_CPU [1], OUT_DIR [bench/out], WRK [wrk], PYTHON [/usr/bin/python3]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
SQUALLD=${SQUALLD:-$repo_dir/build/squalld}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
WRK=${WRK:-wrk}
PYTHON=${PYTHON:-/usr/bin/python3}
command_line="DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS ROUNDS=$ROUNDS"
command_line+=" SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU $0"

log() { printf 'bench-email-pg: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"

[[ -x $SQUALLD ]] || die "no squalld at $SQUALLD (make build/squalld)"
((CONNECTIONS % 2 == 0)) || die "CONNECTIONS must be even (split between two nodes)"
for program in taskset curl "$WRK" "$PYTHON" psql; do
  command -v "$program" >/dev/null || die "$program is missing"
done

work_dir=$(mktemp -d /tmp/squall-bench-pg.XXXXXX)
[[ $(id -u) -ne 0 ]] || chmod 0755 "$work_dir"
pg_dir=$work_dir/pg
pids=()
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  sh "$repo_dir/scripts/pg-test-server" stop "$pg_dir" >/dev/null 2>&1 || true
  rm -rf "$work_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pg_url=$(taskset -c "$SERVER_CPU" sh "$repo_dir/scripts/pg-test-server" start "$pg_dir")
log "PostgreSQL on CPU $SERVER_CPU: $pg_url"

# The SMTP relay: the integration tests' aiosmtpd harness, accepting and forgetting everything.
cat >"$work_dir/smtp_sink.py" <<'EOF'
import signal, sys, threading
sys.path.insert(0, sys.argv[1])
from smtp_server import SmtpServer
server = SmtpServer("accept").start()
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"127.0.0.1:{server.port}\n")
import os
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.wait(0.5):
    with server._cond:
        server.messages.clear()
        server.rcpt_attempts.clear()
server.stop()
EOF
taskset -c "$CLIENT_CPU" "$PYTHON" "$work_dir/smtp_sink.py" "$repo_dir/tests/integration" \
  "$work_dir/smtp.port" >"$work_dir/smtp.log" 2>&1 &
pids+=($!)
for ((tries = 0; tries < 100; tries++)); do
  smtp_port=$(port_from_file "$work_dir/smtp.port") && break
  sleep 0.1
done
[[ -n ${smtp_port:-} ]] || die "the SMTP sink did not start"

# Starts one squalld on store $1 with name $2; adds its port to node_ports.
start_node() {
  local store=$1 name=$2 port="" tries
  email_bench_config "$work_dir/$name.toml" relay="127.0.0.1:$smtp_port" store="$store"
  rm -f "$work_dir/$name.port"
  taskset -c "$SERVER_CPU" "$SQUALLD" --config "$work_dir/$name.toml" --listen 127.0.0.1:0 \
    --port-file "$work_dir/$name.port" 2>>"$work_dir/$name.log" >/dev/null &
  pids+=($!)
  for ((tries = 0; tries < 100; tries++)); do
    port=$(port_from_file "$work_dir/$name.port") && break
    sleep 0.1
  done
  [[ -n $port ]] || { tail -n 20 "$work_dir/$name.log" >&2; die "$name did not start"; }
  curl -sf -o /dev/null -H 'Content-Type: application/json' --max-time 5 \
    --data '{"to": "sanity@example.com", "subject": "sanity", "text": "sanity"}' \
    "http://127.0.0.1:$port/email" || die "$name: the sanity POST /email failed"
  node_ports+=("$port")
}

stop_nodes() {
  local pid keep=()
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  keep=("${pids[0]}")
  pids=("${keep[@]}")
}

# wrk -c $2 against port $1 for $3; writes its WRK_JSON line to $4.
load() {
  taskset -c "$CLIENT_CPU" "$WRK" -t1 -c "$2" -d "$3" --latency -s "$bench_dir/email.lua" \
    "http://127.0.0.1:$1/email" >"$4.out" 2>&1
  grep '^WRK_JSON ' "$4.out" | cut -c10- >"$4"
}

results=$work_dir/results.tsv
: >"$results"
for ((round = 1; round <= ROUNDS; round++)); do
  for variant in sqlite pg pg2; do
    case $variant in
      sqlite) store=$work_dir/jobs-$round.db ;;
      *)
        schema="bench_${round}_$variant"
        psql -X -q "$pg_url" -c "CREATE SCHEMA $schema" >/dev/null
        store="$pg_url&options=-csearch_path%3D$schema"
        ;;
    esac
    node_ports=()
    start_node "$store" "$variant-$round-a"
    [[ $variant != pg2 ]] || start_node "$store" "$variant-$round-b"
    ports=("${node_ports[@]}")
    per_node=$((CONNECTIONS / ${#ports[@]}))
    for phase in warmup run; do
      length=$DURATION
      [[ $phase == run ]] || length=$WARMUP
      clients=()
      for port in "${ports[@]}"; do
        load "$port" "$per_node" "$length" "$work_dir/$phase.$port" &
        clients+=($!)
      done
      wait "${clients[@]}"
    done
    for port in "${ports[@]}"; do
      printf '%s\t%s\t%s\n' "$round" "$variant" "$(cat "$work_dir/run.$port")" >>"$results"
    done
    log "round $round, $variant: $(for p in "${ports[@]}"; do cut -c1-120 "$work_dir/run.$p"; done)"
    stop_nodes
  done
done

mkdir -p "$OUT_DIR"
"$PYTHON" - "$results" "$command_line" "$OUT_DIR/email-pg-latest.md" <<'EOF'
import json, statistics, sys
from collections import defaultdict
rows = defaultdict(list)  # (variant, round) -> [wrk results of its nodes]
for line in open(sys.argv[1]):
    round_, variant, data = line.rstrip("\n").split("\t", 2)
    rows[(variant, int(round_))].append(json.loads(data))
summary = {}
for (variant, round_), nodes in rows.items():
    rps = sum(n["requests"] / (n["duration_us"] / 1e6) for n in nodes)
    p99 = max(n["latency_us"]["p99"] / 1000 for n in nodes)
    errors = sum(n["errors"]["status"] + n["errors"]["connect"] + n["errors"]["read"] +
                 n["errors"]["write"] + n["errors"]["timeout"] for n in nodes)
    summary.setdefault(variant, []).append((rps, p99, errors))
names = {"sqlite": "SQLite, 1 node", "pg": "PostgreSQL, 1 node", "pg2": "PostgreSQL, 2 nodes"}
median = lambda values: statistics.median(values)
base = median([r for r, _, _ in summary["sqlite"]])
pg1 = median([r for r, _, _ in summary["pg"]])
lines = ["# POST /email durable accepts: PostgreSQL against SQLite, two nodes against one", "",
         f"- command: `{sys.argv[2]}`", "",
         "| store | accepts/s (median) | rounds | p99 ms (median) | errors | vs SQLite | vs 1 PG node |",
         "|---|---:|---|---:|---:|---:|---:|"]
for variant in ("sqlite", "pg", "pg2"):
    values = summary[variant]
    rps = median([r for r, _, _ in values])
    p99 = median([p for _, p, _ in values])
    lines.append(f"| {names[variant]} | {rps:,.0f} | {' / '.join(f'{r:,.0f}' for r, _, _ in values)} "
                 f"| {p99:.1f} | {sum(e for _, _, e in values)} | {rps / base:.2f}x | {rps / pg1:.2f}x |")
text = "\n".join(lines) + "\n"
open(sys.argv[3], "w").write(text)
print(text)
EOF

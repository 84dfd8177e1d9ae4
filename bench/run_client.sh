#!/usr/bin/env bash
# bench/run_client.sh: HTTP clients side by side, each fetching /plaintext from nginx (one worker)
# with CONCURRENCY fetches in flight, in one run: squall's http::Client (examples/fetch_bench),
# Node's built-in fetch, Tornado's AsyncHTTPClient (the simple client and the curl client) and
# h2load --h1 (a lean C load generator: the ceiling).
#
# nginx runs pinned to SERVER_CPU (default 1), every client to CLIENT_CPU (default 0). Each
# round runs every client once for DURATION seconds (after WARMUP seconds it does not count;
# h2load has no warm-up: it has no JIT and no pool to fill), in an order rotated each round. The
# report gives the medians over ROUNDS of fetches/s and of the client's CPU time per fetch (user
# + system of all its threads over the measured window, as each client reads it itself; for
# h2load, bash's `time` of the whole run), and squall's ratio to each. The table goes to stdout
# and to bench/out/client-latest.md.
#
# Usage:  bench/run_client.sh        (installs what it needs with scripts/install-deps.sh --bench)
# Environment (defaults in brackets):
#   FETCH_BENCH   squall's load generator [../build/examples/fetch_bench from this script]
#   DURATION      measured seconds per client and round [10]
#   WARMUP        unmeasured seconds before that [1]
#   ROUNDS        rounds; the medians are reported [3]
#   CONCURRENCY   fetches in flight [100]
#   CLIENTS       which clients ["squall node tornado-curl tornado-simple h2load"]
#   SERVER_CPU, CLIENT_CPU   [1, 0]
#   OUT_DIR       [bench/out]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")

FETCH_BENCH=${FETCH_BENCH:-$repo_dir/build/examples/fetch_bench}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-100}
CLIENTS=${CLIENTS:-squall node tornado-curl tornado-simple h2load}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
NGINX=${NGINX:-/usr/sbin/nginx}
NODE=${NODE:-/usr/bin/node}
PYTHON=${PYTHON:-/usr/bin/python3}
H2LOAD=${H2LOAD:-h2load}

command_line="DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS CONCURRENCY=$CONCURRENCY"
command_line+=" SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU bench/run_client.sh"

exec 3>&2
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-client: %s\n' "$*" >&3; }

for number in DURATION WARMUP ROUNDS CONCURRENCY SERVER_CPU CLIENT_CPU; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
((ROUNDS >= 1 && DURATION >= 1 && CONCURRENCY >= 1)) || die "ROUNDS, DURATION, CONCURRENCY must be >= 1"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || die "SERVER_CPU and CLIENT_CPU must differ"
read -ra clients <<<"$CLIENTS"
for client in "${clients[@]}"; do
  case $client in
    squall | node | tornado-curl | tornado-simple | h2load) ;;
    *) die "unknown client '$client' in CLIENTS (squall node tornado-curl tornado-simple h2load)" ;;
  esac
done

sh "$repo_dir/scripts/install-deps.sh" --bench || die "scripts/install-deps.sh --bench failed"
[[ -x $FETCH_BENCH ]] || die "no fetch_bench at $FETCH_BENCH: run make examples (or set FETCH_BENCH)"
for program in taskset "$NGINX" "$NODE" "$PYTHON" "$H2LOAD"; do
  command -v "$program" >/dev/null || die "$program is missing"
done

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-client-bench.XXXXXX")
nginx_pid=""
client_pid=""
cleanup() {
  [[ -n $client_pid ]] && kill "$client_pid" 2>/dev/null
  [[ -n $nginx_pid ]] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
  rm -rf "$work_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# nginx, one process (master_process off), pinned.
prefix=$work_dir/nginx
mkdir -p "$prefix"
for attempt in 1 2 3; do
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$port|g" "$bench_dir/nginx.conf.template" >"$prefix/nginx.conf"
  taskset -c "$SERVER_CPU" "$NGINX" -p "$prefix/" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
    >"$work_dir/nginx.log" 2>&1 &
  nginx_pid=$!
  for _ in $(seq 50); do
    if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
      break 2
    fi
    kill -0 "$nginx_pid" 2>/dev/null || break
    sleep 0.1
  done
  log "nginx did not start on port $port (attempt $attempt)"
  kill "$nginx_pid" 2>/dev/null || true
  nginx_pid=""
done
[[ -n $nginx_pid ]] || die "nginx did not start: $(cat "$work_dir/nginx.log")"
url="http://127.0.0.1:$port/plaintext"
log "nginx $("$NGINX" -v 2>&1 | sed 's/^nginx version: //') on $url (cpu $SERVER_CPU); clients on cpu $CLIENT_CPU"

# Runs one client; appends its JSON line (with "client" and "round") to results.jsonl.
run_one() {
  local client=$1 round=$2 out=$work_dir/$client.$round.out err=$work_dir/$client.$round.err
  local time_file=$work_dir/$client.$round.time status=0 busy_before busy_after started ended
  busy_before=$(cpu_busy_ticks "$CLIENT_CPU")
  started=$(date +%s%N)
  case $client in
    squall)
      run_client "$out" "$err" "$time_file" taskset -c "$CLIENT_CPU" "$FETCH_BENCH" \
        --concurrency "$CONCURRENCY" --seconds "$DURATION" --warmup "$WARMUP" "$url" || status=$?
      ;;
    node)
      run_client "$out" "$err" "$time_file" taskset -c "$CLIENT_CPU" "$NODE" \
        "$bench_dir/node-fetch-client.js" "$url" "$CONCURRENCY" "$DURATION" "$WARMUP" || status=$?
      ;;
    tornado-curl | tornado-simple)
      run_client "$out" "$err" "$time_file" taskset -c "$CLIENT_CPU" "$PYTHON" \
        "$bench_dir/tornado_client.py" "${client#tornado-}" "$url" "$CONCURRENCY" "$DURATION" \
        "$WARMUP" || status=$?
      ;;
    h2load)
      run_client "$out" "$err" "$time_file" taskset -c "$CLIENT_CPU" "$H2LOAD" --h1 \
        -c "$CONCURRENCY" -m 1 -t 1 -D "$DURATION" "$url" || status=$?
      ;;
  esac
  ended=$(date +%s%N)
  busy_after=$(cpu_busy_ticks "$CLIENT_CPU")
  ((status == 0)) || die "$client failed (exit $status): $(tail -5 "$err")"
  "$PYTHON" - "$client" "$round" "$out" "$time_file" "$((busy_after - busy_before))" \
    "$(getconf CLK_TCK)" "$((ended - started))" >>"$work_dir/results.jsonl" <<'EOF'
import json, re, sys
client, round_, out, time_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
busy_ticks, ticks_per_s, wall_ns = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
text = open(out).read()
if client == "h2load":
    seconds = float(re.search(r"finished in ([0-9.]+)s", text).group(1))
    done = int(re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text).group(1))
    failed = int(re.search(r"(\d+) failed", text).group(1))
    user, system = (float(x) for x in open(time_file).read().split())
    result = {"fetches": done, "errors": failed, "seconds": seconds,
              "fetches_per_s": round(done / seconds),
              "cpu_us_per_fetch": round((user + system) * 1e6 / max(done, 1), 2)}
else:
    result = json.loads(text.strip().splitlines()[-1])
# What other processes took of the client's CPU during the whole run (its busy time less the
# client's own user + system time), as a share of the wall time: 0 on a quiet machine.
client_cpu = sum(float(x) for x in open(time_file).read().split())
others = max(0.0, busy_ticks / ticks_per_s - client_cpu) / (wall_ns / 1e9)
result.update(client=client, round=round_, others_on_client_cpu=round(others, 3))
print(json.dumps(result))
EOF
  log "round $round $client: $(tail -1 "$work_dir/results.jsonl")"
}

for ((round = 1; round <= ROUNDS; round++)); do
  count=${#clients[@]}
  for ((i = 0; i < count; i++)); do
    run_one "${clients[(i + round - 1) % count]}" "$round"
  done
done

mkdir -p "$OUT_DIR"
cp "$work_dir/results.jsonl" "$OUT_DIR/client-latest.jsonl"
"$PYTHON" - "$work_dir/results.jsonl" "$command_line" "$CLIENTS" <<'EOF' | tee "$OUT_DIR/client-latest.md"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
order = sys.argv[3].split()
names = {"squall": "squall http::Client", "node": "node fetch (undici)",
         "tornado-curl": "Tornado curl_httpclient", "tornado-simple": "Tornado simple_httpclient",
         "h2load": "h2load --h1"}
med = {}
for client in order:
    mine = [r for r in rows if r["client"] == client]
    med[client] = (statistics.median(r["fetches_per_s"] for r in mine),
                   statistics.median(r["cpu_us_per_fetch"] for r in mine),
                   sum(r.get("errors", 0) for r in mine),
                   max(r["others_on_client_cpu"] for r in mine))
print(f"`{sys.argv[2]}`\n")
print("| client | fetches/s | client CPU µs/fetch | squall's fetches/s ÷ this | this CPU/fetch ÷ squall's | errors | others on the client CPU (max) |")
print("|---|---:|---:|---:|---:|---:|---:|")
base = med.get("squall")
for client in order:
    rate, cpu, errors, others = med[client]
    if base:
        ratio_rate = f"{base[0] / rate:.2f}x" if rate else "-"
        ratio_cpu = f"{cpu / base[1]:.2f}x" if base[1] else "-"
    else:
        ratio_rate = ratio_cpu = "-"
    print(f"| {names[client]} | {rate:,.0f} | {cpu:.1f} | {ratio_rate} | {ratio_cpu} | {errors} "
          f"| {others:.0%} |")
EOF

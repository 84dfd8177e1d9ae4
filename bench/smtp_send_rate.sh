#!/usr/bin/env bash
# bench/smtp_send_rate.sh: SMTP sends per second from squall's SmtpMailer to one relay, with a
# fresh connection per message (what squalld did before [smtp] connections) and with kept
# connections, in the same run (bench/smtp_send_rate.cpp, built here against build/'s
# libsquall-mail.a and libsquall.a).
#
# Relays: the aiosmtpd harness of the integration tests (Python) and Postfix's smtp-sink (C),
# each pinned to RELAY_CPU; the sender is pinned to SENDER_CPU. Each round runs every mode and
# thread count against each relay (the order of the modes alternates between rounds); the report
# gives medians over ROUNDS of sends/s and sender CPU microseconds per send, and kept/fresh.
#
# Usage:  bench/smtp_send_rate.sh
# Environment (defaults in brackets): MESSAGES [3000] per run, THREADS ["2 8"] (sends at once;
#   kept connections), ROUNDS [3], RELAYS ["aiosmtpd smtp-sink"], SENDER_CPU [0], RELAY_CPU [1],
#   BUILD [build], OUT_DIR [bench/out], PYTHON [/usr/bin/python3], SMTP_SINK [/usr/sbin/smtp-sink]
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
MESSAGES=${MESSAGES:-3000}
THREADS=${THREADS:-2 8}
ROUNDS=${ROUNDS:-3}
RELAYS=${RELAYS:-aiosmtpd smtp-sink}
SENDER_CPU=${SENDER_CPU:-0}
RELAY_CPU=${RELAY_CPU:-1}
BUILD=${BUILD:-build}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
PYTHON=${PYTHON:-/usr/bin/python3}
SMTP_SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}

log() { printf 'smtp_send_rate: %s\n' "$*" >&2; }
# shellcheck source=bench/common.sh
. "$bench_dir/common.sh"

for number in MESSAGES ROUNDS SENDER_CPU RELAY_CPU; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, got '${!number}'"
done
read -ra thread_counts <<<"$THREADS"
read -ra relays <<<"$RELAYS"
for count in "${thread_counts[@]}"; do
  [[ $count =~ ^[1-9][0-9]*$ ]] || die "THREADS must be whole numbers above 0, got '$count'"
done
# The mailer is in libsquall-mail (lib/mail), which needs the core library libsquall.
for lib in libsquall-mail.a libsquall.a; do
  [[ -f $repo_dir/$BUILD/$lib ]] || die "no $BUILD/$lib: run make $BUILD/$lib first"
done

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-bench-smtp.XXXXXX")
relay_pid=""
cleanup() {
  local status=$?
  [[ -n $relay_pid ]] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  rm -rf "$work_dir"
  exit "$status"
}
trap cleanup EXIT

program=$work_dir/smtp_send_rate
# The packages are the Makefile's for these two libraries (CORE_PKGS, MAIL_PKGS).
packages="libuv spdlog fmt libcurl"
# shellcheck disable=SC2046,SC2086 # pkg-config's flags are meant to split.
c++ -O2 -std=c++20 -Wall -Wextra -Werror -pthread -I"$repo_dir/include" \
  $(pkg-config --cflags $packages) "$bench_dir/smtp_send_rate.cpp" -o "$program" \
  "$repo_dir/$BUILD/libsquall-mail.a" "$repo_dir/$BUILD/libsquall.a" \
  $(pkg-config --libs $packages) || die "building smtp_send_rate failed"

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts relay $1 on a free port (printed).
start_relay() {
  local port tries
  port=$(free_port)
  case $1 in
    smtp-sink)
      local user=()
      ((EUID == 0)) && user=(-u nobody)
      taskset -c "$RELAY_CPU" "$SMTP_SINK" "${user[@]}" "127.0.0.1:$port" 1000 \
        >"$work_dir/relay.log" 2>&1 &
      ;;
    aiosmtpd)
      taskset -c "$RELAY_CPU" "$PYTHON" - "$repo_dir/tests/integration" "$port" \
        >"$work_dir/relay.log" 2>&1 <<'PY' &
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from aiosmtpd.smtp import SMTP
from smtp_server import _Handler, SmtpServer

class Sink(_Handler):
    async def handle_DATA(self, smtp, session, envelope):
        return "250 2.0.0 OK"

async def main():
    server = SmtpServer()
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(Sink(server), hostname="relay"), "127.0.0.1",
                                   int(sys.argv[2]))
    await srv.serve_forever()

asyncio.run(main())
PY
      ;;
    *) die "RELAYS: unknown relay '$1' (aiosmtpd or smtp-sink)" ;;
  esac
  relay_pid=$!
  for ((tries = 0; tries < 100; tries++)); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && {
      printf '%s\n' "$port"
      return 0
    }
    kill -0 "$relay_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work_dir/relay.log" >&2
  die "$1 did not start"
}

results=$work_dir/results.tsv
: >"$results"
for relay in "${relays[@]}"; do
  port=$(start_relay "$relay")
  log "$relay on 127.0.0.1:$port"
  for ((round = 1; round <= ROUNDS; round++)); do
    modes=(fresh kept)
    ((round % 2 == 0)) && modes=(kept fresh)
    for threads in "${thread_counts[@]}"; do
      for mode in "${modes[@]}"; do
        line=$(taskset -c "$SENDER_CPU" "$program" "smtp://127.0.0.1:$port" "$MESSAGES" \
          "$threads" "$mode") || die "$mode sends to $relay failed"
        log "round $round, $relay, $threads at once: $line"
        printf '%s\t%s\t%s\n' "$relay" "$threads" "$line" >>"$results"
      done
    done
  done
  kill "$relay_pid" 2>/dev/null || true
  wait "$relay_pid" 2>/dev/null || true
  relay_pid=""
done

mkdir -p "$OUT_DIR"
"$PYTHON" - "$results" "$OUT_DIR/smtp-send-rate-latest.md" "MESSAGES=$MESSAGES THREADS='$THREADS' ROUNDS=$ROUNDS RELAYS='$RELAYS' SENDER_CPU=$SENDER_CPU RELAY_CPU=$RELAY_CPU bench/smtp_send_rate.sh" <<'PY'
import statistics, sys
from collections import defaultdict
from pathlib import Path

rates, cpus = defaultdict(list), defaultdict(list)
for line in Path(sys.argv[1]).read_text().splitlines():
    relay, threads, rest = line.split("\t")
    mode, sent, seconds, rate, cpu = rest.split()
    rates[relay, int(threads), mode].append(float(rate))
    cpus[relay, int(threads), mode].append(float(cpu))
lines = [
    "# SMTP sends per second: a fresh connection per message vs kept connections",
    "",
    f"- command: `{sys.argv[3]}`",
    "",
    "| relay | sends at once | fresh: sends/s | kept: sends/s | kept ÷ fresh "
    "| fresh: CPU µs/send | kept: CPU µs/send |",
    "|---|---:|---:|---:|---:|---:|---:|",
]
for relay, threads in sorted({(r, t) for r, t, _ in rates}):
    fresh = statistics.median(rates[relay, threads, "fresh"])
    kept = statistics.median(rates[relay, threads, "kept"])
    lines.append(
        f"| {relay} | {threads} | {fresh:,.0f} | {kept:,.0f} | {kept / fresh:.1f}x "
        f"| {statistics.median(cpus[relay, threads, 'fresh']):,.0f} "
        f"| {statistics.median(cpus[relay, threads, 'kept']):,.0f} |")
lines += ["", "Medians over the rounds; CPU = the sender process's user + system time.", ""]
text = "\n".join(lines)
Path(sys.argv[2]).write_text(text)
print(text)
PY

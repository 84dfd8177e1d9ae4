#!/usr/bin/env bash
# bench/send_compare.sh: sends per second of two squalld binaries in one run, beside the accept
# rate, and the ceiling of each relay measured with Postfix's smtp-source as the client.
#
# For each round (ROUNDS) and each variant in VARIANTS ("name:binary:max_sends:connections",
# the binary being BEFORE or AFTER), bench/run_email.sh runs once with RELAYS (aiosmtpd and
# smtp-sink): accepts for DURATION at wrk -c CONNECTIONS, then jobs marked sent per second while
# the backlog left at wrk's end drains (SEND_WAIT s; reported as "[after]"). When that backlog
# is under one second of sends, the sends kept pace with the accepts and the drain has next to
# nothing to measure: the figure is then the jobs sent during the run per second, reported as
# "[during]" (bounded by the accept rate). Variants alternate within a round, so every variant sees
# the same machine load. Then smtp-source, pinned to SERVER_CPU (where squalld runs), sends
# SOURCE_MESSAGES to each relay (pinned to SMTP_CPU) with 2 and 8 sessions, once with a new
# connection per message and once with kept ones (-d): the relay's own limit with a C client.
# Medians of ROUNDS; the table goes to stdout and OUT_DIR/send-compare.md, each run's own report
# to OUT_DIR/send-compare/.
#
# Usage:  bench/send_compare.sh BEFORE AFTER
# Environment: ROUNDS [3], VARIANTS [see below], SOURCE_MESSAGES [4000], OUT_DIR [bench/out],
# and what bench/run_email.sh reads (DURATION [5s], WARMUP [1s], CONNECTIONS [64],
# SEND_WAIT [5], RELAYS ['aiosmtpd smtp-sink'], SERVER_CPU, CLIENT_CPU, SMTP_CPU).
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$bench_dir")
ROUNDS=${ROUNDS:-3}
OUT_DIR=${OUT_DIR:-$bench_dir/out}
SOURCE_MESSAGES=${SOURCE_MESSAGES:-4000}
SERVER_CPU=${SERVER_CPU:-0}
SMTP_CPU=${SMTP_CPU:-1}
SMTP_SOURCE=${SMTP_SOURCE:-/usr/sbin/smtp-source}
SMTP_SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}
export DURATION=${DURATION:-5s} WARMUP=${WARMUP:-1s} CONNECTIONS=${CONNECTIONS:-64}
export SEND_WAIT=${SEND_WAIT:-5} RELAYS=${RELAYS:-aiosmtpd smtp-sink}
VARIANTS=${VARIANTS:-before-2:BEFORE:2:2 after-2:AFTER:2:2 before-8:BEFORE:8:8 after-8:AFTER:8:8}

exec 3>&2
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-send-compare: %s\n' "$*" >&3; }

(($# == 2)) || die "usage: $0 squalld-before squalld-after"
before=$1 after=$2
for binary in "$before" "$after"; do [[ -x $binary ]] || die "no squalld at $binary"; done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a whole number above 0, got '$ROUNDS'"
[[ -x $SMTP_SOURCE ]] || die "no smtp-source at $SMTP_SOURCE (apt-get install postfix)"

runs_dir=$OUT_DIR/send-compare
rm -rf "$runs_dir"
mkdir -p "$runs_dir"
read -ra variants <<<"$VARIANTS"
for ((round = 1; round <= ROUNDS; round++)); do
  for variant in "${variants[@]}"; do
    IFS=: read -r name which sends conns <<<"$variant"
    binary=$before
    [[ $which == AFTER ]] && binary=$after
    log "round $round/$ROUNDS: $name ($binary, $sends sends, $conns connections)"
    SQUALLD=$binary MAX_SENDS=$sends SMTP_CONNECTIONS=$conns \
      OUT_DIR=$runs_dir/$name-$round "$bench_dir/run_email.sh" >/dev/null
  done
done

# The relays' ceilings with smtp-source as the client.
work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-send-compare.XXXXXX")
relay_pid=""
cleanup() {
  [[ -n $relay_pid ]] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  rm -rf "$work_dir"
}
trap cleanup EXIT
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
start_relay() {
  local relay=$1 tries
  port=$(free_port)
  if [[ $relay == smtp-sink ]]; then
    local user=()
    ((EUID == 0)) && user=(-u nobody)
    taskset -c "$SMTP_CPU" "$SMTP_SINK" "${user[@]}" "127.0.0.1:$port" 1000 >/dev/null 2>&1 &
  else
    # aiosmtpd accepting everything, as the harness of bench/run_email.sh does.
    taskset -c "$SMTP_CPU" /usr/bin/python3 - "$port" <<'EOF' &
import signal, sys, threading
from aiosmtpd.controller import Controller


class Handler:
    async def handle_DATA(self, smtp, session, envelope):
        return "250 2.0.0 OK"


controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
controller.stop()
EOF
  fi
  relay_pid=$!
  for ((tries = 0; tries < 100; tries++)); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$relay did not start"
}
ceilings=$OUT_DIR/send-compare/ceilings.tsv
: >"$ceilings"
read -ra relays <<<"$RELAYS"
for relay in "${relays[@]}"; do
  start_relay "$relay"
  for ((round = 1; round <= ROUNDS; round++)); do
    for sessions in 2 8; do
      for keep in fresh kept; do
        flags=()
        [[ $keep == kept ]] && flags=(-d)
        started=$(date +%s%N)
        taskset -c "$SERVER_CPU" "$SMTP_SOURCE" "${flags[@]}" -s "$sessions" -m "$SOURCE_MESSAGES" \
          -l 600 -f bench@example.com -t rcpt@example.com "127.0.0.1:$port"
        rate=$(awk -v n="$SOURCE_MESSAGES" -v a="$started" -v b="$(date +%s%N)" \
          'BEGIN { printf "%.0f", n / ((b - a) / 1e9) }')
        printf '%s\t%s\t%s\t%s\n' "$relay" "$sessions" "$keep" "$rate" >>"$ceilings"
        log "smtp-source -> $relay, $sessions sessions, $keep: $rate messages/s"
      done
    done
  done
  kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null || true
  relay_pid=""
done

/usr/bin/python3 - "$runs_dir" "$ROUNDS" "$OUT_DIR/send-compare.md" "$ceilings" "${variants[@]}" <<'EOF'
import statistics, sys
from pathlib import Path

runs, rounds, out, ceilings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
variants = [v.split(":") for v in sys.argv[5:]]


def num(text):
    return float(text.replace(",", "").rstrip("%"))


def rows(report_dir):
    """{relay: (requests/s, p99 ms, sends/s, CPU µs per send or None, how)} of one run_email.sh
    run. sends/s is the drain after wrk stopped ("after", run_email's "sends/s after") unless
    the backlog at wrk's end was under one second of sends at the run's pace: then the sends
    kept up with the accepts, the drain (sampled every 0.5 s) had next to nothing to measure,
    and sends/s is the jobs
    sent during the run over its length ("during"; no CPU per send: squalld's CPU then went to
    the accepts as well)."""
    found = {}
    for line in (report_dir / "email-latest.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 15 and cells[1].isdigit():
            found[cells[0]] = (num(cells[2]), num(cells[4]), num(cells[11]), num(cells[13]), "after")
    # run_email.sh's raw figures (its runs.tsv): the run's wall-clock seconds (field 2), jobs in
    # the store at wrk's end (9), sent before and at wrk's end (11, 12), the relay (16).
    for line in (report_dir / "email-latest-raw" / "runs.tsv").read_text().splitlines():
        f = line.split("\t")
        relay, wall = f[16], float(f[2])
        total_end, sent_before, sent_end = int(f[9]), int(f[11]), int(f[12])
        during = (sent_end - sent_before) / wall
        if relay in found and total_end - sent_end < during * 1.0:
            rps, p99, _, _, _ = found[relay]
            found[relay] = (rps, p99, during, None, "during")
    return found


def how(values):
    """The kind of the sends/s figures of some rounds: "after", "during" or both, counted."""
    kinds = [v[4] for v in values]
    if len(set(kinds)) == 1:
        return kinds[0]
    return ", ".join(f"{k} {kinds.count(k)}" for k in ("after", "during") if k in kinds)


results = {}
for name, _, sends, conns in variants:
    for round_ in range(1, rounds + 1):
        for relay, values in rows(runs / f"{name}-{round_}").items():
            results.setdefault((relay, name), []).append(values)

ceiling = {}
for line in Path(ceilings).read_text().splitlines():
    relay, sessions, keep, rate = line.split("\t")
    ceiling.setdefault((relay, int(sessions), keep), []).append(float(rate))
median_ceiling = {k: statistics.median(v) for k, v in ceiling.items()}

lines = ["# Sends per second: before and after, same run", "",
         f"Medians of {rounds} interleaved rounds of bench/run_email.sh per variant.", "",
         "| relay | variant | sends at once | accepts/s | p99 ms | sends/s [how] | sends/s ÷ before, same sends "
         "| ÷ before-2 | squalld CPU µs per send | ÷ relay ceiling (smtp-source, same sessions, kept) |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
for relay in sorted({k[0] for k in results}):
    base2 = results.get((relay, "before-2"))
    base2_rate = statistics.median(v[2] for v in base2) if base2 else 0
    for name, which, sends, conns in variants:
        values = results.get((relay, name))
        if not values:
            continue
        rps = statistics.median(v[0] for v in values)
        p99 = statistics.median(v[1] for v in values)
        rate = statistics.median(v[2] for v in values)
        drains = [v[3] for v in values if v[3] is not None]
        cpu = f"{statistics.median(drains):,.0f}" if drains else "–"
        peer = results.get((relay, name.replace("after", "before")))
        peer_rate = statistics.median(v[2] for v in peer) if peer else 0
        ceil = median_ceiling.get((relay, int(sends), "kept"), 0)
        lines.append(
            f"| {relay} | {name} | {sends} | {rps:,.0f} | {p99:.1f} | {rate:,.0f} [{how(values)}] "
            f"| {rate / peer_rate if peer_rate else 0:.2f}x | {rate / base2_rate if base2_rate else 0:.2f}x "
            f"| {cpu} | {rate / ceil if ceil else 0:.2f} |")
lines += [
    "",
    "sends/s [after]: jobs marked sent per second after wrk stopped, while the backlog it left "
    "drained (bench/run_email.sh's \"sends/s after\", over at most SEND_WAIT s): the send rate "
    "with no accepts competing. sends/s [during]: jobs marked sent during the measured run "
    "÷ the run's length, given instead when the backlog at wrk's end was under one second of "
    "sends at that pace (the drain, sampled every 0.5 s, would read near 0 or time its own "
    "sampling): the sends kept pace, or nearly, with the accepts, so this figure is bounded by "
    "the accept rate, a floor of what squalld can send rather than its ceiling. "
    "[after 2, during 1]: the median is over rounds of both kinds. The ratios divide the figures "
    "as they are; squalld CPU µs per send is over the drain rounds only (– when none).",
    "", "Rounds (sends/s [how]):", ""]
for (relay, name), values in sorted(results.items()):
    lines.append(f"- {relay} {name}: " + " / ".join(f"{v[2]:,.0f} [{v[4]}]" for v in values))
lines += ["", "Relay ceilings, smtp-source on squalld's CPU (messages/s, median of "
          f"{rounds}; rounds in brackets):", "",
          "| relay | sessions | new connection per message | kept connections (-d) |",
          "|---|--:|--:|--:|"]
for relay in sorted({k[0] for k in ceiling}):
    for sessions in (2, 8):
        fresh = ceiling.get((relay, sessions, "fresh"), [])
        kept = ceiling.get((relay, sessions, "kept"), [])
        lines.append(
            f"| {relay} | {sessions} | {statistics.median(fresh):,.0f} "
            f"({' / '.join(f'{r:,.0f}' for r in fresh)}) | {statistics.median(kept):,.0f} "
            f"({' / '.join(f'{r:,.0f}' for r in kept)}) |")
text = "\n".join(lines) + "\n"
Path(out).write_text(text)
print(text)
EOF

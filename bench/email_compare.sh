#!/usr/bin/env bash
# bench/email_compare.sh: bench/run_email.sh for two or more squalld binaries in one run, rounds
# interleaved (A B A B ...), so that a before/after comparison sees the same machine load.
# Reported per binary and connection count: the median over ROUNDS of durable accepts per second,
# p99 latency and squalld's CPU time per accept (all its threads; the loop thread's share is
# what bench/email_callgrind.sh counts), and each binary's ratio to the first. The table goes to
# stdout and OUT_DIR/email-compare.md; each run's own report stays in OUT_DIR/email-compare/.
#
# Usage:  bench/email_compare.sh squalld-before squalld-after [...]
# Environment: ROUNDS [3], OUT_DIR [bench/out], and everything bench/run_email.sh reads
# (DURATION, WARMUP, CONNECTIONS, DURABILITY, SEND_WAIT, SERVER_CPU, CLIENT_CPU, ...).
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROUNDS=${ROUNDS:-3}
OUT_DIR=${OUT_DIR:-$bench_dir/out}

exec 3>&2
# shellcheck source=bench/common.sh
source "$bench_dir/common.sh"
log() { printf 'bench-email-compare: %s\n' "$*" >&3; }

(($# >= 2)) || die "usage: $0 squalld-before squalld-after [...]"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a whole number above 0, got '$ROUNDS'"
for binary in "$@"; do [[ -x $binary ]] || die "no squalld at $binary"; done

runs_dir=$OUT_DIR/email-compare
rm -rf "$runs_dir"
mkdir -p "$runs_dir"
for ((round = 1; round <= ROUNDS; round++)); do
  index=0
  for binary in "$@"; do
    log "round $round/$ROUNDS: $binary"
    SQUALLD=$binary OUT_DIR=$runs_dir/run-$index-$round "$bench_dir/run_email.sh" >/dev/null
    index=$((index + 1))
  done
done

/usr/bin/python3 - "$runs_dir" "$ROUNDS" "$OUT_DIR/email-compare.md" "$@" <<'EOF'
import statistics, sys
from pathlib import Path

runs, rounds, out, binaries = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]


def num(text):
    return float(text.replace(",", "").rstrip("%"))


def tables(path):
    """{connections: (requests/s, p50 ms, p99 ms)} and {connections: squalld CPU share} of one
    report. Columns are found by their headers, so a report with a relay column (run_email.sh
    since kept SMTP connections) and one without both read; with several relays, the first
    relay's rows count."""
    rates, cpu, section, header = {}, {}, 0, []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and "wrk -c" in cells:
            section += 1
            header = cells
            continue
        if not line.startswith("| ") or "wrk -c" not in header:
            continue
        column = dict(zip(header, cells))
        connections = column.get("wrk -c", "")
        if not connections.isdigit():
            continue
        if section == 1 and int(connections) not in rates:
            rates[int(connections)] = (num(column["requests/s"]), num(column["p50 ms"]),
                                       num(column["p99 ms"]))
        elif section == 2 and int(connections) not in cpu:
            cpu[int(connections)] = num(column["squalld"]) / 100
    return rates, cpu


results = {}  # (binary index, connections) -> lists
for index in range(len(binaries)):
    for round_ in range(1, rounds + 1):
        rates, cpu = tables(runs / f"run-{index}-{round_}" / "email-latest.md")
        for c, (rps, p50, p99) in rates.items():
            r = results.setdefault((index, c), {"rps": [], "p50": [], "p99": [], "cpu_us": []})
            r["rps"].append(rps)
            r["p50"].append(p50)
            r["p99"].append(p99)
            r["cpu_us"].append(cpu[c] / rps * 1e6)

lines = ["# POST /email: before and after, same run", "",
         f"Medians of {rounds} interleaved rounds of bench/run_email.sh per binary.", "",
         "| squalld | wrk -c | accepts/s | p50 ms | p99 ms | squalld CPU µs per accept "
         "| accepts/s vs first | p99 vs first | CPU per accept vs first |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for (index, c) in sorted(results, key=lambda k: (k[1], k[0])):
    r = results[(index, c)]
    base = results[(0, c)]
    rps, p50, p99, cpu_us = (statistics.median(r[k]) for k in ("rps", "p50", "p99", "cpu_us"))
    rps_ratio = rps / statistics.median(base["rps"])
    p99_ratio = p99 / statistics.median(base["p99"])
    cpu_ratio = cpu_us / statistics.median(base["cpu_us"])
    lines.append(f"| {binaries[index]} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {cpu_us:.1f} "
                 f"| {rps_ratio:.2f}x | {p99_ratio:.2f}x | {cpu_ratio:.2f}x |")
for key, title, form in (("rps", "accepts/s", "{:,.0f}"), ("p50", "p50 ms", "{:.2f}"),
                         ("p99", "p99 ms", "{:.2f}")):
    lines += ["", f"Rounds ({title}): " + "; ".join(
        f"{binaries[i]} c={c}: " + " / ".join(form.format(v) for v in results[(i, c)][key])
        for (i, c) in sorted(results, key=lambda k: (k[1], k[0])))]
loads = []
for index in range(len(binaries)):
    for round_ in range(1, rounds + 1):
        for line in (runs / f"run-{index}-{round_}" / "email-latest.md").read_text().splitlines():
            if line.startswith("- machine load"):
                loads.append(f"{binaries[index]} round {round_}: {line[len('- machine load'):].strip(' :')}")
if loads:
    lines += ["", "Machine load per run (bench/run_email.sh):", ""] + [f"- {l}" for l in loads]
lines += [""]
text = "\n".join(lines)
Path(out).write_text(text)
print(text)
EOF

#!/usr/bin/env python3
"""bench/pool_rounds.py: the same-round ratios of one or more bench/keepalive_ab.sh runs, pooled.

keepalive_ab.sh prints a line per server and round ("round N SERVER ... CPU C us/req user U
system S"); save its output to a file per run. This reads those lines from every file, pairs
each server with the baseline of the same round of the same run, and prints per server: the
rounds, the median ratio of CPU per request to the baseline's with its interquartile range, how
many rounds are at or under LIMIT, and the medians of the per-round differences in user and
system time (µs per request). Bare-loop variants (bare:thread, bare:timer) are compared with the
plain loop like any other server.

Usage:  bench/pool_rounds.py [--baseline bare] [--limit 1.05] RUN.txt...
"""
import argparse
import re
import statistics
import sys

ROUND = re.compile(r"^round (\d+) (\S+)\s+\d+ responses\s+CPU ([\d.]+) us/req\s+"
                   r"user ([\d.]+)\s+system ([\d.]+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="bare")
    parser.add_argument("--limit", type=float, default=1.05)
    parser.add_argument("runs", nargs="+")
    options = parser.parse_args()

    rounds: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    for run in options.runs:
        with open(run) as lines:
            for line in lines:
                match = ROUND.match(line)
                if match:
                    cpu, user, system = (float(match.group(i)) for i in (3, 4, 5))
                    rounds.setdefault((run, match.group(1)), {})[match.group(2)] = (cpu, user,
                                                                                     system)
    paired = [servers for servers in rounds.values() if options.baseline in servers]
    if not paired:
        print(f"pool_rounds: no round of {options.runs} has the baseline "
              f"'{options.baseline}'", file=sys.stderr)
        return 1
    names = list(dict.fromkeys(name for servers in paired for name in servers))
    print(f"{'server':40} {'rounds':>6} {'÷ ' + options.baseline + ' [IQR]':>24} "
          f"{'<= ' + str(options.limit):>8} {'user diff':>10} {'system diff':>12}")
    for name in names:
        if name == options.baseline:
            continue
        mine = [servers for servers in paired if name in servers]
        base = options.baseline
        ratios = [s[name][0] / s[base][0] for s in mine]
        ratio = f"{statistics.median(ratios):.3f}x"
        if len(ratios) >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            ratio += f" [{q1:.3f}-{q3:.3f}]"
        under = sum(r <= options.limit for r in ratios)
        user = statistics.median(s[name][1] - s[base][1] for s in mine)
        system = statistics.median(s[name][2] - s[base][2] for s in mine)
        print(f"{name:40} {len(ratios):6} {ratio:>24} {under:8} {user:+10.3f} {system:+12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

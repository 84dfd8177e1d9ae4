#!/usr/bin/python3
"""Turns the raw results of bench/run.sh into its report.

    summarize.py --work DIR --markdown FILE
        Reads DIR/info.tsv, DIR/runs.tsv, the wrk outputs and DIR/memory.*.json; prints the
        report (Markdown, aligned so it reads as a table in a terminal too) and writes it to FILE.
        Exits 1 when a run had errors that make its numbers suspect (HTTP errors, read or write
        errors, more than a few connect errors) or a memory test failed; the report says which.

    summarize.py --brief RUNS_TSV CLOCK_TICKS
        One line about the last run in RUNS_TSV, for run.sh's progress messages.

Standard library only.
"""

import argparse
import json
import os
import statistics
import sys

# More connect errors than this in one run make its numbers suspect (a few can happen when
# wrk opens all its connections at once).
ALLOWED_CONNECT_ERRORS = 10

SCENARIO_ORDER = ["keepalive", "pipelined", "close"]


def read_wrk(path):
    """The JSON line report.lua's done() printed in a wrk output file."""
    with open(path) as output:
        for line in output:
            if line.startswith("WRK_JSON "):
                return json.loads(line[len("WRK_JSON "):])
    raise ValueError(f"{path}: no WRK_JSON line")


def read_run(work_dir, line, clock_ticks):
    """The numbers of one run from its line in runs.tsv (see run_wrk in run.sh) and its wrk output."""
    (round_number, scenario, server, server_ticks, output, wrk_cpu_seconds, wall_seconds,
     server_cpu_busy, client_cpu_busy, server_user_ticks) = line.rstrip("\n").split("\t")
    wrk = read_wrk(os.path.join(work_dir, output))
    tick = 1 / clock_ticks
    server_seconds = int(server_ticks) * tick
    wall_seconds = float(wall_seconds)
    requests = wrk["requests"]
    seconds = wrk["duration_us"] / 1e6
    return {
        "round": int(round_number),
        "scenario": scenario,
        "server": server,
        "requests": requests,
        "rps": requests / seconds if seconds > 0 else 0.0,
        # wrk's percentile() returns 0 when its coordinated-omission correction has put samples
        # below the smallest one measured (it happens in pipelined runs); that is no latency.
        "p99_us": wrk["latency_us"]["p99"] or None,
        "max_us": wrk["latency_us"]["max"],
        "cpu_ticks": int(server_ticks),
        "cpu_us_per_request": server_seconds * 1e6 / requests if requests else float("nan"),
        # The part of it spent in the server's own code (utime), the rest being the kernel's.
        "user_us_per_request": (int(server_user_ticks) * tick * 1e6 / requests if requests
                                else float("nan")),
        # Shares of one CPU over the wall-clock time between the samples around wrk.
        "server_share": server_seconds / wall_seconds,
        "wrk_share": float(wrk_cpu_seconds) / wall_seconds,
        # What else ran on each CPU: its user+nice+system ticks minus the server's (or wrk's).
        # A process's time also holds softirq work done while it was on the CPU, which
        # /proc/stat counts as softirq, so this errs low; it is a gauge of noise.
        "others_server_cpu": max(0.0, int(server_cpu_busy) * tick - server_seconds) / wall_seconds,
        "others_client_cpu": max(0.0, int(client_cpu_busy) * tick - float(wrk_cpu_seconds))
        / wall_seconds,
        "errors": wrk["errors"],
    }


def read_runs(work_dir, clock_ticks):
    with open(os.path.join(work_dir, "runs.tsv")) as lines:
        return [read_run(work_dir, line, clock_ticks) for line in lines if line.strip()]


def error_text(errors):
    names = {"connect": "connect", "read": "read", "write": "write", "status": "HTTP>=400",
             "timeout": "timeout"}
    return ", ".join(f"{names[key]} {errors[key]}" for key in names if errors.get(key))


def is_suspect(errors):
    return bool(errors["status"] or errors["read"] or errors["write"]
                or errors["connect"] > ALLOWED_CONNECT_ERRORS)


def rate(value):
    return f"{value:,.0f}"


def milliseconds(microseconds):
    return "n/a" if microseconds is None else f"{microseconds / 1000:.2f} ms"


def median_or_none(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def cpu(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(value):
    return f"{value:.2f}x"


def table(header, rows, align):
    """A Markdown table padded so that its columns line up as plain text."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        padded = [str(cell).rjust(width) if side == "r" else str(cell).ljust(width)
                  for cell, width, side in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" if side == "r" else "-" * (width + 2)
                          for width, side in zip(widths, align)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


SERVER_LOGS = {
    "squalld": ["squalld.stderr.log", "squalld.stdout.log"],
    "nginx": ["nginx/error.log", "nginx.stderr.log", "nginx.stdout.log"],
    "node": ["node.stderr.log"],
    "bare": ["bare.stderr.log"],
    "bare_same": ["bare_same.stderr.log"],
}


def server_log_lines(work_dir, server, limit=5):
    """The first distinct lines a server logged (the benchmark sets them to warnings and up)."""
    lines = []
    for name in SERVER_LOGS.get(server, []):
        try:
            with open(os.path.join(work_dir, name), errors="replace") as log_file:
                for line in log_file:
                    line = line.strip()
                    if line and line not in lines:
                        lines.append(line)
        except OSError:
            pass
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more lines"]
    return lines


def read_info(path):
    info, servers = {}, []
    with open(path) as lines:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if fields[0] == "server":
                servers.append({"name": fields[1], "pid": fields[2], "header_bytes": fields[3],
                                "version": fields[4]})
            else:
                info[fields[0]] = fields[1]
    return info, servers


def scenario_label(scenario, info):
    return {
        "keepalive": f"keep-alive, c={info['connections']}",
        "pipelined": f"pipelined x{info['pipeline_depth']}, c={info['connections']}",
        "close": f"new connection per request, c={info['close_connections']}",
    }[scenario]


def report(work_dir):
    info, server_info = read_info(os.path.join(work_dir, "info.tsv"))
    clock_ticks = int(info["clock_ticks"])
    servers = info["servers"].split()
    scenarios = [s for s in SCENARIO_ORDER if s in info["scenarios"].split()]

    runs = {}  # (scenario, server) -> [numbers per round]
    for numbers in read_runs(work_dir, clock_ticks):
        runs.setdefault((numbers["scenario"], numbers["server"]), []).append(numbers)

    problems = []
    medians = {}
    for key, rounds in runs.items():
        medians[key] = {
            "rps": statistics.median(r["rps"] for r in rounds),
            "p99_us": median_or_none(r["p99_us"] for r in rounds),
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rounds),
            "user_us_per_request": statistics.median(r["user_us_per_request"] for r in rounds),
            "server_share": statistics.median(r["server_share"] for r in rounds),
            "wrk_share": statistics.median(r["wrk_share"] for r in rounds),
            "spread": ((max(r["rps"] for r in rounds) - min(r["rps"] for r in rounds))
                       / statistics.median(r["rps"] for r in rounds)) if len(rounds) > 1 else None,
            "errors": {k: sum(r["errors"][k] for r in rounds) for k in rounds[0]["errors"]},
        }
        for r in rounds:
            if is_suspect(r["errors"]):
                problems.append(f"{key[0]} / {key[1]} round {r['round']}: {error_text(r['errors'])}")

    has_squalld = "squalld" in servers
    rounds = int(info["rounds"])
    out = []
    title = " vs ".join(servers)
    out.append(f"## Benchmark: {title}, {info['date']}")
    out.append("")
    out.append(f"- Command: `{info['command']}`")
    out.append(f"- Revision: {info['revision']}")
    out.append(f"- Machine: {info['machine']}; each server pinned to CPU {info['server_cpu']}, "
               f"`wrk -t1 --latency` pinned to CPU {info['client_cpu']}; loopback.")
    out.append("- Servers: " + "; ".join(f"{s['name']}: {s['version']}" for s in server_info)
               + f"; client: {info['wrk']}.")
    out.append(f"- Each number is the median of {rounds} round{'s' if rounds > 1 else ''} of "
               f"{info['duration']} (servers interleaved, order rotated every round). "
               "CPU is the server's utime+stime from /proc/PID/stat over the run, all threads, "
               "divided by the requests wrk completed; user is the utime alone.")
    out.append("")

    header = ["scenario", "server", "req/s", "p99", "CPU us/req", "user us/req", "server CPU",
              "wrk CPU"]
    align = ["l", "l", "r", "r", "r", "r", "r", "r"]
    if rounds > 1:
        header.append("req/s spread")
        align.append("r")
    if has_squalld:
        header += ["squalld/this req/s", "squalld/this CPU/req"]
        align += ["r", "r"]
    header.append("errors")
    align.append("l")
    rows = []
    for scenario in scenarios:
        for index, server in enumerate(servers):
            numbers = medians.get((scenario, server))
            if numbers is None:
                continue
            row = [scenario_label(scenario, info) if index == 0 else "", server,
                   rate(numbers["rps"]), milliseconds(numbers["p99_us"]),
                   cpu(numbers["cpu_us_per_request"]), cpu(numbers["user_us_per_request"]),
                   f"{numbers['server_share']:.0%}",
                   f"{numbers['wrk_share']:.0%}"]
            if rounds > 1:
                row.append(f"{numbers['spread']:.0%}")
            if has_squalld:
                mine = medians.get((scenario, "squalld"))
                if server == "squalld" or mine is None:
                    row += ["-", "-"]
                else:
                    row += [ratio(mine["rps"] / numbers["rps"]),
                            ratio(mine["cpu_us_per_request"] / numbers["cpu_us_per_request"])]
            row.append(error_text(numbers["errors"]))
            rows.append(row)
    out.append("### Throughput")
    out.append("")
    out.append(table(header, rows, align))
    out.append("")
    legend = ["`user us/req` is the part of `CPU us/req` spent in the server's own code "
              "(utime); the rest is the kernel's work for it (stime), each the median of its own "
              "over the rounds.",
              "`server CPU` and `wrk CPU` are the shares of their CPUs the server and wrk used "
              "during the run: near 100% is the one that set the pace; both well below 100% "
              "means something else took the CPUs (see `others` under Every round)."]
    if rounds > 1:
        legend.append("`req/s spread` is (max - min) / median over the rounds.")
    if has_squalld:
        legend.append("The ratios are squalld's median divided by that server's: req/s above 1 "
                      "and CPU/req below 1 favour squalld.")
    legend.append("`errors` sums wrk's socket errors, HTTP statuses >= 400 and timeouts (no "
                  "response within 2s) over all rounds; empty means none.")
    out.append(" ".join(legend))
    out.append("")

    idle_count = int(info["idle_connections"])
    if idle_count > 0:
        rows = []
        for server in servers:
            path = os.path.join(work_dir, f"memory.{server}.json")
            try:
                with open(path) as result_file:
                    result = json.load(result_file)
            except (OSError, ValueError):
                problems.append(f"idle connections / {server}: no result")
                rows.append([server, "-", "-", "-", "-", "-", "no result"])
                continue
            note = result["error"] or ""
            if result["error"]:
                problems.append(f"idle connections / {server}: {result['error']}")
            grown_after_close = (result["after_close"]["rss_kib"]
                                 - result["with_connections"]["rss_kib"])
            if grown_after_close > 0.1 * result["with_connections"]["rss_kib"]:
                note = (note + "; " if note else "") + (
                    f"RSS grew {grown_after_close / 1024:.1f} MiB while the connections closed")
            if result.get("still_open", 0) != result["opened"]:
                note = (note + "; " if note else "") + (
                    f"only {result['still_open']} of {result['opened']} still open when measured")
            mib = lambda kib: f"{kib / 1024:.1f} MiB"
            per_pss = result.get("pss_kib_per_connection")
            rows.append([
                server,
                mib(result["before"]["rss_kib"]),
                mib(result["with_connections"]["rss_kib"]),
                f"{result['rss_kib_per_connection']:.2f}" if "rss_kib_per_connection" in result else "-",
                f"{per_pss:.2f}" if per_pss is not None else "-",
                mib(result["after_close"]["rss_kib"]),
                note,
            ])
        out.append(f"### Idle keep-alive connections ({idle_count:,})")
        out.append("")
        out.append(table(["server", "RSS before", f"RSS with {idle_count:,} idle", "KiB/conn (RSS)",
                          "KiB/conn (Pss)", "RSS after closing", "notes"], rows,
                         ["l", "r", "r", "r", "r", "r", "l"]))
        out.append("")
        out.append("Each connection sent one request and read its response before the reading, "
                   "so the server had set it up fully. RSS is VmRSS of the server's processes; "
                   "kernel socket buffers are not in it. Measured on fresh servers, before the "
                   "throughput runs.")
        if "nginx" in servers:
            out.append("nginx allocates and touches its whole connection array "
                       "(worker_connections 20000, about 0.4 KiB a slot, some 8 MiB) at start, so "
                       "that part of a connection's cost is in its `RSS before`, not in KiB/conn.")
        out.append("")

    out.append("### Notes")
    out.append("")
    out.append("- Response header bytes for GET /plaintext (curl): "
               + ", ".join(f"{s['name']} {s['header_bytes']}" for s in server_info)
               + "; the body is 13 bytes everywhere.")
    out.append(f"- Pipelined: wrk counts every response, but takes one latency sample per batch "
               f"of {info['pipeline_depth']}: the time to the batch's last response. wrk then "
               "corrects its latencies for coordinated omission with an interval computed from "
               f"the response count, {info['pipeline_depth']} times too short for batches, so the "
               "pipelined p99 is "
               "distorted and only roughly comparable between servers; when that correction puts "
               "samples below the smallest one measured, wrk's percentile comes out as 0 (its "
               "bug), shown here as n/a. The latency columns of the other scenarios are wrk's "
               "usual corrected ones.")
    out.append("- New connection per request: wrk sends `Connection: close` and opens a new "
               "connection after each response.")
    out.append("- CPU us/req is the server process's own user+system time (all its threads), "
               "which includes the softirq work the kernel did while it was on the CPU. On "
               "loopback a segment is delivered in the sender's context, so a server pays for "
               "delivering its responses into wrk's socket and wrk for delivering the requests and "
               "for most of each TCP handshake.")
    for server in servers:
        lines = server_log_lines(work_dir, server)
        if lines:
            out.append(f"- {server} logged:")
            out.extend(f"  - `{line}`" for line in lines)
    all_runs = [r for rounds in runs.values() for r in rounds]
    noisy = [r for r in all_runs if max(r["others_server_cpu"], r["others_client_cpu"]) > 0.10]
    if noisy:
        worst = max(noisy, key=lambda r: max(r["others_server_cpu"], r["others_client_cpu"]))
        out.append(f"- The machine was busy with other work: in {len(noisy)} of {len(all_runs)} "
                   f"runs other processes took more than 10% of the server's or wrk's CPU (worst: "
                   f"{worst['scenario']} / {worst['server']} round {worst['round']}, "
                   f"{worst['others_server_cpu']:.0%} / {worst['others_client_cpu']:.0%}). "
                   "CPU us/req holds up better than req/s when that happens.")
    if problems:
        out.append("- **Suspect runs** (their numbers are in the medians above):")
        out.extend(f"  - {problem}" for problem in problems)
    out.append("")

    detail_rows = []
    for scenario in scenarios:
        for server in servers:
            for r in sorted(runs.get((scenario, server), []), key=lambda r: r["round"]):
                detail_rows.append([scenario, server, r["round"], rate(r["rps"]),
                                    milliseconds(r["p99_us"]), cpu(r["cpu_us_per_request"]),
                                    cpu(r["user_us_per_request"]),
                                    r["cpu_ticks"], f"{r['requests']:,}",
                                    f"{r['server_share']:.0%}", f"{r['wrk_share']:.0%}",
                                    f"{r['others_server_cpu']:.0%} / {r['others_client_cpu']:.0%}",
                                    error_text(r["errors"])])
    out.append("<details><summary>Every round</summary>")
    out.append("")
    out.append(table(["scenario", "server", "round", "req/s", "p99", "CPU us/req", "user us/req",
                      f"CPU ticks (1/{clock_ticks} s)", "requests", "server CPU", "wrk CPU",
                      "others on server / wrk CPU", "errors"], detail_rows,
                     ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "l"]))
    out.append("")
    out.append("`others` is the user+system time other processes took on each CPU during the "
               "run (from /proc/stat), as a share of that CPU.")
    out.append("")
    out.append("</details>")
    return "\n".join(out) + "\n", problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work")
    parser.add_argument("--markdown")
    parser.add_argument("--brief", nargs=2, metavar=("RUNS_TSV", "CLOCK_TICKS"))
    args = parser.parse_args()

    if args.brief:
        runs_tsv, clock_ticks = args.brief
        with open(runs_tsv) as lines:
            last = [line for line in lines if line.strip()][-1]
        r = read_run(os.path.dirname(runs_tsv), last, int(clock_ticks))
        line = (f"{rate(r['rps'])} req/s, p99 {milliseconds(r['p99_us'])}, "
                f"{cpu(r['cpu_us_per_request'])} us CPU/req ({cpu(r['user_us_per_request'])} user); "
                f"CPU: server {r['server_share']:.0%}, "
                f"wrk {r['wrk_share']:.0%}, others {r['others_server_cpu']:.0%} / "
                f"{r['others_client_cpu']:.0%}")
        errors = error_text(r["errors"])
        print(line + (f"; errors: {errors}" if errors else ""))
        return 0

    if not args.work or not args.markdown:
        parser.error("give --work and --markdown, or --brief")
    text, problems = report(args.work)
    sys.stdout.write("\n" + text)
    with open(args.markdown, "w") as markdown:
        markdown.write(text)
    print(f"\nbench: report written to {args.markdown}", file=sys.stderr)
    if problems:
        print("bench: some runs had errors; see 'Suspect runs' in the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

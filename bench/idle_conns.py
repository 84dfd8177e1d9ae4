#!/usr/bin/python3
"""Measures what idle keep-alive connections cost a server in memory.

Opens COUNT connections to HOST:PORT one after another; on each it sends one complete
`GET PATH` and reads the whole response, so the server has set the connection up completely
(accepted it, parsed a request, answered) and is holding it idle, waiting for the next request.
The resident memory of the server's process and its descendants is read from /proc before the
connections are opened, while they are all open, and after they are closed. Prints one JSON
object on stdout.

Used by bench/run.sh; standard library only.
"""

import argparse
import json
import os
import resource
import socket
import sys
import time


def process_tree(root_pid):
    """The pid and every descendant pid, from /proc/PID/task/TID/children."""
    pids = [root_pid]
    index = 0
    while index < len(pids):
        pid = pids[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pids.extend(int(child) for child in children.read().split())
            except FileNotFoundError:
                pass
    return pids


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, PermissionError):
        pass
    return None


def memory(root_pid):
    """VmRSS and Pss in KiB, summed over the server's process tree."""
    pids = process_tree(root_pid)
    rss = sum(status_kib(pid, "VmRSS") for pid in pids)
    pss_values = [pss_kib(pid) for pid in pids]
    pss = None if None in pss_values else sum(pss_values)
    return {"rss_kib": rss, "pss_kib": pss, "processes": len(pids)}


def read_response(sock, buffer_size=4096):
    """Reads one response with a Content-Length; returns (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(buffer_size)
        if not chunk:
            raise ConnectionError("closed before the response headers ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise ConnectionError(f"response without Content-Length: {head!r}")
    while len(body) < length:
        chunk = sock.recv(buffer_size)
        if not chunk:
            raise ConnectionError("closed before the response body ended")
        body += chunk
    if len(body) > length:
        raise ConnectionError("more bytes than one response")
    return status, body


def raise_open_file_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's (root) process")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--path", default="/plaintext")
    parser.add_argument("--expect-body", default="Hello, World!")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait before each memory reading")
    args = parser.parse_args()

    limit = raise_open_file_limit(args.count + 64)
    if limit < args.count + 16:
        print(f"idle_conns: the open-file limit is {limit}, too low for {args.count} connections",
              file=sys.stderr)
        return 2

    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               f"User-Agent: squall-bench-idle\r\n\r\n").encode()
    result = {"count": args.count, "opened": 0, "error": None}

    time.sleep(args.settle)
    result["before"] = memory(args.pid)

    sockets = []
    started = time.monotonic()
    try:
        for _ in range(args.count):
            sock = socket.create_connection((args.host, args.port), timeout=10)
            sockets.append(sock)
            sock.sendall(request)
            status, body = read_response(sock)
            if status != 200 or body != args.expect_body.encode():
                raise ConnectionError(f"unexpected response: {status} {body[:80]!r}")
            result["opened"] += 1
    except (OSError, ValueError) as error:
        result["error"] = f"connection {len(sockets)}: {error}"
    result["open_seconds"] = round(time.monotonic() - started, 3)

    time.sleep(args.settle)
    result["with_connections"] = memory(args.pid)

    # Each connection should still be open and idle: nothing to read, no EOF.
    still_open = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            still_open += 0 if sock.recv(1) == b"" else 0
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
    result["still_open"] = still_open

    for sock in sockets:
        sock.close()
    time.sleep(args.settle)
    result["after_close"] = memory(args.pid)

    opened = result["opened"]
    if opened:
        grown = result["with_connections"]["rss_kib"] - result["before"]["rss_kib"]
        result["rss_kib_per_connection"] = round(grown / opened, 3)
        if result["before"]["pss_kib"] is not None and result["with_connections"]["pss_kib"] is not None:
            grown_pss = result["with_connections"]["pss_kib"] - result["before"]["pss_kib"]
            result["pss_kib_per_connection"] = round(grown_pss / opened, 3)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())

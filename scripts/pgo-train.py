#!/usr/bin/env python3
"""The training run of `make pgo`: a profiling squalld (build/pgo-train/squalld) answers what a
deployment sees most, and its counts, written when it exits, shape the optimised build.

    scripts/pgo-train.py SQUALLD PROFILE_DIR

squalld runs on 127.0.0.1:0 with a temporary configuration (mail to a Maildir, the job store in
the same directory, the shipped defaults otherwise, access log included) and gets, from this
script alone: keep-alive GET /plaintext over several connections, the same pipelined, /healthz,
/metrics, POST /echo (fixed length and chunked), POST /email and GET /jobs/{id}, and the answers
no deployment escapes (404, 405, 400 for a bad email and
for malformed heads, 505). Every answer's status is
checked: a profile of a server that misbehaves is not one to build from. Then SIGTERM, and the
profile files must be there. Standard library only."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEEPALIVE_REQUESTS = 30_000  # GET /plaintext over KEEPALIVE_CONNECTIONS, one at a time each.
KEEPALIVE_CONNECTIONS = 8
PIPELINED_WRITES = 1_500  # Writes of PIPELINE_DEPTH requests each.
PIPELINE_DEPTH = 16
EMAILS = 1_000
PLAINTEXT = b"GET /plaintext HTTP/1.1\r\nHost: squall\r\nUser-Agent: pgo-train\r\nAccept: */*\r\n\r\n"


def fail(message: str) -> None:
    sys.exit(f"pgo-train: {message}")


def config(work: Path) -> str:
    return f"""\
[smtp]
url = "maildir:{work / 'mail'}"

[jobs]
store = "{work / 'jobs.db'}"

[log]
error_log = "{work / 'error.log'}"
access_log = "{work / 'access.log'}"

[quota]
token_per_minute = 1000000
token_burst = 1000000
address_per_minute = 1000000
address_burst = 1000000
"""


def start(squalld: str, work: Path) -> tuple[subprocess.Popen, int]:
    (work / "squalld.toml").write_text(config(work))
    port_file = work / "port"
    proc = subprocess.Popen(
        [squalld, "--config", str(work / "squalld.toml"), "--listen", "127.0.0.1:0",
         "--port-file", str(port_file)],
        cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "stderr", "wb"))
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().endswith("\n")):
        if proc.poll() is not None:
            fail(f"{squalld} exited with {proc.returncode}: {(work / 'stderr').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            fail(f"{squalld} wrote no port file in 30 s")
        time.sleep(0.02)
    return proc, int(port_file.read_text().strip().rsplit(":", 1)[1])


def read_answers(sock: socket.socket, count: int, buffer: bytearray) -> list[int]:
    """Reads count whole answers (Content-Length framed) from sock; returns their statuses."""
    statuses = []
    while len(statuses) < count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if len(buffer) >= end + 4 + length:
                statuses.append(int(head[0].split(" ")[1]))
                del buffer[:end + 4 + length]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            fail(f"the server closed a connection after {len(statuses)} of {count} answers")
        buffer += chunk
    return statuses


def expect(what: str, statuses: list[int], status: int) -> None:
    wrong = [s for s in statuses if s != status]
    if wrong:
        fail(f"{what}: {len(wrong)} answers were not {status} (first: {wrong[0]})")


def keepalive(port: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(KEEPALIVE_CONNECTIONS)]
    buffers = [bytearray() for _ in socks]
    for _ in range(KEEPALIVE_REQUESTS // KEEPALIVE_CONNECTIONS):
        for sock in socks:
            sock.sendall(PLAINTEXT)
        for sock, buffer in zip(socks, buffers):
            expect("keep-alive GET /plaintext", read_answers(sock, 1, buffer), 200)
    for sock in socks:
        sock.close()


def pipelined(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        buffer = bytearray()
        for _ in range(PIPELINED_WRITES):
            sock.sendall(PLAINTEXT * PIPELINE_DEPTH)
            expect("pipelined GET /plaintext", read_answers(sock, PIPELINE_DEPTH, buffer), 200)


def call(conn: http.client.HTTPConnection, method: str, target: str, status: int,
         body=None, headers: dict | None = None) -> bytes:
    chunked = (headers or {}).get("Transfer-Encoding") == "chunked"
    conn.request(method, target, body=body, headers=headers or {}, encode_chunked=chunked)
    response = conn.getresponse()
    data = response.read()
    if response.status != status:
        fail(f"{method} {target}: {response.status}, not {status}: {data[:200]!r}")
    return data


def routes(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ids = []
    for i in range(EMAILS):
        email = {"to": [f"user{i}@example.com"], "cc": ["copy@example.org"],
                 "subject": f"Training {i}", "text": "Hello\n" * (1 + i % 40)}
        if i % 3 == 0:
            email["html"] = f"<p>Hello {i}</p>"
        answer = call(conn, "POST", "/email", 202, json.dumps(email).encode(),
                      {"Content-Type": "application/json"})
        ids.append(json.loads(answer)["id"])
        if i % 10 == 0:
            call(conn, "POST", "/email", 400, b'{"to": ["not an address"], "subject": "x"}',
                 {"Content-Type": "application/json"})
            call(conn, "GET", f"/jobs/{ids[-1]}", 200)
            call(conn, "GET", "/healthz", 200)
            call(conn, "POST", "/echo", 200, b"x" * (i % 5000), {"Content-Type": "text/plain"})
            call(conn, "POST", "/echo", 200, iter([b"chunk one,", b" chunk two"]),
                 {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
            call(conn, "GET", "/no-such-route", 404)
            call(conn, "DELETE", "/plaintext", 405)
        if i % 100 == 0:
            call(conn, "GET", "/metrics", 200)
    for job_id in ids[::7]:
        call(conn, "GET", f"/jobs/{job_id}", 200)
    conn.close()


def malformed(port: int) -> None:
    """Heads every public server gets: each is answered 400 (505: an unknown version) and the
    connection closed."""
    heads = [(b"GET /plaintext HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
              400),
             (b"GET /plaintext HTTP/9.9\r\nHost: a\r\n\r\n", 505),
             (b"GET /plaintext HTTP/1.1\r\nBad Header\r\n\r\n", 400),
             (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP\r\n\r\n", 400)]
    for _ in range(50):
        for head, status in heads:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 %d " % status):
                    fail(f"{head[:40]!r}: {answer[:60]!r}, not {status}")


def main() -> None:
    if len(sys.argv) != 3:
        fail("usage: scripts/pgo-train.py SQUALLD PROFILE_DIR")
    squalld, profile = str(Path(sys.argv[1]).resolve()), Path(sys.argv[2])
    with tempfile.TemporaryDirectory(prefix="squall-pgo-") as directory:
        work = Path(directory)
        proc, port = start(squalld, work)
        try:
            began = time.monotonic()
            keepalive(port)
            pipelined(port)
            routes(port)
            malformed(port)
            keepalive(port)  # The request path again, after the rest: it dominates the counts.
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.send_signal(signal.SIGTERM)  # The counts are written as squalld exits.
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            fail("squalld did not exit within 60 s of SIGTERM")
        if code != 0:
            fail(f"squalld exited with {code}: {(work / 'error.log').read_text()[-2000:]}")
    counts = list(profile.glob("*.gcda"))
    if not counts:
        fail(f"no profile in {profile}: was {squalld} built for training (make pgo builds it)?")
    print(f"pgo-train: {len(counts)} profile files in {profile} after "
          f"{time.monotonic() - began:.1f} s of training")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""bench/bare_count_check.py: checks that the bare loop (bench/bare_http_uv.c) answers as many
requests as it was sent, however the bytes are cut into reads.

Sends random streams (CR, LF and letters in any order, and runs of pipelined GETs) in up to nine
pieces, a short pause between pieces so that most become reads of their own, then half-closes
and reads every answer. The loop must send one answer per non-overlapping "\\r\\n\\r\\n" in the
stream. Given a second binary (OLD, e.g. an earlier build of the loop), both must send the same
bytes for every stream.

Usage:  bench/bare_count_check.py [BARE [OLD]]   (default: bench/bare_http_uv.c, built with cc)
Environment: STREAMS, how many streams [300]; SEED [1].
"""
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def build(directory: str) -> str:
    binary = os.path.join(directory, "bare_http_uv")
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", binary,
                    str(BENCH / "bare_http_uv.c"), "-luv"], check=True)
    return binary


def start(binary: str):
    process = subprocess.Popen([binary], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        sys.exit(f"bare_count_check: {binary} printed {line!r}, not 'listening on HOST:PORT'")
    return process, int(line.rsplit(":", 1)[1])


def answers(port: int, pieces: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            s.sendall(piece)
            time.sleep(0.0005)  # Not needed for the answer: it only makes the pieces reads.
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def main() -> int:
    streams = int(os.environ.get("STREAMS", "300"))
    rng = random.Random(int(os.environ.get("SEED", "1")))
    with tempfile.TemporaryDirectory() as directory:
        binaries = sys.argv[1:3] or [build(directory)]
        servers = [start(binary) for binary in binaries]
        try:
            answer_bytes = len(answers(servers[0][1], [b"GET / HTTP/1.1\r\n\r\n"]))
            for number in range(streams):
                if number % 3 == 0:
                    stream = b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n" * rng.randint(1, 20)
                else:
                    stream = bytes(rng.choice(b"\r\n\r\nab") for _ in range(rng.randint(1, 120)))
                cuts = sorted(rng.sample(range(1, len(stream)),
                                         min(len(stream) - 1, rng.randint(0, 8))))
                pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
                got = [answers(port, pieces) for _, port in servers]
                expected = stream.count(b"\r\n\r\n") * answer_bytes
                if len(got[0]) != expected:
                    print(f"bare_count_check: {binaries[0]} sent {len(got[0])} bytes for "
                          f"{pieces!r}, expected {expected}", file=sys.stderr)
                    return 1
                if len(got) > 1 and got[1] != got[0]:
                    print(f"bare_count_check: {binaries[1]} answered {pieces!r} differently",
                          file=sys.stderr)
                    return 1
        finally:
            for process, _ in servers:
                process.kill()
                process.wait()
    print(f"bare_count_check: {streams} streams, every answer counted"
          + (", both loops alike" if len(binaries) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

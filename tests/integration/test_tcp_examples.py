"""The TCP examples: examples/tcp_echo_server.cpp (Tornado's echo server, coroutine style) and
examples/tcp_client.cpp, started as a user would start them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from squall_helpers import examples_dir

EXAMPLES = examples_dir()
ECHO_SERVER = EXAMPLES / "tcp_echo_server"
CLIENT = EXAMPLES / "tcp_client"

pytestmark = pytest.mark.skipif(
    not (os.access(ECHO_SERVER, os.X_OK) and os.access(CLIENT, os.X_OK)),
    reason=f"{ECHO_SERVER} or {CLIENT} is missing: run `make examples`",
)


class EchoServer:
    def __init__(self):
        self.proc = subprocess.Popen(
            [str(ECHO_SERVER), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, f"unexpected first line {line!r}"
        self.port = int(match.group(1))

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock

    def stop(self, signum=signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=5)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.kill()


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_echo_server_answers_each_line_of_several_clients(echo_server):
    clients = [echo_server.connect() for _ in range(5)]
    for i, sock in enumerate(clients):
        sock.sendall(f"hello from {i}\n".encode())
    for i, sock in enumerate(clients):
        assert read_line(sock) == f"hello from {i}\n".encode()
    # A line sent in pieces comes back whole; two lines in one send come back as two.
    sock = clients[0]
    sock.sendall(b"ab")
    sock.sendall(b"c\nsecond\n")
    assert read_line(sock) == b"abc\n"
    assert read_line(sock) == b"second\n"
    for sock in clients:
        sock.close()
    status, out, err = echo_server.stop()
    assert status == 0, err
    assert out == "stopped\n"
    assert "error" not in err.lower(), err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_echo_server_stops_cleanly_with_connections_open(echo_server, signum):
    idle = echo_server.connect()
    mid_line = echo_server.connect()
    mid_line.sendall(b"no newline yet")
    assert_echo = echo_server.connect()
    assert_echo.sendall(b"x\n")
    assert read_line(assert_echo) == b"x\n"
    start = time.monotonic()
    status, out, err = echo_server.stop(signum)
    assert status == 0, err
    assert time.monotonic() - start < 2
    assert out == "stopped\n"
    assert "error" not in err.lower(), err
    # The connections were closed by the server.
    for sock in (idle, mid_line, assert_echo):
        assert sock.recv(100) == b""
        sock.close()


def test_client_sends_lines_and_prints_the_answers(echo_server):
    result = subprocess.run(
        [str(CLIENT), "127.0.0.1", str(echo_server.port), "hello", "two words", ""],
        capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\ntwo words\n\n"
    # Lines from standard input, and a name resolved without blocking the loop.
    result = subprocess.run(
        [str(CLIENT), "localhost", str(echo_server.port)],
        input="first\nsecond\n", capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "first\nsecond\n"
    status, _, err = echo_server.stop()
    assert status == 0, err


def test_client_names_a_refused_server_and_fails():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    result = subprocess.run(
        [str(CLIENT), "127.0.0.1", str(port), "hello"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 1
    target = f"127.0.0.1:{port}"
    assert result.stderr == f"tcp_client: connect to {target} failed: {target}: connection refused\n"
    assert result.stdout == ""

"""http::Client through its examples (build/examples/fetch_*) against local servers only:
squalld itself, and Python servers started here that are slow, reset, never answer, redirect,
send too much, or speak TLS with a certificate from a CA made by the openssl CLI."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = Path(
    os.environ.get("SEND_EMAIL") or str(REPO / "build" / "examples" / "send_email")
).parent
FETCH = str(EXAMPLES / "fetch_callback")
FETCH_MANY = str(EXAMPLES / "fetch_many")
FETCH_TASK = str(EXAMPLES / "fetch_task")
FETCH_BENCH = str(EXAMPLES / "fetch_bench")

pytestmark = pytest.mark.skipif(
    not os.access(FETCH, os.X_OK), reason=f"{FETCH} is missing: run `make examples`"
)


# --------------------------------------------------------------------------------------------
# Local upstream servers


class Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops SYNs of ten connects at once (1 s retry).

    def __init__(self, tls_context=None):
        super().__init__(("127.0.0.1", 0), Handler)
        if tls_context is not None:
            self.socket = tls_context.wrap_socket(self.socket, server_side=True)
        self.released = threading.Event()  # Ends the handlers that never answer.
        self.lock = threading.Lock()
        self.running = 0  # Requests being handled now.
        self.most_running = 0  # The most at once.
        self.requests = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path, scheme="http"):
        return f"{scheme}://127.0.0.1:{self.server_address[1]}{path}"

    def stop(self):
        self.released.set()
        self.shutdown()
        self.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests += 1
            server.running += 1
            server.most_running = max(server.most_running, server.running)
        try:
            self.route()
        finally:
            with server.lock:
                server.running -= 1

    def route(self):
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        if parts[0] == "hello":
            self.answer(200, b"hello from python",
                        [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        elif parts[0] == "slow":
            time.sleep(int(parts[1]) / 1000)
            self.answer(200, b"slow")
        elif parts[0] == "redirect":
            left = int(parts[1])
            if left == 0:
                self.answer(200, b"arrived")
            else:
                self.answer(302, b"", [("Location", f"/redirect/{left - 1}")])
        elif parts[0] == "big":
            self.answer(200, b"z" * int(parts[1]))
        elif parts[0] == "reset":
            # RST instead of FIN: linger on, zero seconds.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif parts[0] == "never":
            self.server.released.wait(30)
            self.close_connection = True
        else:
            self.answer(404, b"no such path")


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing")
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=squall test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d


@pytest.fixture
def tls_upstream(tls_files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "server.pem", tls_files / "server.key")
    server = Upstream(tls_context=context)
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------
# fetch_callback


class Fetched:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stderr = proc.stderr.decode()
        head, _, self.body = proc.stdout.partition(b"\n\n")
        self.headers = []
        self.fields = {}
        for line in head.decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "header":
                name, _, v = value.partition(": ")
                self.headers.append((name, v))
            else:
                self.fields[key] = value

    @property
    def status(self):
        return int(self.fields["status"])

    def header_values(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def timings(self):
        return {k: int(v) for k, v in
                (item.split("=") for item in self.fields["timings_us"].split())}


def fetch(*args, timeout=20) -> Fetched:
    proc = subprocess.run([FETCH, *args], capture_output=True, timeout=timeout)
    return Fetched(proc)


def test_fetch_callback_gets_squalld_plaintext(squalld):
    server = squalld()
    got = fetch(server.url("/plaintext"))
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert got.body == b"Hello, World!"
    assert got.header_values("Server") == ["squall"]
    assert got.fields["effective_url"] == server.url("/plaintext")
    t = got.timings
    assert 0 < t["connect"] <= t["first_byte"] <= t["total"]
    assert t["tls"] == 0


def test_fetch_callback_posts_to_squalld_echo(squalld):
    server = squalld()
    got = fetch("--header", "Content-Type: application/json", "--data", '{"a": [1, 2]}',
                server.url("/echo"))
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert got.body == b'{"a": [1, 2]}'
    assert got.header_values("Content-Type") == ["application/json"]


def test_non_2xx_is_a_response_and_repeated_headers_stay(upstream):
    missing = fetch(upstream.url("/missing"))
    assert missing.returncode == 0 and missing.status == 404
    assert missing.body == b"no such path"
    hello = fetch(upstream.url("/hello"))
    assert hello.header_values("Set-Cookie") == ["a=1", "b=2"]


def test_redirect_chain_followed_only_when_asked(upstream):
    plain = fetch(upstream.url("/redirect/3"))
    assert plain.returncode == 0 and plain.status == 302
    assert plain.header_values("Location") == ["/redirect/2"]
    followed = fetch("--follow", "5", upstream.url("/redirect/3"))
    assert followed.returncode == 0, followed.stderr
    assert followed.status == 200 and followed.body == b"arrived"
    assert followed.fields["redirects"] == "3"
    assert followed.fields["effective_url"] == upstream.url("/redirect/0")
    too_many = fetch("--follow", "2", upstream.url("/redirect/5"))
    assert too_many.returncode == 1
    assert too_many.stderr.startswith("error protocol: ")
    assert upstream.url("/redirect/5") in too_many.stderr


def test_body_over_the_limit_is_too_large(upstream):
    got = fetch("--max-body", "10000", upstream.url("/big/20000"))
    assert got.returncode == 1
    assert got.stderr.startswith("error too_large: "), got.stderr
    assert upstream.url("/big/20000") in got.stderr
    assert "max_body_size (10000 bytes)" in got.stderr
    fits = fetch("--max-body", "20000", upstream.url("/big/20000"))
    assert fits.returncode == 0 and len(fits.body) == 20000


def test_server_that_resets(upstream):
    got = fetch(upstream.url("/reset"))
    assert got.returncode == 1
    assert got.stderr.startswith("error protocol: "), got.stderr
    assert upstream.url("/reset") in got.stderr


def test_server_that_never_answers_times_out(upstream):
    started = time.monotonic()
    got = fetch("--timeout", "300", upstream.url("/never"))
    assert got.returncode == 1
    assert got.stderr.startswith("error timeout: "), got.stderr
    assert upstream.url("/never") in got.stderr
    assert time.monotonic() - started < 5


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = fetch(f"http://127.0.0.1:{port}/x")
    assert got.returncode == 1
    assert got.stderr.startswith("error connect_refused: "), got.stderr
    assert f"http://127.0.0.1:{port}/x" in got.stderr


def test_tls_with_the_ca_file(tls_upstream, tls_files):
    url = tls_upstream.url("/hello", scheme="https")
    got = fetch("--cacert", str(tls_files / "ca.pem"), url)
    assert got.returncode == 0, got.stderr
    assert got.status == 200 and got.body == b"hello from python"
    t = got.timings
    assert 0 < t["connect"] < t["tls"] <= t["first_byte"] <= t["total"]


def test_tls_self_signed_without_the_ca_file_is_refused(tls_upstream):
    url = tls_upstream.url("/hello", scheme="https")
    got = fetch(url)
    assert got.returncode == 1
    assert got.stderr.startswith("error tls: "), got.stderr
    assert url in got.stderr


def test_tls_with_another_ca_is_refused(tls_upstream, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "other.key", "-out", "other.pem", "-days", "1", "-subj", "/CN=other CA"],
                   cwd=tmp_path, check=True, capture_output=True)
    got = fetch("--cacert", str(tmp_path / "other.pem"),
                tls_upstream.url("/hello", scheme="https"))
    assert got.returncode == 1
    assert got.stderr.startswith("error tls: "), got.stderr


# --------------------------------------------------------------------------------------------
# fetch_task: the same fetch awaited by a Task


def test_fetch_task_gets_squalld_plaintext(squalld):
    server = squalld()
    proc = subprocess.run([FETCH_TASK, server.url("/plaintext")], capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    head, _, body = proc.stdout.partition(b"\n\n")
    assert head.splitlines()[0] == b"status 200"
    assert b"header Server: squall" in head.splitlines()
    assert body == b"Hello, World!"


def test_fetch_task_error_is_thrown_with_its_kind(upstream):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    proc = subprocess.run([FETCH_TASK, url], capture_output=True, timeout=20)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("error connect_refused: "), proc.stderr
    assert url in proc.stderr.decode()
    timed = subprocess.run([FETCH_TASK, "--timeout", "300", upstream.url("/never")],
                           capture_output=True, timeout=20)
    assert timed.returncode == 1
    assert timed.stderr.decode().startswith("error timeout: "), timed.stderr


# --------------------------------------------------------------------------------------------
# fetch_many: a handler that fetches ten URLs at once


def start_example(args):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def test_ten_fetches_at_once_take_about_one_fetch(upstream):
    slow_ms = 500
    proc, address = start_example([FETCH_MANY, upstream.url(f"/slow/{slow_ms}"), "0"])
    try:
        started = time.monotonic()
        with urllib.request.urlopen(f"http://{address}/gather?n=10", timeout=20) as reply:
            answer = json.loads(reply.read())
        elapsed = time.monotonic() - started
        assert answer["statuses"] == [200] * 10
        assert answer["errors"] == []
        # Ten sequential fetches would take 5 s; at once, about one.
        assert slow_ms / 1000 <= elapsed < 2.5 * slow_ms / 1000, elapsed
        assert slow_ms <= answer["elapsed_ms"] < 2.5 * slow_ms
        assert upstream.most_running == 10
        assert upstream.requests == 10
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == b""


def test_fetch_many_reports_upstream_errors(upstream):
    proc, address = start_example([FETCH_MANY, upstream.url("/reset"), "0"])
    try:
        try:
            urllib.request.urlopen(f"http://{address}/gather?n=3", timeout=20)
            raise AssertionError("expected a 502")
        except urllib.error.HTTPError as error:
            assert error.code == 502
            answer = json.loads(error.read())
        assert len(answer["errors"]) == 3
        assert all(upstream.url("/reset") in e for e in answer["errors"])
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# --------------------------------------------------------------------------------------------
# fetch_bench: the load generator of bench/run_client.sh


def test_fetch_bench_runs_against_squalld(squalld):
    server = squalld()
    accepted_before = server.metrics().value("squall_connections_accepted_total")
    proc = subprocess.run(
        [FETCH_BENCH, "--concurrency", "8", "--seconds", "0.5", "--warmup", "0.1",
         server.url("/plaintext")],
        capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["fetches"] > 50
    assert result["errors"] == 0 and result["non_2xx"] == 0
    assert result["cpu_us_per_fetch"] > 0
    # Eight connections, kept alive for every fetch (plus the one reading the metrics).
    accepted = server.metrics().value("squall_connections_accepted_total") - accepted_before
    assert accepted == 8 + 1

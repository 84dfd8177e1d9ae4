"""The example programs of examples/, each started as a user would and checked: a coroutine
handler, a periodic callback, two slow things at once with when_all, reply first and work later,
a handler that blocks the loop, a streamed response with back-pressure, and a streamed upload. Binaries come from
$EXAMPLES_DIR, else from the examples/ directory beside $SQUALLD, else build/examples."""

import http.client
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from squall_helpers import examples_dir


def example(name: str) -> str:
    path = examples_dir() / name
    assert os.access(path, os.X_OK), f"{path} is missing: run `make examples`"
    return str(path)


class Example:
    """A running example server on port 0: its port comes through --port-file."""

    def __init__(self, name: str, tmp_path: Path, env: dict | None = None):
        self.port_file = tmp_path / f"{name}.port"
        self.proc = subprocess.Popen(
            [example(name), "0", "--port-file", str(self.port_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 10
        while True:
            text = self.port_file.read_text() if self.port_file.exists() else ""
            if text.endswith("\n"):
                self.port = int(text)
                break
            assert self.proc.poll() is None, f"{name} exited early: {self.output()}"
            assert time.monotonic() < deadline, f"{name} wrote no port file: {self.output()}"
            time.sleep(0.01)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def get(self, target: str, timeout=10.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def wait_for_output(self, text: str, timeout=5.0):
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"no {text!r} in: {self.output()}"
            time.sleep(0.01)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self.reader.join(timeout=5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_example(tmp_path):
    started = []

    def start(name, env=None):
        ex = Example(name, tmp_path, env)
        started.append(ex)
        return ex

    yield start
    for ex in started:
        ex.kill()


def test_coroutine_handler_awaits_pool_work_and_a_sleep(run_example):
    ex = run_example("coroutine_handler")
    began = time.monotonic()
    status, body = ex.get("/digest?text=abc&delay_ms=200")
    took = time.monotonic() - began
    assert status == 200
    assert len(body.strip()) == 16 and int(body, 16) >= 0
    assert took >= 0.2
    # Same input, same digest: the pool work really ran on the text.
    assert ex.get("/digest?text=abc&delay_ms=0") == (200, body)
    assert ex.get("/digest?text=abd&delay_ms=0")[1] != body
    assert ex.get("/digest?delay_ms=-1")[0] == 400
    assert ex.stop(signal.SIGINT) == 0


def test_coroutine_handler_returning_a_response(run_example):
    # /digest.json is the same work as a Task<Response> handler: the whole answer as a value.
    ex = run_example("coroutine_handler")
    _, plain = ex.get("/digest?text=abc&delay_ms=0")
    conn = http.client.HTTPConnection("127.0.0.1", ex.port, timeout=10)
    try:
        began = time.monotonic()
        conn.request("GET", "/digest.json?text=abc&delay_ms=200")
        response = conn.getresponse()
        body = response.read().decode()
        took = time.monotonic() - began
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Cache-Control") == "max-age=60"
        assert body == '{"digest":"%s"}\n' % plain.strip()
        assert took >= 0.2
        conn.request("GET", "/digest.json?delay_ms=20000")
        response = conn.getresponse()
        assert response.status == 400
        assert "delay_ms must be between 0 and 10000" in response.read().decode()
    finally:
        conn.close()
    assert ex.stop() == 0


def test_coroutine_handler_serves_others_while_it_sleeps(run_example):
    ex = run_example("coroutine_handler")
    results = {}

    def slow():
        results["slow"] = ex.get("/digest?text=a&delay_ms=4000")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.1)
    assert ex.get("/digest?text=b&delay_ms=0")[0] == 200
    # Answered while the other handler still sleeps, not behind it. (Its pool work alone can
    # take most of a second under ThreadSanitizer on a busy machine: no bound on its own time.)
    assert "slow" not in results
    thread.join(timeout=10)
    assert results["slow"][0] == 200
    assert ex.stop() == 0


def test_periodic_callback_ticks_on_its_period_and_stops_after_count(tmp_path):
    began = time.monotonic()
    out = subprocess.run([example("periodic"), "--period-ms", "50", "--count", "6"],
                         capture_output=True, text=True, timeout=10)
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr
    ticks = [line for line in out.stdout.splitlines() if line.startswith("tick ")]
    assert [t.split()[1] for t in ticks] == ["1", "2", "3", "4", "5", "6"]
    at = [int(t.split("+")[1].split()[0]) for t in ticks]
    # Runs sit on the grid k * 50 ms: never early, at most one per grid slot (a late run does
    # not bring the next one earlier or twice).
    for k, ms in enumerate(at, start=1):
        assert ms >= 50 * k - 1
    slots = [ms // 50 for ms in at]
    assert all(b > a for a, b in zip(slots, slots[1:]))
    assert took >= 0.29


def test_periodic_callback_exits_cleanly_on_sigterm():
    proc = subprocess.Popen([example("periodic"), "--period-ms", "20", "--count", "100000"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("tick 1 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_when_all_takes_the_slower_time_not_the_sum(run_example):
    ex = run_example("when_all")
    began = time.monotonic()
    status, body = ex.get("/both?wait_ms=400&work_ms=500")
    took = time.monotonic() - began
    assert status == 200
    assert body.startswith("lookup done, report done in ")
    assert 0.5 <= took < 0.85, f"took {took:.3f} s: the two waits did not overlap (sum 0.9 s)"
    reported_ms = int(body.split(" in ")[1].split()[0])
    assert 495 <= reported_ms < 850
    assert ex.stop() == 0


def test_reply_first_answers_at_once_and_finishes_the_work_later(run_example):
    ex = run_example("reply_first")
    began = time.monotonic()
    status, body = ex.get("/work?ms=600")
    assert status == 202 and body == "job 1 accepted\n"
    assert time.monotonic() - began < 0.4  # Before the work is done.
    assert ex.get("/status") == (200, "accepted 1 finished 0\n")
    ex.wait_for_output("job 1 finished")
    assert time.monotonic() - began >= 0.6
    assert ex.get("/status") == (200, "accepted 1 finished 1\n")
    assert ex.stop() == 0


def test_a_handler_that_blocks_the_loop_is_named_in_a_warning(run_example):
    ex = run_example("blocking_handler")
    results = {}

    def blocked():
        results["block"] = ex.get("/block?ms=700")

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.1)
    began = time.monotonic()
    assert ex.get("/hello") == (200, "hello\n")
    waited = time.monotonic() - began
    thread.join(timeout=10)
    assert results["block"] == (200, "blocked the loop\n")
    assert waited >= 0.4  # /hello waited for the blocked loop.
    ex.wait_for_output("handler for GET /block blocked the event loop for ")
    ex.wait_for_output("(loop.blocking_threshold 50 ms)")
    ex.wait_for_output("event loop lag ")
    # The fix: the same work on the pool leaves the loop free.
    thread = threading.Thread(target=lambda: results.update(fixed=ex.get("/fixed?ms=700")))
    thread.start()
    time.sleep(0.1)
    began = time.monotonic()
    assert ex.get("/hello") == (200, "hello\n")
    assert time.monotonic() - began < 0.4  # Not behind the 0.7 s of work.
    thread.join(timeout=10)
    assert results["fixed"] == (200, "worked on the pool\n")
    assert "handler for GET /fixed blocked" not in ex.output()
    assert ex.stop() == 0


def _pattern_ok(body: bytes) -> bool:
    unit = bytes(range(ord("a"), ord("a") + 26))
    whole = unit * (len(body) // 26 + 1)
    return body == whole[: len(body)]


def test_stream_download_sends_every_byte_in_order(run_example):
    ex = run_example("stream_download")
    conn = http.client.HTTPConnection("127.0.0.1", ex.port, timeout=10)
    conn.request("GET", "/stream?mib=8")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200
    assert len(body) == 8 * 1024 * 1024
    assert _pattern_ok(body)
    assert ex.get("/stream?mib=-1")[0] == 400
    assert ex.stop() == 0


def test_stream_download_waits_for_a_slow_client_with_bounded_memory(run_example):
    import re
    import socket

    ex = run_example("stream_download")
    with socket.create_connection(("127.0.0.1", ex.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.sendall(b"GET /stream?mib=64 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)  # A client that does not read for a while (nothing to await).
        received = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
    assert received > 64 * 1024 * 1024
    ex.wait_for_output("streamed 64 MiB")
    match = re.search(r"streamed 64 MiB, waited (\d+) times, at most (\d+) bytes unsent",
                      ex.output())
    assert match, ex.output()
    assert int(match.group(1)) > 0
    # The high-water mark (256 KiB) plus one 64 KiB chunk, not the 64 MiB answer.
    assert int(match.group(2)) <= 256 * 1024 + 2 * 64 * 1024
    assert ex.stop() == 0


def _fnv1a64(data: bytes, state: int = 0xCBF29CE484222325) -> int:
    for byte in data:
        state = ((state ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return state


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_upload_stream_counts_and_checksums_an_upload_as_it_arrives(run_example):
    ex = run_example("upload_stream")
    body = os.urandom(300 * 1024 + 7)
    expected = f"bytes={len(body)} fnv1a64={_fnv1a64(body):016x}"
    for target in ("/upload", "/upload-callbacks"):
        # Content-Length framing.
        conn = http.client.HTTPConnection("127.0.0.1", ex.port, timeout=10)
        conn.request("POST", target, body=body)
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
        assert text.startswith(expected), text
        # Chunked framing, on the same (kept-alive) connection, in uneven pieces.
        pieces = [body[i:i + 70001] for i in range(0, len(body), 70001)]
        conn.request("POST", target, body=iter(pieces), encode_chunked=True)
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        assert response.status == 200, text
        assert text.startswith(expected), text
    assert ex.stop() == 0


def _upload_while_watching_rss(port: int, pid: int, total: int, target: str) -> tuple[str, int]:
    """Sends `total` bytes of body as fast as the server takes them; returns the answer and
    the server's highest RSS (KiB) seen meanwhile."""
    import socket

    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    block = bytes(range(256)) * 4096  # 1 MiB
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n"
                         "Connection: close\r\n\r\n".encode())
            sent = 0
            while sent < total:
                chunk = block[: min(len(block), total - sent)]
                sock.sendall(chunk)
                sent += len(chunk)
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    finally:
        done.set()
        watcher.join()
    return answer.decode(errors="replace"), peak


# AddressSanitizer keeps freed memory in a quarantine (256 MiB by default) to catch a use after
# free; a streamed upload frees every read buffer, so under `make integration SANITIZE=address`
# the resident memory would measure that quarantine, not the server. A small one keeps the bound
# meaningful there too (the variable means nothing to a build without the sanitizer).
SMALL_ASAN_QUARANTINE = {
    "ASAN_OPTIONS": ":".join(filter(None, [os.environ.get("ASAN_OPTIONS", ""),
                                           "quarantine_size_mb=4"]))}


def test_upload_stream_takes_200_mib_in_bounded_memory(run_example):
    ex = run_example("upload_stream", SMALL_ASAN_QUARANTINE)
    assert ex.get("/upload")[0] == 405  # Warms the server up before the baseline.
    baseline = _rss_kib(ex.proc.pid)
    total = 200 * 1024 * 1024
    answer, peak = _upload_while_watching_rss(ex.port, ex.proc.pid, total, "/upload")
    assert answer.startswith("HTTP/1.1 200"), answer
    assert f"bytes={total} " in answer, answer
    # A buffered body would cost 200 MiB; streamed, a few read buffers.
    assert peak - baseline < 32 * 1024, (baseline, peak)
    assert ex.stop() == 0


def test_upload_stream_slow_handler_holds_the_client_back_in_bounded_memory(run_example):
    ex = run_example("upload_stream", SMALL_ASAN_QUARANTINE)
    assert ex.get("/upload")[0] == 405
    baseline = _rss_kib(ex.proc.pid)
    total = 32 * 1024 * 1024
    # 1 ms after each chunk of at most 64 KiB: the client is faster, the connection holds it back.
    answer, peak = _upload_while_watching_rss(ex.port, ex.proc.pid, total, "/upload?delay_ms=1")
    assert answer.startswith("HTTP/1.1 200"), answer
    assert f"bytes={total} " in answer, answer
    most = int(answer.split("most_buffered=")[1].split()[0])
    assert 0 < most <= 64 * 1024 + 64 * 1024, answer  # The mark plus one read buffer.
    assert peak - baseline < 16 * 1024, (baseline, peak)
    assert ex.stop() == 0

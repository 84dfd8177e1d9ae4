"""Server-wide memory budgets: [limits] max_buffered_body_bytes (request bodies of every
connection) and max_unsent_bytes (answers the clients have not read), and the cap on
max_body_bytes."""

import subprocess
import time

from squall_helpers import Conn, assert_plaintext_ok, parse_responses, request, squalld_path

KiB = 1024
MiB = 1024 * KiB


def gauge(watcher, name):
    watcher.send(request("GET", "/metrics"))
    response = watcher.read_response()
    assert response.status == 200, response
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_gauge(watcher, name, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = gauge(watcher, name)
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.02)


def test_body_budget_answers_503_with_retry_after_and_recovers(squalld):
    srv = squalld(config={"limits": {"max_body_bytes": "512KiB",
                                     "max_buffered_body_bytes": "512KiB"}})
    first_body = b"a" * (300 * KiB)
    with srv.conn() as watcher, Conn(srv.port) as slow:
        # One upload holds most of the budget: its buffer grows as bytes arrive, up to 512 KiB.
        slow.send(request("POST", "/echo", content_length=len(first_body) + 10) + first_body)
        wait_gauge(watcher, "squall_http_buffered_body_bytes", lambda v: v >= 300 * KiB)
        # Another body that does not fit beside it is refused at once, with Retry-After.
        second_body = b"b" * (100 * KiB)
        with Conn(srv.port) as refused:
            try:
                refused.send(request("POST", "/echo", body=second_body))
            except OSError:
                pass  # the server may close before taking the whole body
            data = refused.read_until_close()
        responses, _ = parse_responses(data, closed=True)
        assert [r.status for r in responses] == [503], data
        assert responses[0].get("Retry-After") == "1"
        assert "close" in responses[0].connection_tokens()
        assert "max_buffered_body_bytes" in responses[0].text
        # Requests without a body are still served.
        assert_plaintext_ok(srv.port)
        # The first upload completes; its budget comes back, and the refused one now passes.
        slow.send(b"z" * 10)
        response = slow.read_response()
        assert response.status == 200 and len(response.body) == len(first_body) + 10
        wait_gauge(watcher, "squall_http_buffered_body_bytes", lambda v: v < 64 * KiB)
        with Conn(srv.port) as retried:
            retried.send(request("POST", "/echo", body=second_body))
            response = retried.read_response()
            assert response.status == 200 and response.body == second_body
    srv.wait_for_line("answering 503: request bodies being received exceed "
                      "limits.max_buffered_body_bytes")


def test_unsent_output_is_bounded_across_connections(squalld):
    """Clients that pipeline POST /echo and never read: each alone stays under its own
    write_buffer_high_water, but together they are held to max_unsent_bytes (plus the answers
    in progress), and clients that do read are still served."""
    budget = 256 * KiB
    srv = squalld(config={
        "limits": {"max_unsent_bytes": "256KiB", "write_buffer_high_water": "256KiB"},
        "timeouts": {"write": "30s", "keepalive": "30s"},
    })
    clients = 8
    body = b"e" * (32 * KiB)
    # 4 MiB of answers per client: more than the kernel's socket buffers take on loopback.
    pipeline = request("POST", "/echo", body=body) * 128
    stalled = []
    try:
        with srv.conn() as watcher:
            for _ in range(clients):
                c = Conn(srv.port, rcvbuf=4096)
                c.sock.setblocking(False)
                sent = 0
                try:
                    while sent < len(pipeline):
                        sent += c.sock.send(pipeline[sent:sent + 65536])
                except BlockingIOError:
                    pass  # the server stopped reading this client: per-connection back-pressure
                stalled.append(c)
            # The budget is reached ...
            wait_gauge(watcher, "squall_http_unsent_bytes", lambda v: v >= budget, timeout=10)
            # ... and, while the clients go on not reading, the total stays near it: without it
            # each client would hold up to 256 KiB + an answer, over 2 MiB in all.
            highest = 0.0
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                highest = max(highest, gauge(watcher, "squall_http_unsent_bytes"))
                time.sleep(0.02)
            assert budget <= highest <= budget + clients * 2 * len(body), highest
            # A client that reads is served meanwhile.
            watcher.send(request("GET", "/plaintext"))
            assert watcher.read_response().status == 200
            for c in stalled:
                c.abort()
            stalled.clear()
            wait_gauge(watcher, "squall_http_unsent_bytes", lambda v: v == 0)
        assert_plaintext_ok(srv.port)
    finally:
        for c in stalled:
            c.close()


def test_max_body_bytes_is_capped_at_load(tmp_path):
    config = tmp_path / "big.toml"
    config.write_text('[limits]\nmax_body_bytes = "64GiB"\n')
    result = subprocess.run([squalld_path(), "--check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert (f'{config}:2: [limits] max_body_bytes: must be at most 1GiB (a request body is held '
            f'in memory whole), got "64GiB"') in result.stderr, result.stderr

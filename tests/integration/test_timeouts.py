"""[timeouts]: header (slowloris), body, keepalive, write."""

import select
import time

import pytest

from squall_helpers import (Conn, Metrics, assert_plaintext_ok, check_rejection, parse_responses,
                            raw_exchange, request)

HEADER = 0.3
BODY = 0.3
KEEPALIVE = 0.5


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld(config={"timeouts": {
        "header": "300ms", "body": "300ms", "keepalive": "500ms", "lingering": "300ms"}})


def test_partial_head_gets_408(server):
    result = raw_exchange(server.port, b"GET /plaintext HTTP/1.1\r\nHost: a\r\nX-Slow: yes")
    check_rejection(result, 408)
    assert HEADER * 0.8 <= result.elapsed < HEADER + 2.5, result
    assert_plaintext_ok(server.port)


def test_partial_request_line_gets_408(server):
    result = raw_exchange(server.port, b"GET /plain")
    check_rejection(result, 408)
    assert HEADER * 0.8 <= result.elapsed < HEADER + 2.5, result


def test_trickling_head_is_cut_off(server):
    """Slowloris: a byte every 50 ms keeps the connection busy but must not extend the header
    deadline, which runs from the request's first byte to its last header."""
    head = b"GET /plaintext HTTP/1.1\r\nHost: a\r\n" + b"X-Trickle: " + b"t" * 200 + b"\r\n\r\n"
    with Conn(server.port, timeout=5) as c:
        start = time.monotonic()
        for i in range(len(head)):
            try:
                c.send(head[i:i + 1])
            except OSError:
                break
            # Pace the trickle, but stop as soon as the server says something.
            readable, _, _ = select.select([c.sock], [], [], 0.05)
            if readable:
                break
            assert time.monotonic() - start < 5, "the server never cut the trickling client off"
        data = c.read_until_close()
        elapsed = time.monotonic() - start
    responses, _ = parse_responses(data, closed=True)
    assert [r.status for r in responses] == [408], data
    assert HEADER * 0.8 <= elapsed < HEADER + 2.5, elapsed


def test_stalled_body_gets_408(server):
    head = request("POST", "/echo", content_length=10)
    with Conn(server.port) as c:
        c.send(head + b"abcd")
        start = time.monotonic()
        result_data = c.read_until_close()
        elapsed = time.monotonic() - start
        reset = c.reset
    responses, rest = parse_responses(result_data, closed=True)
    assert [r.status for r in responses] == [408], result_data
    assert not rest and not reset
    assert "close" in responses[0].connection_tokens()
    assert BODY * 0.8 <= elapsed < BODY + 2.5, elapsed
    assert_plaintext_ok(server.port)


def test_idle_keepalive_connection_is_closed(server):
    with server.conn() as c:
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200
        waited = c.expect_closed(timeout=KEEPALIVE + 3)
    assert KEEPALIVE * 0.8 <= waited < KEEPALIVE + 2.5, waited


def test_keepalive_timer_restarts_with_each_request(server):
    with server.conn() as c:
        start = time.monotonic()
        for _ in range(3):
            c.send(request("GET", "/plaintext"))
            assert c.read_response().status == 200
            # Idle for 60% of the keep-alive timeout: nothing may arrive, not even a close.
            readable, _, _ = select.select([c.sock], [], [], KEEPALIVE * 0.6)
            assert not readable, "the server closed a connection that was not idle long enough"
        assert time.monotonic() - start > KEEPALIVE  # in total longer than the timeout
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200


def test_write_timeout_closes_a_client_that_never_reads(squalld):
    srv = squalld(config={
        "limits": {"write_buffer_high_water": "4KiB"},
        "timeouts": {"write": "300ms", "keepalive": "20s", "lingering": "300ms"},
    })
    body = b"w" * (16 * 1024)
    count = 512  # 8 MiB of responses: more than the kernel buffers can hold
    with srv.conn() as watcher:
        def open_connections():
            watcher.send(request("GET", "/metrics"))
            return Metrics(watcher.read_response().text).value("squall_connections_open")

        assert open_connections() == 1
        stalled = Conn(srv.port, rcvbuf=4096)
        try:
            data = b"".join(request("POST", "/echo", body=body) for _ in range(count))
            stalled.sock.setblocking(False)
            sent = 0
            try:
                while sent < len(data):
                    sent += stalled.sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass  # the server stopped reading: back-pressure works
            stalled.sock.settimeout(5)
            first = stalled.sock.recv(1)  # proves the server took the connection and answers
            assert first == b"H"
            stalled_since = time.monotonic()
            assert open_connections() == 2
            # From now on the client reads nothing. Meanwhile others are served, and within a
            # bound the server gives up on the stalled one.
            deadline = time.monotonic() + 5
            while open_connections() != 1:
                assert time.monotonic() < deadline, "the write timeout never closed the client"
                assert_plaintext_ok(srv.port)
                time.sleep(0.05)
            closed_after = time.monotonic() - stalled_since
            assert closed_after >= 0.2, closed_after
            # The stalled client sees the end of the connection before all its responses.
            stalled.buf = first
            rest = stalled.read_until_close(timeout=5)
            responses, _ = parse_responses(rest, closed=False)
            assert len(responses) < count, len(responses)
        finally:
            stalled.close()
        assert_plaintext_ok(srv.port)
        watcher.send(request("GET", "/plaintext"))
        assert watcher.read_response().status == 200


def test_server_keeps_serving_during_slow_clients(server):
    # Several stalled heads at once do not stop others from being served.
    stalled = [Conn(server.port) for _ in range(5)]
    try:
        for c in stalled:
            c.send(b"GET /plaintext HTTP/1.1\r\n")
        for _ in range(5):
            assert_plaintext_ok(server.port)
        for c in stalled:
            rest = c.read_until_close(timeout=HEADER + 3)
            responses, _ = parse_responses(rest, closed=True)
            assert [r.status for r in responses] == [408]
    finally:
        for c in stalled:
            c.close()


def test_trickling_body_is_cut_off_at_the_body_deadline(server):
    """timeouts.body runs from the end of the head to the body's last byte: a byte every 50 ms
    (each well within the timeout) does not extend it, so a slow client cannot hold a body
    buffer open."""
    with Conn(server.port, timeout=5) as c:
        c.send(request("POST", "/echo", content_length=1000))
        start = time.monotonic()
        for _ in range(1000):
            try:
                c.send(b"x")
            except OSError:
                break
            readable, _, _ = select.select([c.sock], [], [], 0.05)
            if readable:
                break
            assert time.monotonic() - start < 5, "the server never cut the trickling body off"
        data = c.read_until_close()
        elapsed = time.monotonic() - start
    responses, _ = parse_responses(data, closed=True)
    assert [r.status for r in responses] == [408], data
    assert b"timeouts.body" in responses[0].body
    assert BODY * 0.8 <= elapsed < BODY + 2.5, elapsed
    assert_plaintext_ok(server.port)


def test_header_timeout_runs_from_the_first_byte_not_the_accept(squalld):
    """A connection may wait before its first request; the head then has the whole
    timeouts.header from its own first byte."""
    header = 1.0
    srv = squalld(config={"timeouts": {"header": "1s", "keepalive": "5s"}})
    with Conn(srv.port, timeout=5) as c:
        readable, _, _ = select.select([c.sock], [], [], header * 0.6)
        assert not readable
        c.send(b"GET /plaintext HTTP/1.1\r\n")
        readable, _, _ = select.select([c.sock], [], [], header * 0.6)
        assert not readable, "the head was timed from the accept"
        c.send(b"Host: a\r\n\r\n")
        assert c.read_response().status == 200


def test_a_connection_that_never_sends_is_closed_after_the_header_timeout(server):
    with Conn(server.port, timeout=5) as c:
        waited = c.expect_closed(timeout=HEADER + 3)
        assert c.buf == b""
    assert HEADER * 0.8 <= waited < HEADER + 2.5, waited

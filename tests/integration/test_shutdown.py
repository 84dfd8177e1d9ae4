"""SIGTERM: graceful drain, second SIGTERM, drain deadline; SIGPIPE is ignored."""

import signal
import time

from squall_helpers import Conn, assert_plaintext_ok, request, wait_refused


def idle_keepalive(srv) -> Conn:
    c = srv.conn()
    c.send(request("GET", "/plaintext"))
    assert c.read_response().status == 200
    return c


def mid_request(srv) -> Conn:
    """Headers of POST /echo with Content-Length 10 and 4 body bytes sent."""
    c = srv.conn()
    c.send(request("POST", "/echo", content_length=10) + b"0123")
    # Make sure the server has read it before any signal: a request on another connection,
    # sent later, is answered only after the loop has seen what was sent before it.
    assert_plaintext_ok(srv.port)
    return c


def test_graceful_shutdown(squalld):
    srv = squalld(config={"timeouts": {"drain": "10s", "body": "10s"}})
    idle = idle_keepalive(srv)
    busy = mid_request(srv)
    try:
        srv.signal(signal.SIGTERM)
        # The idle connection is closed at once.
        waited = idle.expect_closed(timeout=3, allow_reset=True)
        assert waited < 2, waited
        # No new connections.
        assert wait_refused(srv.host, srv.port, timeout=3), "still accepting after SIGTERM"
        assert srv.running(), "exited before the in-flight request finished"
        # The in-flight request finishes and is answered with Connection: close.
        busy.send(b"456789")
        response = busy.read_response()
        assert response.status == 200 and response.body == b"0123456789", response
        assert "close" in response.connection_tokens(), response
        busy.expect_closed(timeout=3)
        busy.close()  # ends the server's lingering read at once
        start = time.monotonic()
        assert srv.wait_exit(timeout=5) == 0, srv.stderr_text()
        assert time.monotonic() - start < 1.5
    finally:
        idle.close()
        busy.close()
    srv.stop()  # checks for ERROR lines


def test_graceful_shutdown_without_connections(squalld):
    srv = squalld()
    assert_plaintext_ok(srv.port)
    start = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit(timeout=5) == 0, srv.stderr_text()
    assert time.monotonic() - start < 2
    srv.stop()


def test_sigterm_right_after_listening_line(squalld):
    """The 'listening on' line means ready: a SIGTERM from then on is a graceful stop (the
    handlers must be in place before the line), even with no request made yet."""
    for _ in range(5):  # several starts, since a start-up race shows only sometimes
        srv = squalld()
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(timeout=5) == 0, srv.stderr_text()
        srv.stop()


def test_second_sigterm_exits_at_once(squalld):
    srv = squalld(config={"timeouts": {"drain": "20s", "body": "20s"}})
    idle = idle_keepalive(srv)
    busy = mid_request(srv)
    try:
        srv.signal(signal.SIGTERM)
        idle.expect_closed(timeout=3, allow_reset=True)  # draining has begun
        assert srv.running()
        start = time.monotonic()
        srv.signal(signal.SIGTERM)
        srv.wait_exit(timeout=3)
        assert time.monotonic() - start < 2
    finally:
        idle.close()
        busy.close()
    srv.stop(expect_rc=None, check_errors=False)


def test_drain_deadline(squalld):
    srv = squalld(config={"timeouts": {"drain": "300ms", "body": "20s"}})
    busy = mid_request(srv)
    try:
        start = time.monotonic()
        srv.signal(signal.SIGTERM)
        rc = srv.wait_exit(timeout=5)
        elapsed = time.monotonic() - start
        assert rc == 0, srv.stderr_text()
        assert 0.25 <= elapsed < 3, elapsed
        # The stalled client's connection is gone.
        busy.read_until_close(timeout=3)
    finally:
        busy.close()
    srv.stop()


def test_sigpipe_is_ignored(squalld):
    """Clients that reset while a large response is being written do not kill the server."""
    srv = squalld()
    pipeline = b"".join(request("POST", "/echo", body=b"p" * 16384) for _ in range(64))
    for _ in range(5):
        c = Conn(srv.port, rcvbuf=4096)
        try:
            c.send(pipeline)  # 1 MiB of responses to write
            assert c.sock.recv(1) == b"H"  # the response is being written
        finally:
            c.abort()  # RST while the server still has most of the response to send
        assert srv.running(), srv.stderr_text()
        assert_plaintext_ok(srv.port)
    # The disposition itself: SIGPIPE ignored (or blocked) in the daemon.
    status = open(f"/proc/{srv.proc.pid}/status").read()
    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
             if line.startswith(("SigIgn:", "SigBlk:"))}
    sigpipe_bit = 1 << (signal.SIGPIPE - 1)
    assert (masks["SigIgn"] | masks["SigBlk"]) & sigpipe_bit, masks
    srv.stop()

"""[limits]: 414, 431, 413 (declared and chunked), chunk extensions, lingering close after an
early rejection, and [server] max_connections."""

import socket
import threading
import time

import pytest

from squall_helpers import (FOLLOW, Conn, Metrics, assert_plaintext_ok, check_common_headers,
                            check_rejection, chunked, parse_all, raw_exchange, request)

MAX_URL = 1024
MAX_HEADER_BYTES = 2048
MAX_HEADER_COUNT = 20
MAX_BODY = 64 * 1024
MAX_CHUNK_EXT = 1024


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld(config={
        "limits": {"max_url_bytes": "1KiB", "max_header_bytes": "2KiB",
                   "max_header_count": MAX_HEADER_COUNT, "max_body_bytes": "64KiB",
                   "max_chunk_extension_bytes": "1KiB"},
        "timeouts": {"lingering": "500ms"},
    })


def rejected(server, data, statuses):
    response = check_rejection(raw_exchange(server.port, data), statuses)
    assert_plaintext_ok(server.port)
    return response


# -- URL ---------------------------------------------------------------------------------------

def test_url_at_limit_is_served(server):
    target = "/" + "u" * (MAX_URL - 1)
    assert len(target) == MAX_URL
    response = server.get(target)
    assert response.status == 404, response


def test_url_over_limit_414(server):
    target = "/" + "u" * MAX_URL
    rejected(server, request("GET", target) + FOLLOW, 414)


def test_url_far_over_limit_414(server):
    # The whole request line in one go, much larger than the limit, then more requests.
    target = "/plaintext?" + "q" * (20 * MAX_URL)
    rejected(server, request("GET", target) + FOLLOW * 3, 414)


# -- header section ------------------------------------------------------------------------------

def test_headers_under_limits_are_served(server):
    headers = [(f"X-Pad-{i}", "p" * 150) for i in range(5)]
    response = server.get("/plaintext", headers=headers)
    assert response.status == 200, response


def test_one_huge_header_431(server):
    rejected(server, request("GET", "/plaintext", headers=[("X-Big", "b" * 3000)]) + FOLLOW, 431)


def test_header_bytes_over_limit_431(server):
    headers = [(f"X-Pad-{i}", "p" * 300) for i in range(10)]  # 10 lines, ~3 KiB
    assert len(headers) < MAX_HEADER_COUNT
    rejected(server, request("GET", "/plaintext", headers=headers) + FOLLOW, 431)


def test_header_count_at_limit_is_served(server):
    headers = [(f"X-N-{i}", "v") for i in range(MAX_HEADER_COUNT - 1)]  # + Host
    response = server.get("/plaintext", headers=headers)
    assert response.status == 200, response


def test_header_count_over_limit_431(server):
    headers = [(f"X-N-{i}", "v") for i in range(MAX_HEADER_COUNT)]  # + Host = limit + 1
    rejected(server, request("GET", "/plaintext", headers=headers) + FOLLOW, 431)


def test_very_many_headers_431(server):
    headers = [("X", "") for _ in range(1000)]
    rejected(server, request("GET", "/plaintext", headers=headers) + FOLLOW, 431)


# -- body ----------------------------------------------------------------------------------------

def test_body_at_limit_is_echoed(server):
    body = bytes(range(256)) * (MAX_BODY // 256)
    assert len(body) == MAX_BODY
    with server.conn() as c:
        c.send(request("POST", "/echo", body=body))
        response = c.read_response()
    assert response.status == 200 and response.body == body, response


def test_content_length_over_limit_413(server):
    # The client already sent part of the body (and would send more): the 413 still arrives
    # whole and the connection closes cleanly.
    head = request("POST", "/echo", content_length=MAX_BODY + 1)
    rejected(server, head + b"b" * 4096, 413)


def test_content_length_huge_413(server):
    head = request("POST", "/echo", content_length=10 ** 12)
    rejected(server, head + b"b" * 100, 413)


def test_chunked_at_limit_is_echoed(server):
    pieces = [b"c" * 4096] * (MAX_BODY // 4096)
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                       body=chunked(*pieces)))
        response = c.read_response()
    assert response.status == 200 and response.body == b"".join(pieces), response


def test_chunked_growing_past_limit_413(server):
    pieces = [b"c" * 4096] * (MAX_BODY // 4096) + [b"!"]
    body = chunked(*pieces)
    rejected(server, request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                             body=body) + FOLLOW, 413)


def test_single_chunk_past_limit_413(server):
    # One chunk larger than the limit.
    body = chunked(b"d" * (MAX_BODY + 1))
    rejected(server, request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                             body=body), 413)


def test_small_chunk_extensions_are_accepted(server):
    body = b"3;" + b"e" * 100 + b"\r\nabc\r\n0\r\n\r\n"
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")], body=body))
        response = c.read_response()
    assert response.status == 200 and response.body == b"abc", response


def test_chunk_extension_over_limit(server):
    body = b"3;ext=" + b"e" * (2 * MAX_CHUNK_EXT) + b"\r\nabc\r\n0\r\n\r\n"
    rejected(server, request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                             body=body) + FOLLOW, (413, 400))


# -- lingering close -------------------------------------------------------------------------------

def test_lingering_close_while_client_keeps_sending(server):
    """A client that streams a large body while reading (as curl does) must get the whole 413
    and a clean close, not a reset that could destroy the response."""
    c = Conn(server.port, timeout=5)
    send_error = []

    def sender():
        try:
            c.send(request("POST", "/echo", content_length=8 * 1024 * 1024))
            block = b"s" * 65536
            for _ in range(16):  # 1 MiB after the head
                c.send(block)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            send_error.append(e)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        response = c.read_response()
        assert response.status == 413, response
        assert "close" in response.connection_tokens()
        rest = c.read_until_close()
        assert rest == b"", rest
        assert not c.reset, "the server reset the connection instead of a lingering close"
    finally:
        thread.join(10)
        c.close()
    assert not send_error, f"the server stopped reading before the client finished: {send_error}"
    assert_plaintext_ok(server.port)


# -- max_connections ---------------------------------------------------------------------------------

def test_max_connections(squalld):
    limit = 4
    srv = squalld(config={"server": {"max_connections": limit}})
    conns = [srv.conn() for _ in range(limit)]
    try:
        for c in conns:
            c.send(request("GET", "/plaintext"))
            assert c.read_response().status == 200
        # The next one is refused: closed without a normal answer (maybe a 503).
        result = raw_exchange(srv.port, request("GET", "/plaintext"))
        assert result.eof, f"the over-limit connection was not closed: {result!r}"
        if result.data:
            responses = parse_all(result.data)
            assert [r.status for r in responses] == [503], responses
            check_common_headers(responses[0])
        # The existing ones still get answers.
        for c in conns:
            c.send(request("GET", "/plaintext"))
            response = c.read_response()
            assert response.status == 200 and response.body == b"Hello, World!", response
        conns[0].send(request("GET", "/metrics"))
        m = Metrics(conns[0].read_response().text)
        assert m.value("squall_connections_refused_total") >= 1
        assert m.value("squall_connections_open") == limit
        # Closing one frees a slot (the server learns of the close asynchronously: bounded retry).
        conns.pop().close()
        deadline = time.monotonic() + 3
        while True:
            result = raw_exchange(srv.port, request("GET", "/plaintext",
                                                    headers=[("Connection", "close")]))
            responses = parse_all(result.data) if result.data else []
            if responses and responses[0].status == 200:
                break
            assert time.monotonic() < deadline, f"no slot freed after a close: {result!r}"
            time.sleep(0.02)
    finally:
        for c in conns:
            c.close()

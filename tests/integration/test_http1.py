"""HTTP/1.1 connection handling: keep-alive, HTTP/1.0, Connection: close, pipelining, byte-wise
delivery, Expect: 100-continue, chunked request bodies."""

import pytest

from squall_helpers import (chunked, check_common_headers, check_rejection, curl, parse_all,
                            raw, raw_exchange, request)


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld(config={"timeouts": {"lingering": "500ms"}})


def test_keepalive_is_default(server):
    with server.conn() as c:
        for _ in range(3):
            c.send(request("GET", "/plaintext"))
            response = c.read_response()
            assert response.status == 200 and response.body == b"Hello, World!", response
            assert response.version == "HTTP/1.1"
            assert "close" not in response.connection_tokens(), response
        assert c.is_open_now()
        c.send(request("GET", "/healthz"))
        assert c.read_response().status == 200


def test_http10_closes_by_default(server):
    with server.conn() as c:
        c.send(b"GET /plaintext HTTP/1.0\r\n\r\n")
        response = c.read_response()
        assert response.status == 200 and response.body == b"Hello, World!", response
        assert not response.chunked
        assert response.get("Content-Length") == "13"
        c.expect_closed()


def test_http10_keepalive_on_request(server):
    with server.conn() as c:
        for _ in range(2):
            c.send(b"GET /plaintext HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = c.read_response()
            assert response.status == 200 and response.body == b"Hello, World!", response
            assert not response.chunked
            assert "keep-alive" in response.connection_tokens(), response
        assert c.is_open_now()
        c.send(b"GET /plaintext HTTP/1.0\r\n\r\n")
        assert c.read_response().status == 200
        c.expect_closed()


def test_connection_close(server):
    with server.conn() as c:
        c.send(request("GET", "/plaintext", headers=[("Connection", "close")]))
        response = c.read_response()
        assert response.status == 200, response
        assert "close" in response.connection_tokens(), response
        c.expect_closed()


def test_bytes_after_connection_close_are_not_answered(server):
    data = (request("GET", "/plaintext", headers=[("Connection", "close")])
            + request("GET", "/plaintext") + request("GET", "/healthz"))
    responses = parse_all(raw(server.port, data))
    assert len(responses) == 1, responses
    assert responses[0].status == 200
    assert "close" in responses[0].connection_tokens()


@pytest.mark.parametrize("count", [1, 16, 100])
@pytest.mark.parametrize("kind", ["plaintext", "echo"])
def test_pipelining(server, count, kind):
    if kind == "plaintext":
        requests = [request("GET", "/plaintext") for _ in range(count)]
        bodies = [b"Hello, World!"] * count
    else:
        bodies = [f"request number {i} ".encode() * (i + 1) for i in range(count)]
        requests = [request("POST", "/echo", body=body) for body in bodies]
    with server.conn() as c:
        c.send(b"".join(requests))
        responses = c.read_responses(count, timeout=10)
        assert [r.status for r in responses] == [200] * count
        assert [r.body for r in responses] == bodies
        # Still open and usable afterwards, with nothing extra sent.
        c.send(request("GET", "/plaintext", headers=[("Connection", "close")]))
        assert c.read_response().status == 200
        c.expect_closed()


def test_pipelined_mixed_routes(server):
    data = b"".join([
        request("GET", "/plaintext"),
        request("GET", "/healthz"),
        request("POST", "/echo", headers=[("Content-Type", "text/x-a")], body=b"first body"),
        request("GET", "/missing"),
        request("HEAD", "/plaintext"),
        request("POST", "/plaintext", body=b"zz"),
        request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                body=chunked(b"chun", b"ked")),
        request("GET", "/metrics"),
        request("POST", "/echo", body=b"last", headers=[("Connection", "close")]),
    ])
    responses = parse_all(raw(server.port, data), heads=(4,))
    assert [r.status for r in responses] == [200, 200, 200, 404, 200, 405, 200, 200, 200]
    assert responses[0].body == b"Hello, World!"
    assert responses[1].json()["status"] == "ok"
    assert responses[2].body == b"first body" and responses[2].get("Content-Type") == "text/x-a"
    assert responses[4].body == b"" and responses[4].get("Content-Length") == "13"
    assert responses[6].body == b"chunked"
    assert b"squall_connections_open" in responses[7].body
    assert responses[8].body == b"last"
    for response in responses:
        check_common_headers(response)


def test_request_one_byte_per_send(server):
    with server.conn() as c:
        c.send_bytewise(request("GET", "/plaintext", headers=[("User-Agent", "slow-but-steady")]))
        response = c.read_response()
        assert response.status == 200 and response.body == b"Hello, World!", response
        c.send_bytewise(request("POST", "/echo", body=b"byte by byte"))
        response = c.read_response()
        assert response.status == 200 and response.body == b"byte by byte", response
        c.send_bytewise(request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                                body=chunked(b"one", b"two", trailers=b"T: 1\r\n")))
        response = c.read_response()
        assert response.status == 200 and response.body == b"onetwo", response


def test_expect_100_continue(server):
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Expect", "100-continue"),
                                                  ("Content-Length", "11")]))
        # The interim answer must come before any body byte is sent.
        interim = c.read_response(allow_interim=True)
        assert interim.status == 100, interim
        assert interim.raw.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        c.send(b"hello world")
        response = c.read_response()
        assert response.status == 200 and response.body == b"hello world", response
        # The connection goes on.
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200


def test_expect_100_continue_too_large(server):
    head = request("POST", "/echo", headers=[("Expect", "100-continue"),
                                             ("Content-Length", str(2 * 1024 * 1024))])
    result = raw_exchange(server.port, head)
    assert b"100 Continue" not in result.data, result
    check_rejection(result, 413)


def test_chunked_body_with_extensions_and_trailers(server):
    body = (b"5;name=value\r\nhello\r\n"
            b"1;a;b=\"quoted;str\"\r\n \r\n"
            b"5\r\nworld\r\n"
            b"0;last=1\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n")
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Transfer-Encoding", "chunked"),
                                                  ("Content-Type", "text/x-chunks")], body=body))
        response = c.read_response()
        assert response.status == 200, response
        assert response.body == b"hello world"
        assert response.get("Content-Type") == "text/x-chunks"
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200


def test_chunked_body_large_many_chunks(server):
    pieces = [bytes([i % 256]) * (1000 + 37 * i) for i in range(100)]
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                       body=chunked(*pieces)))
        response = c.read_response(timeout=10)
    assert response.status == 200, response
    assert response.body == b"".join(pieces)


def test_chunked_body_with_curl(server, tmp_path):
    body = b"streamed through curl\n" * 5000
    result = curl("-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                  server.url("/echo"), input=body)
    assert result.returncode == 0, result.stderr
    assert result.stdout == body


def test_pipelined_request_after_chunked_body(server):
    data = (request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                    body=chunked(b"abc"))
            + request("GET", "/plaintext", headers=[("Connection", "close")]))
    responses = parse_all(raw(server.port, data))
    assert [(r.status, r.body) for r in responses] == [(200, b"abc"), (200, b"Hello, World!")]


def test_large_echo_near_limit(server):
    body = bytes(range(251)) * (1000 * 1024 // 251)  # just under the 1 MiB default
    with server.conn() as c:
        c.send(request("POST", "/echo", body=body))
        response = c.read_response(timeout=10)
        assert response.status == 200 and response.body == body
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200
